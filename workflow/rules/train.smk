# Training: one job per (study, dataset, method, setting, seed), and the backbones that the shift,
# peft and missing studies start from (shift: one per name on its backbone axis, in a folder of that
# name). Every job waits for the MLflow store (rules/tracking.smk).


rule backbone:
    input:
        data=lambda wildcards: store(backbone_source(config, wildcards.study, wildcards.dataset)),
        tracking=JOB_TRACKING,
    output:
        metrics=f"{RESULTS}/backbones/{{study}}/{{dataset}}/seed{{seed}}/metrics.json",
        model=f"{RESULTS}/backbones/{{study}}/{{dataset}}/seed{{seed}}/model.pt",
        stats=f"{RESULTS}/backbones/{{study}}/{{dataset}}/seed{{seed}}/feature_stats.pt",
    params:
        spec=lambda wildcards: job_spec(
            backbone_spec(
                config, wildcards.study, wildcards.dataset, int(wildcards.seed), wildcards.get("backbone")
            ).to_json()
        ),
        out_dir=lambda wildcards, output: Path(output.model).parent,
    wildcard_constraints:
        study="peft|missing",
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/backbones/{{study}}/{{dataset}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/backbones/{{study}}/{{dataset}}/seed{{seed}}.tsv"
    threads: TRAIN_RES["threads"]
    resources:
        mem_mb=lambda wildcards: train_resources(config, wildcards.study, wildcards.dataset, None)["mem_mb"],
        runtime=lambda wildcards: train_resources(config, wildcards.study, wildcards.dataset, None)["runtime"],
        gpu=TRAIN_RES["gpu"],
    shell:
        "mmrepro train --spec {params.spec} --data {input.data} --out-dir {params.out_dir}"
        " --threads {threads} > {log} 2>&1"


use rule backbone as shift_backbone with:
    output:
        metrics=f"{RESULTS}/backbones/{{study}}/{{dataset}}/{{backbone}}/seed{{seed}}/metrics.json",
        model=f"{RESULTS}/backbones/{{study}}/{{dataset}}/{{backbone}}/seed{{seed}}/model.pt",
        stats=f"{RESULTS}/backbones/{{study}}/{{dataset}}/{{backbone}}/seed{{seed}}/feature_stats.pt",
    wildcard_constraints:
        study="shift",
    log:
        f"{RESULTS}/logs/backbones/{{study}}/{{dataset}}/{{backbone}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/backbones/{{study}}/{{dataset}}/{{backbone}}/seed{{seed}}.tsv"


rule train:
    input:
        data=lambda wildcards: store(wildcards.dataset),
        tracking=JOB_TRACKING,
        init=lambda wildcards: (
            backbone_model(wildcards.study, wildcards.dataset, wildcards.seed)
            if STUDY_KINDS[wildcards.study] == "finetune"
            else []
        ),
        tuned=tuned_best(None),
        teachers=lambda wildcards: list(teachers(wildcards).values()),
    output:
        metrics=f"{RESULTS}/{{study}}/{{dataset}}/{{method}}/{{setting}}/seed{{seed}}/metrics.json",
        history=f"{RESULTS}/{{study}}/{{dataset}}/{{method}}/{{setting}}/seed{{seed}}/history.json",
        model=f"{RESULTS}/{{study}}/{{dataset}}/{{method}}/{{setting}}/seed{{seed}}/model.pt",
    params:
        spec=train_spec,
        out_dir=lambda wildcards, output: Path(output.model).parent,
        init=lambda wildcards, input: f"--init {input.init}" if input.init else "",
        tuned=lambda wildcards, input: f"--tuned {input.tuned}" if input.tuned else "",
        teachers=lambda wildcards: " ".join(f"--teacher {m}={path}" for m, path in teachers(wildcards).items()),
    wildcard_constraints:
        study="balance|missing|peft",
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/{{study}}/{{dataset}}/{{method}}/{{setting}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{study}}/{{dataset}}/{{method}}/{{setting}}/seed{{seed}}.tsv"
    threads: TRAIN_RES["threads"]
    resources:
        mem_mb=lambda wildcards: train_resources(config, wildcards.study, wildcards.dataset, wildcards.setting)["mem_mb"],
        runtime=lambda wildcards: train_resources(config, wildcards.study, wildcards.dataset, wildcards.setting)["runtime"],
        gpu=TRAIN_RES["gpu"],
    shell:
        "mmrepro train --spec {params.spec} --data {input.data} --out-dir {params.out_dir}"
        " {params.init} {params.tuned} {params.teachers} --threads {threads} > {log} 2>&1"
