# Optuna searches (only for the methods a study lists under `tune`): create the study, run
# tune.workers jobs on it, then one job writes best.json, which the final runs of that
# (study, dataset, method) read. All logic is in mmrepro.tune.


rule tune_create:
    input:
        tracking=rules.init_tracking.output,
    output:
        f"{TUNE}/{{study}}/{{dataset}}/{{method}}/search.json",
    params:
        search=lambda wildcards: job_spec(
            json.dumps(search_spec(config, wildcards.study, wildcards.dataset, wildcards.method))
        ),
    wildcard_constraints:
        study="balance|missing|shift|peft",
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/tune/{{study}}/{{dataset}}/{{method}}/create.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "mmrepro tune create --search {params.search} --out {output} > {log} 2>&1"


rule tune_worker:
    input:
        unpack(tune_inputs),
    output:
        f"{TUNE}/{{study}}/{{dataset}}/{{method}}/worker{{worker}}.json",
    params:
        init=lambda wildcards, input: f"--init {input.init}" if input.init else "",
    wildcard_constraints:
        study="balance|missing|shift|peft",
        worker=r"\d+",
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/tune/{{study}}/{{dataset}}/{{method}}/worker{{worker}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tune/{{study}}/{{dataset}}/{{method}}/worker{{worker}}.tsv"
    threads: TRAIN_RES["threads"]
    resources:
        mem_mb=lambda wildcards: search_resources(config, wildcards.study, wildcards.dataset, wildcards.method, True)["mem_mb"],
        runtime=lambda wildcards: search_resources(config, wildcards.study, wildcards.dataset, wildcards.method, True)["runtime"],
        gpu=TRAIN_RES["gpu"],
    shell:
        "mmrepro tune work --search-file {input.search} --data {input.data} {params.init} --worker {wildcards.worker}"
        " --threads {threads} --out {output} > {log} 2>&1"


rule tune_best:
    input:
        unpack(tune_inputs),
        workers=lambda wildcards: [
            f"{TUNE}/{wildcards.study}/{wildcards.dataset}/{wildcards.method}/worker{i}.json"
            for i in range(config["tune"]["workers"])
        ],
    output:
        best=f"{TUNE}/{{study}}/{{dataset}}/{{method}}/best.json",
        plots=multiext(f"{TUNE}/{{study}}/{{dataset}}/{{method}}/", "history.png", "importances.png"),
    params:
        init=lambda wildcards, input: f"--init {input.init}" if input.init else "",
    wildcard_constraints:
        study="balance|missing|shift|peft",
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/tune/{{study}}/{{dataset}}/{{method}}/best.log",
    benchmark:
        f"{RESULTS}/benchmarks/tune/{{study}}/{{dataset}}/{{method}}/best.tsv"
    threads: TRAIN_RES["threads"]
    resources:
        mem_mb=lambda wildcards: search_resources(config, wildcards.study, wildcards.dataset, wildcards.method, False)["mem_mb"],
        runtime=lambda wildcards: search_resources(config, wildcards.study, wildcards.dataset, wildcards.method, False)["runtime"],
        gpu=TRAIN_RES["gpu"],
    shell:
        "mmrepro tune best --search-file {input.search} --data {input.data} {params.init}"
        " --threads {threads} --out {output.best} > {log} 2>&1"
