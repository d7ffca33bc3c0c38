"""The claims ledger: each paper's headline claim as data, and the pipeline config that decides it.

``config/claims.yaml`` (schema: ``workflow/schemas/claims.schema.yaml``) holds the claims (study,
dataset and settings where the phenomenon is present, method, its released-code variant, rivals,
metrics), the ledger's own pipeline config and named budgets. :func:`ledger_config` builds the
ledger's config from that file alone, plus the run's :data:`MACHINE_KEYS` (where and how jobs run,
not what they compute), so that the ledger does not change with the experiment files a run layers;
the chosen budget goes on top and the results go to ``<results>/claims``. The Snakefile runs that config as a module (its rules named
``ledger_*``), so the ledger's searches, backbones, final runs and study tables are the pipeline's
own jobs; :func:`ledger_spec` is what the ledger table (:mod:`mmrepro.report.ledger`) needs.

Every study a claim names must search every method at one budget (``tune: equal``) and the budget
must give at least ``min_seeds`` seeds, so that no verdict rests on a method tuned while its rival
was not or on a handful of seeds.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from mmrepro.config import (EQUAL_BUDGET, ConfigError, _Validator, _key, expand_variants, merge_config,
                            model_config, study_grid, study_task, train_config, tuned_methods, validate_config)
from mmrepro.mechanisms import DOSE_KEYS
from mmrepro.methods.registry import resolve_method

#: Where the ledger's runs go, under the run's results folder.
LEDGER_FOLDER = "claims"
#: Keys of the run's config the ledger keeps: the machine's, not the experiment's.
MACHINE_KEYS = ("data_root", "tracking", "resources", "claims")


@dataclass(frozen=True)
class Claim:
    """One paper's claim: ``method`` (and its released-code form) against each rival, per setting and metric."""

    id: str
    paper: str
    wording: str
    study: str
    dataset: str
    settings: list[str]
    method: str
    rivals: list[str]
    metrics: list[str]
    split: str = "test"
    code_variant: str | None = None
    dose: str = ""


def load_claims(path: Path | str, schema: dict[str, Any]) -> dict[str, Any]:
    """``claims.yaml`` checked against its schema (defaults filled); errors name the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config key claims.file: {path} does not exist")
    doc = yaml.safe_load(path.read_text())
    errors = sorted(_Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(f"{path}: invalid claims ledger:\n  " +
                          "\n  ".join(f"key {_key(e.absolute_path)}: {e.message}" for e in errors))
    return doc


def ledger_config(config: dict[str, Any], doc: dict[str, Any], schema: dict[str, Any], where: str) -> dict[str, Any]:
    """The ledger's pipeline config: the file's ``config`` over the run's :data:`MACHINE_KEYS`, the budget
    ``config["claims"]["budget"]`` on top, results under ``<results>/claims``; validated, and every
    claim checked against it. ``where`` (the claims file) prefixes every error."""
    name = config["claims"]["budget"]
    if name not in doc["budgets"]:
        raise ConfigError(f"config key claims.budget: {name!r} is not a budget of {where}; it has {sorted(doc['budgets'])}")
    ledger = {key: copy.deepcopy(config[key]) for key in MACHINE_KEYS}
    merge_config(ledger, doc["config"])
    merge_config(ledger, {k: v for k, v in doc["budgets"][name].items() if k != "description"})
    ledger["results"] = f"{config['results']}/{LEDGER_FOLDER}"
    try:
        validate_config(ledger, schema)
        claims = [_claim(ledger, c, i) for i, c in enumerate(doc["claims"])]
        _check_budget(ledger, doc, claims)
    except (ConfigError, jsonschema.ValidationError) as e:
        raise ConfigError(f"{where} (budget {name!r}): {e}") from None
    return ledger


def _claim(ledger: dict[str, Any], entry: dict[str, Any], i: int) -> Claim:
    """A claims.yaml entry as a :class:`Claim`, its names checked against the ledger's study."""
    key = f"claims[{i}]"
    study = ledger["studies"].get(entry["study"])
    if study is None:
        raise ConfigError(f"key {key}.study: {entry['study']!r} is not a study of the ledger's config "
                          f"{sorted(ledger['studies'])}")
    if entry["dataset"] not in study["datasets"]:
        raise ConfigError(f"key {key}.dataset: {entry['dataset']!r} is not one of studies.{entry['study']}.datasets "
                          f"{study['datasets']}")
    for j, setting in enumerate(entry["settings"]):
        if setting not in study["settings"]:
            raise ConfigError(f"key {key}.settings[{j}]: {setting!r} is not one of studies.{entry['study']}.settings "
                              f"{sorted(study['settings'])}")
    methods = [("method", entry["method"]), *((f"rivals[{j}]", r) for j, r in enumerate(entry["rivals"]))]
    if "code_variant" in entry:
        methods.append(("code_variant", entry["code_variant"]))
        if entry["code_variant"] not in ledger["method_variants"]:
            raise ConfigError(f"key {key}.code_variant: {entry['code_variant']!r} is not a method_variants name of "
                              f"the ledger's config")
    for where, method in methods:
        if method not in study["methods"]:
            raise ConfigError(f"key {key}.{where}: {method!r} is not one of studies.{entry['study']}.methods "
                              f"{study['methods']}")
        runs = {r["setting"] for r in study_grid(ledger, entry["study"])
                if r["method"] == method and r["dataset"] == entry["dataset"]}
        for setting in entry["settings"]:
            if setting not in runs:
                raise ConfigError(f"key {key}.{where}: {method!r} does not run setting {setting!r} on dataset "
                                  f"{entry['dataset']!r}")
    if entry["method"] in entry["rivals"]:
        raise ConfigError(f"key {key}.rivals: the claim's method {entry['method']!r} is among its rivals")
    return Claim(**entry, dose=claim_dose(ledger, entry))


