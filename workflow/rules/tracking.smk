# Tracking: the MLflow store is created once, locally, before any parallel job writes to it; after
# a study's jobs, one local job logs the runs that were not logged live (tracking.mode), so the
# runs' MLflow records are written from one process on the machine that holds the store.


rule init_tracking:
    localrule: True
    output:
        f"{RESULTS}/tracking/experiments.json",
    params:
        results=lambda wildcards, output: Path(output[0]).parents[1],
        uri=f"--uri {shlex.quote(config['tracking']['uri'])}" if config["tracking"]["uri"] else "",
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/tracking/init.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    # the URLs of the experiments' runs go to the terminal too, not only to the log
    shell:
        "set -o pipefail; mmrepro init-tracking --results {params.results} {params.uri} --out {output} 2>&1 | tee {log}"


rule track:
    input:
        runs=lambda wildcards: study_metrics(wildcards.study) + study_backbone_metrics(wildcards.study),
        tracking=rules.init_tracking.output,
    output:
        f"{RESULTS}/tracking/{{study}}.json",
    params:
        results=lambda wildcards, output: Path(output[0]).parents[1],
        uri=f"--uri {shlex.quote(config['tracking']['uri'])}" if config["tracking"]["uri"] else "",
        # not in the command: where the store is now, so that a moved results folder (or another
        # store) runs this job again, which points a moved store at its own artifacts
        store=tracking_uri(RESULTS, config["tracking"]["uri"]),
    wildcard_constraints:
        study="balance|missing|shift|peft",
    localrule: True
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/tracking/{{study}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "mmrepro track --results {params.results} {params.uri} --out {output} {input.runs} > {log} 2>&1"

