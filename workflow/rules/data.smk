# Datasets: generate (synth) or convert (MMSA / MulT pickles) into a checked feature store that
# training reads. Download rules for the real datasets are not written yet.


rule make_data:
    input:
        # the downloaded file a converter reads (none for synth)
        lambda wildcards: config["datasets"][wildcards.dataset].get("path", []),
    output:
        f"{RESULTS}/data/{{dataset}}/manifest.json",
    params:
        spec=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset]),
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/data/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/data/{{dataset}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "mmrepro make-data --dataset {wildcards.dataset} --spec {params.spec:q} --out {output} > {log} 2>&1"
