# Every rule of the pipeline for one config: the Snakefile includes it for the run's config, and
# rules/claims.smk loads it once more as the module `ledger` for the claims ledger's config.


include: "common.smk"
include: "data.smk"
include: "tracking.smk"
include: "train.smk"
include: "tune.smk"
include: "evaluate.smk"
include: "report.smk"
include: "mechanisms.smk"
