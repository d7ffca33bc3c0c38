# Reports: one table (md, csv, tex, html) and one plot (png, pdf) per study, built from metrics.json
# files (never from MLflow), the paper's cells without a run of ours (tables/paper/<study>), the
# paired differences to the study's reference row where it has one (plots/<study>_paired), plus
# one target rule per study name. Every table and plot is in `snakemake --report report.html`: per
# output stem one file marked report(...) (html for tables, png for plots), with its caption
# (workflow/report/; tests/test_workflow.py checks that none is left out).


rule report:
    input:
        metrics=lambda wildcards: study_metrics(wildcards.study),
        reference=lambda wildcards: paper_reference(wildcards.study),
    output:
        multiext(f"{RESULTS}/tables/{{study}}", ".md", ".csv", ".tex"),
        report(f"{RESULTS}/tables/{{study}}.html", caption="../report/table.rst", category="Tables",
               labels={"study": "{study}", "table": "ours (and the paper's cells beside them)"}),
        f"{RESULTS}/tables/paper/{{study}}.md",
        report(f"{RESULTS}/tables/paper/{{study}}.html", caption="../report/paper_table.rst", category="Tables",
               labels={"study": "{study}", "table": "the paper's cells without a run of ours"}),
        report(f"{RESULTS}/plots/{{study}}.png", caption="../report/plot.rst", category="Plots",
               labels={"study": "{study}", "figure": "headline per setting"}),
        f"{RESULTS}/plots/{{study}}.pdf",
    params:
        table=lambda wildcards: f"{RESULTS}/tables/{wildcards.study}",
        paper=lambda wildcards: f"{RESULTS}/tables/paper/{wildcards.study}",
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
        "mmrepro report --table {params.table} --paper-table {params.paper} --plot {params.plot} {params.reference}"
        " --groups {params.groups} {params.paired} {input.metrics} > {log} 2>&1"


rule paired_plot:
    input:
        lambda wildcards: study_metrics(wildcards.study),
    output:
        report(f"{RESULTS}/plots/{{study}}_paired.png", caption="../report/paired.rst", category="Plots",
               labels={"study": "{study}", "figure": "paired differences"}),
        f"{RESULTS}/plots/{{study}}_paired.pdf",
    params:
        plot=lambda wildcards, output: str(Path(output[0]).with_suffix("")),
        reference=lambda wildcards: paired_reference(config, wildcards.study),
        groups=lambda wildcards: report_groups(wildcards.study),
    wildcard_constraints:
        study="balance|missing|shift|peft",
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/report/{{study}}_paired.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "mmrepro paired-plot --plot {params.plot} --paired-with {params.reference} --groups {params.groups}"
        " {input} > {log} 2>&1"


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
        table=multiext(f"{RESULTS}/tables/missing_cases", ".md", ".csv"),
        html=report(f"{RESULTS}/tables/missing_cases.html", caption="../report/missing_cases.rst",
                    category="Tables", labels={"study": "missing", "table": "per available set (MPLMM Table 1)"}),
        # only the curves that will have a line (mmrepro.report.missing.planned_curves): no blank figure
        **{
            curve: [
                report(f"{RESULTS}/plots/{stem}.png", caption="../report/missing_curves.rst", category="Plots",
                       labels={"study": "missing", "figure": f"against the {MISSING_CURVE_X[curve]}"}),
                f"{RESULTS}/plots/{stem}.pdf",
            ]
            for curve, stem in missing_curves().items()
        },
    params:
        # the output stems, derived from the outputs (a hard-coded prefix breaks without a shared filesystem)
        table=lambda wildcards, output: str(Path(output.html).with_suffix("")),
        curves=lambda wildcards, output: " ".join(
            f"{MISSING_CURVE_OPTIONS[c]} {Path(getattr(output, c)[0]).with_suffix('')}" for c in missing_curves()
        ),
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
        "mmrepro missing-report --table {params.table} {params.curves} {params.reference} --groups {params.groups}"
        " {input.metrics} > {log} 2>&1"


rule cggm_report:
    input:
        lambda wildcards: study_metrics("balance"),
    output:
        table=report(f"{RESULTS}/tables/balance_cggm.md", caption="../report/cggm.rst", category="Tables",
                     labels={"study": "balance", "table": "CGGM Tables 5 and 6"}),
        # Figure 5 only where a CGGM run beside joint training gives it a point (no blank figure)
        **(
            {
                "plot": [
                    report(f"{RESULTS}/plots/balance_cggm.png", caption="../report/cggm.rst", category="Plots",
                           labels={"study": "balance", "figure": "CGGM Figure 5"}),
                    f"{RESULTS}/plots/balance_cggm.pdf",
                ]
            }
            if cggm_figure()
            else {}
        ),
    params:
        table=lambda wildcards, output: str(Path(output.table).with_suffix("")),
        plot=lambda wildcards, output: str(Path(output.table).parent.parent / "plots" / "balance_cggm"),
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
