# Datasets: fetch (download + verify, or wait for a manual download) -> convert into a checked
# feature store that training reads. synth has no raw data: make_data generates it.

# One fetch rule per raw file or folder of the config (datasets sharing a file share the rule).
# Downloads need the internet, which compute nodes may lack: fetches are local rules.
for _raw, _dataset in fetch_rules(config).items():

    rule:
        name:
            f"fetch_{_dataset}"
        localrule: True
        output:
            directory(_raw) if config["datasets"][_dataset]["loader"] in FOLDER_LOADERS else _raw,
        params:
            dataset=_dataset,
            spec=lambda wildcards, dataset=_dataset: job_spec(json.dumps(dataset_spec(config, dataset))),
        conda:
            CONDA_ENV
        log:
            f"{RESULTS}/logs/fetch/{_dataset}.log",
        # the manual-download message goes to the terminal too, so nobody has to open a log to read it
        shell:
            "set -o pipefail; mmrepro fetch --dataset {params.dataset} --spec {params.spec} 2>&1 | tee {log}"


rule make_data:
    input:
        # the raw data a converter reads (none for synth)
        lambda wildcards: dataset_path(config, wildcards.dataset) or [],
    output:
        f"{RESULTS}/data/{{dataset}}/manifest.json",
    params:
        spec=lambda wildcards: job_spec(json.dumps(dataset_spec(config, wildcards.dataset))),
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/data/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/data/{{dataset}}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wildcards: data_resources(config, wildcards.dataset)["mem_mb"],
        runtime=lambda wildcards: data_resources(config, wildcards.dataset)["runtime"],
    # a data error (what is wrong, in which file, split and key) is shown on the terminal too
    shell:
        "set -o pipefail; mmrepro make-data --dataset {wildcards.dataset} --spec {params.spec} --out {output} 2>&1 | tee {log}"
