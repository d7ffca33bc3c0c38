# Reports: one table (md, csv, tex, html) and one plot (png, pdf) per study, built from metrics.json
# files (never from MLflow), plus one target rule per study name. The html table and the png plots
# are the results of `snakemake --report report.html`, each with its caption (workflow/report/).


rule report:
    input:
        metrics=lambda wildcards: study_metrics(wildcards.study),
        reference=lambda wildcards: paper_reference(wildcards.study),
    output:
        multiext(f"{RESULTS}/tables/{{study}}", ".md", ".csv", ".tex"),
        report(f"{RESULTS}/tables/{{study}}.html", caption="../report/table.rst", category="Tables",
               labels={"study": "{study}"}),
        report(f"{RESULTS}/plots/{{study}}.png", caption="../report/plot.rst", category="Plots",
               labels={"study": "{study}", "figure": "metric per setting"}),
        f"{RESULTS}/plots/{{study}}.pdf",
        report(f"{RESULTS}/plots/{{study}}_paired.png", caption="../report/paired.rst", category="Plots",
               labels={"study": "{study}", "figure": "paired differences"}),
        f"{RESULTS}/plots/{{study}}_paired.pdf",
    params:
        table=lambda wildcards: f"{RESULTS}/tables/{wildcards.study}",
        plot=lambda wildcards: f"{RESULTS}/plots/{wildcards.study}",
        reference=reference_args,
        groups=lambda wildcards: report_groups(wildcards.study),
        paired=lambda wildcards: paired_args(wildcards.study),
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
        "mmrepro report --table {params.table} --plot {params.plot} {params.reference} --groups {params.groups}"
        " {params.paired} {input.metrics} > {log} 2>&1"


rule curves:
    input:
        lambda wildcards: study_metrics(wildcards.study),
    output:
        report(f"{RESULTS}/plots/{{study}}_curves.png", caption="../report/curves.rst", category="Plots",
               labels={"study": "{study}", "figure": "per-epoch curves"}),
        f"{RESULTS}/plots/{{study}}_curves.pdf",
    params:
        plot=lambda wildcards: f"{RESULTS}/plots/{wildcards.study}_curves",
    wildcard_constraints:
        study="balance|missing|shift|peft",
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


rule missing_report:
    input:
        metrics=lambda wildcards: study_metrics("missing"),
        reference=paper_reference("missing"),
    output:
        multiext(f"{RESULTS}/tables/missing_cases", ".md", ".csv"),
        multiext(f"{RESULTS}/plots/missing_rates", ".png", ".pdf"),
        multiext(f"{RESULTS}/plots/missing_train_rates", ".png", ".pdf"),
        multiext(f"{RESULTS}/plots/missing_prompt_lengths", ".png", ".pdf"),
    params:
        # the output stems, derived from the outputs (a hard-coded prefix breaks without a shared filesystem)
        table=lambda wildcards, output: str(Path(output[0]).with_suffix("")),
        plot=lambda wildcards, output: str(Path(output[2]).with_suffix("")),
        train=lambda wildcards, output: str(Path(output[4]).with_suffix("")),
        prompt=lambda wildcards, output: str(Path(output[6]).with_suffix("")),
        reference=reference_args,
        groups=lambda wildcards: report_groups("missing"),
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/report/missing_cases.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "mmrepro missing-report --table {params.table} --plot {params.plot} --train-rate-plot {params.train}"
        " --prompt-length-plot {params.prompt} {params.reference} --groups {params.groups} {input.metrics}"
        " > {log} 2>&1"


rule cggm_report:
    input:
        lambda wildcards: study_metrics("balance"),
    output:
        table=f"{RESULTS}/tables/balance_cggm.md",
        plot=multiext(f"{RESULTS}/plots/balance_cggm", ".png", ".pdf"),
    params:
        table=lambda wildcards, output: str(Path(output.table).with_suffix("")),
        plot=lambda wildcards, output: str(Path(output.plot[0]).with_suffix("")),
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
