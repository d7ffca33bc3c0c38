# The claims ledger (config/claims.yaml, mmrepro.claims): every rule of the pipeline once more, as the
# module `ledger` on the ledger's config (its searches, backbones, final runs and study tables under
# <results>/claims, its rules named ledger_*), then one table of verdicts, results/tables/claims.md.
# `snakemake --cores all claims`; not part of the default target.
from mmrepro.claims import ledger_config, ledger_runs, ledger_searches, ledger_spec, load_claims

CLAIMS_FILE = claims_file()
CLAIMS = load_claims(CLAIMS_FILE, load_schema(Path(workflow.basedir) / "schemas" / "claims.schema.yaml"))
LEDGER = ledger_config(
    config, CLAIMS, load_schema(Path(workflow.basedir) / "schemas" / "config.schema.yaml"), str(CLAIMS_FILE)
)


module ledger:
    snakefile:
        "pipeline.smk"
    config:
        LEDGER


use rule * from ledger as ledger_*


rule claims_ledger:
    input:
        claims=str(CLAIMS_FILE),
        metrics=[f"{run_folder(LEDGER['results'], run)}/metrics.json" for run in ledger_runs(LEDGER)],
        searches=[f"{LEDGER['results']}/tune/{path}/best.json" for path in ledger_searches(LEDGER)],
    output:
        table=[
            report(f"{RESULTS}/tables/claims.md", caption="../report/claims.rst", category="Claims ledger",
                   labels={"table": "verdicts and comparisons"}),
            f"{RESULTS}/tables/claims.csv",
        ],
        plot=[
            report(f"{RESULTS}/plots/claims.png", caption="../report/claims.rst", category="Claims ledger",
                   labels={"figure": "paired differences per claim"}),
            f"{RESULTS}/plots/claims.pdf",
        ],
    params:
        spec=lambda wildcards: job_spec(json.dumps(ledger_spec(LEDGER, CLAIMS))),
        table=lambda wildcards, output: str(Path(output.table[0]).with_suffix("")),
        plot=lambda wildcards, output: str(Path(output.plot[0]).with_suffix("")),
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/report/claims.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        # the runs before --searches: a list option in front would take them all (argparse)
        "mmrepro claims --spec {params.spec} --table {params.table} --plot {params.plot} {input.metrics}"
        " --searches {input.searches} > {log} 2>&1"


rule claims:
    input:
        rules.claims_ledger.output,
        [getattr(rules, f"ledger_{study}").input for study in LEDGER["studies"]],
    localrule: True