def claim_dose(ledger: dict[str, Any], entry: dict[str, Any]) -> str:
    """Where the claim is decided, as the mechanisms sweep's dose (:data:`mmrepro.mechanisms.DOSE_KEYS`)."""
    study, key = entry["study"], DOSE_KEYS[entry["study"]]
    if study in ("balance", "peft"):
        value = ledger["datasets"][entry["dataset"]]["synth"][key]
        return f"{entry['dataset']}: synth.{key} = {value:g}"
    settings = ledger["studies"][study]["settings"]
    if study == "missing":
        return "; ".join(f"{s}: missing rate {settings[s].get('rate', 0.7):g}" for s in entry["settings"])
    domains = ledger["datasets"][entry["dataset"]]["synth"]["domains"]
    return "; ".join(f"{s}: domain {settings[s]['domain']} at scale {domains[settings[s]['domain']]['scale']:g}"
                     if settings[s]["domain"] in domains else f"{s}: domain {settings[s]['domain']}"
                     for s in entry["settings"])


def _check_budget(ledger: dict[str, Any], doc: dict[str, Any], claims: list[Claim]) -> None:
    """A claim's study searches every method at one budget, and the final runs have enough seeds."""
    if len(ledger["seeds"]) < doc["min_seeds"]:
        raise ConfigError(f"key seeds: the ledger's final runs need at least min_seeds = {doc['min_seeds']} seeds, "
                          f"the budget gives {len(ledger['seeds'])}")
    for claim in claims:
        tune = ledger["studies"][claim.study]["tune"]
        if tune != EQUAL_BUDGET:
            raise ConfigError(f"key config.studies.{claim.study}.tune: claim {claim.id!r} is decided on tuned runs at "
                              f"one budget; set it to {EQUAL_BUDGET!r} (it is {tune!r})")


def ledger_claims(ledger: dict[str, Any], doc: dict[str, Any]) -> list[Claim]:
    """The claims of ``doc`` against the (already checked) ledger config."""
    return [_claim(ledger, c, i) for i, c in enumerate(doc["claims"])]


def budget_lines(ledger: dict[str, Any], doc: dict[str, Any], claims: list[Claim]) -> list[str]:
    """The budget each claim's study ran at, in words (the ledger table's caption)."""
    name = ledger["claims"]["budget"]
    lines = [f"Budget {name!r}: {doc['budgets'][name]['description'].strip()}",
             f"Seeds of the final runs: {len(ledger['seeds'])} ({', '.join(map(str, ledger['seeds']))}); "
             f"every method of a study searched with {ledger['tune']['trials']} Optuna trials (the paper's "
             f"hyperparameters first), scored on validation only."]
    for study in dict.fromkeys(c.study for c in claims):
        cfg = ledger["studies"][study]
        datasets = {c.dataset for c in claims if c.study == study}
        n = ", ".join(f"{d} {ledger['datasets'][d]['synth']['n']['train']}" for d in sorted(datasets)
                      if ledger["datasets"][d]["loader"] == "synth")
        train, model = train_config(ledger, study), model_config(ledger, study)
        sizes = sorted({len(ledger["tune"]["space"][m]) for m in tuned_methods(ledger, study)})
        extra = ""
        if study == "shift":
            adapters = {p: ledger["methods"].get(p, {}) for p in
                        {resolve_method(expand_variants(ledger, m)[0]).adapter for m in cfg["methods"]}}
            casp = adapters.get("casp")
            if casp:
                extra = (f"; CASP {casp.get('epochs', 15)} contrastive epochs, snapshot every "
                         f"{casp.get('snapshot_every', 3)}, {casp.get('pl_epochs', 5)} pseudo-label epochs")
        backbones = " and ".join(cfg.get("backbones") or [model["backbone"]])
        lines.append(f"{study}: {len(cfg['methods'])} methods, each searched over {'/'.join(map(str, sizes))} "
                     f"parameter(s); training samples {n}; {backbones} d_model {model['d_model']}, "
                     f"{train['epochs']} epochs (patience {train['patience']}), batch {train['batch_size']}{extra}.")
    return lines


def ledger_spec(ledger: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """What the ledger table needs: the claims, the bootstrap, the budget's caption, and each study's task."""
    claims = ledger_claims(ledger, doc)
    return {"claims": [asdict(c) for c in claims], "bootstrap": doc["bootstrap"],
            "budget": budget_lines(ledger, doc, claims),
            "tasks": {c.id: study_task(ledger, c.study, c.dataset) for c in claims}}


def ledger_runs(ledger: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run of the ledger's studies (the ledger table reads their metrics.json)."""
    return [run for study in ledger["studies"] for run in study_grid(ledger, study)]


def ledger_searches(ledger: dict[str, Any]) -> list[str]:
    """``<study>/<dataset>/<method>`` of every search of the ledger (their best.json feed the table)."""
    return [f"{study}/{dataset}/{method}" for study, cfg in ledger["studies"].items()
            for dataset in cfg["datasets"] for method in tuned_methods(ledger, study)]
