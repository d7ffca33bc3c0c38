# Mechanisms: each study's dose sweep on its synth setting (config key mechanisms), one job per
# (study, dose, seed) point, then one figure per study and a diagnostics table. Run it with
# `snakemake --cores all mechanisms`; the default target does not include it.


rule mechanism:
    output:
        f"{RESULTS}/mechanisms/{{study}}/dose{{dose}}/seed{{seed}}.json",
    params:
        spec=lambda wildcards: job_spec(
            mechanism_spec(config, wildcards.study, float(wildcards.dose), int(wildcards.seed)).to_json()
        ),
    wildcard_constraints:
        study="balance|missing|shift|peft",
        dose=r"[0-9.]+",
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/mechanisms/{{study}}/dose{{dose}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/mechanisms/{{study}}/dose{{dose}}/seed{{seed}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "mmrepro mechanism --spec {params.spec} --out {output} > {log} 2>&1"


rule mechanisms_report:
    input:
        [f"{RESULTS}/mechanisms/{p['study']}/dose{p['dose']}/seed{p['seed']}.json" for p in mechanism_points(config)],
    output:
        report(f"{RESULTS}/tables/mechanisms.md", caption="../report/mechanisms.rst", category="Mechanisms",
               labels={"table": "diagnostics"}),
        f"{RESULTS}/tables/mechanisms.csv",
        [
            f
            for study in config["mechanisms"]["studies"]
            for f in (
                report(f"{RESULTS}/plots/mechanisms/{study}.png", caption="../report/mechanisms.rst",
                       category="Mechanisms", labels={"study": study, "figure": "diagnostic and gains vs dose"}),
                f"{RESULTS}/plots/mechanisms/{study}.pdf",
            )
        ],
    params:
        table=lambda wildcards, output: Path(output[0]).with_suffix(""),
        plots=lambda wildcards, output: Path(output[2]).parent,
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/report/mechanisms.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "mmrepro mechanisms-report --table {params.table} --plots {params.plots} {input} > {log} 2>&1"


rule mechanisms:
    input:
        rules.mechanisms_report.output,
    localrule: True
