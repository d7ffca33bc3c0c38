# Reports: one table (md, csv, tex) and one plot (png, pdf) per study, built from metrics.json
# files (never from MLflow), plus one target rule per study name.


rule report:
    input:
        metrics=lambda wildcards: study_metrics(wildcards.study),
        reference=lambda wildcards: paper_reference(wildcards.study),
    output:
        multiext(f"{RESULTS}/tables/{{study}}", ".md", ".csv", ".tex"),
        multiext(f"{RESULTS}/plots/{{study}}", ".png", ".pdf"),
    params:
        table=lambda wildcards: f"{RESULTS}/tables/{wildcards.study}",
        plot=lambda wildcards: f"{RESULTS}/plots/{wildcards.study}",
        reference=lambda wildcards, input: f"--reference {input.reference}" if input.reference else "",
    wildcard_constraints:
        study="balance|missing|shift|peft",
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/report/{{study}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "mmrepro report --table {params.table} --plot {params.plot} {params.reference} {input.metrics}"
        " > {log} 2>&1"


rule curves:
    input:
        lambda wildcards: study_metrics(wildcards.study),
    output:
        multiext(f"{RESULTS}/plots/{{study}}_curves", ".png", ".pdf"),
    params:
        plot=lambda wildcards: f"{RESULTS}/plots/{wildcards.study}_curves",
    wildcard_constraints:
        study="balance|missing|peft",
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/report/{{study}}_curves.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "mmrepro curves --plot {params.plot} {input} > {log} 2>&1"


rule cggm_report:
    input:
        lambda wildcards: study_metrics("balance"),
    output:
        table=f"{RESULTS}/tables/balance_cggm.md",
        plot=multiext(f"{RESULTS}/plots/balance_cggm", ".png", ".pdf"),
    params:
        table=lambda wildcards, output: Path(output.table).with_suffix(""),
        plot=lambda wildcards, output: Path(output.plot[0]).with_suffix(""),
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/report/balance_cggm.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "mmrepro cggm-report --table {params.table} --plot {params.plot} {input} > {log} 2>&1"


for _study in config["studies"]:

    rule:
        name:
            _study
        input:
            study_report(_study),
        localrule: True
