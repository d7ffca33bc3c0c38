# Evaluation under shift: each source-trained backbone of the study's axis meets each target domain
# (or, under a `dataset` setting, another dataset's store) through a test-time adapter (offline: the
# target's train split, then its test split; online: the test stream). Missing-modality settings
# are evaluated inside training runs.


rule adapt:
    input:
        unpack(lambda wildcards: shift_source(wildcards.dataset, wildcards.backbone, wildcards.seed)),
        data=lambda wildcards: store(target_dataset(config, "shift", wildcards.dataset, wildcards.setting)),
        tracking=JOB_TRACKING,
        tuned=tuned_best("shift"),
    output:
        metrics=f"{RESULTS}/shift/{{dataset}}/{{backbone}}/{{method}}/{{setting}}/seed{{seed}}/metrics.json",
    params:
        spec=lambda wildcards: job_spec(
            run_spec(
                config,
                "shift",
                wildcards.dataset,
                wildcards.method,
                wildcards.setting,
                int(wildcards.seed),
                wildcards.backbone,
            ).to_json()
        ),
        out_dir=lambda wildcards, output: Path(output.metrics).parent,
        tuned=lambda wildcards, input: f"--tuned {input.tuned}" if input.tuned else "",
        stats=lambda wildcards, input: f"--source-stats {input.stats}" if "stats" in input.keys() else "",
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/shift/{{dataset}}/{{backbone}}/{{method}}/{{setting}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/shift/{{dataset}}/{{backbone}}/{{method}}/{{setting}}/seed{{seed}}.tsv"
    threads: TRAIN_RES["threads"]
    resources:
        mem_mb=lambda wildcards: train_resources(config, "shift", wildcards.dataset, wildcards.setting)["mem_mb"],
        runtime=lambda wildcards: train_resources(config, "shift", wildcards.dataset, wildcards.setting)["runtime"],
        gpu=TRAIN_RES["gpu"],
    shell:
        "mmrepro adapt --spec {params.spec} --data {input.data} --model {input.model}"
        " {params.stats} --out-dir {params.out_dir} {params.tuned} --threads {threads} > {log} 2>&1"
