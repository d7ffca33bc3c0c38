"""The claims ledger's config (config/claims.yaml through mmrepro.claims), the equal-budget switch, and
that no search is tuned on test data: permuting the test labels leaves every search's trials unchanged."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from conftest import REPO, SCHEMA
from mmrepro import cli, tune
from mmrepro.claims import MACHINE_KEYS, ledger_config, ledger_spec, load_claims
from mmrepro.config import (EXPERIMENTS, ConfigError, backbone_spec, load_schema, search_spec, tuned_methods,
                            validate_config)
from mmrepro.data import build_store
from mmrepro.jobs import train_job
from mmrepro.tracking import init_store

CLAIMS = REPO / "config" / "claims.yaml"
CLAIMS_SCHEMA = REPO / "workflow" / "schemas" / "claims.schema.yaml"


def _run_config(**claims) -> dict:
    config = validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), load_schema(SCHEMA))
    config["claims"].update(claims)
    return config


def _ledger(doc: dict | None = None, **claims) -> dict:
    doc = doc or load_claims(CLAIMS, load_schema(CLAIMS_SCHEMA))
    return ledger_config(_run_config(**claims), doc, load_schema(SCHEMA), "claims.yaml")


# --- the ledger's config ----------------------------------------------------------------------------

def test_every_claim_is_decided_by_equal_budget_searches_over_enough_seeds():
    doc = load_claims(CLAIMS, load_schema(CLAIMS_SCHEMA))
    ledger = _ledger(doc)
    assert ledger["results"] == "results/claims" and len(ledger["seeds"]) >= doc["min_seeds"] >= 8
    spec = ledger_spec(ledger, doc)
    assert {c["paper"].split()[0] for c in spec["claims"]} == {"CGGM", "CASP", "MPLMM", "Wander"}
    for claim in spec["claims"]:
        study = ledger["studies"][claim["study"]]
        assert study["tune"] == "equal" and tuned_methods(ledger, claim["study"]) == study["methods"]
        sizes = {len(ledger["tune"]["space"][m]) for m in study["methods"]}
        assert len(sizes) == 1, (claim["id"], sizes)
        assert claim["dose"], "where the claim is decided, read from the ledger's config"
    assert {c["id"]: c.get("code_variant") for c in spec["claims"]} == {
        "cggm": None, "casp": "casp_code", "mplmm": "mplmm_zeros", "wander": "wander_code"}
    assert any("Budget 'ledger'" in line for line in spec["budget"])
    paper = _ledger(doc, budget="paper")
    assert paper["tune"]["trials"] > ledger["tune"]["trials"] and len(paper["seeds"]) >= len(ledger["seeds"])


def test_the_ledger_ignores_the_runs_experiment_keys_but_keeps_its_machine():
    config = _run_config()
    config["studies"]["balance"]["methods"] = ["joint"]
    config["train"]["epochs"] = 1
    config["tracking"]["mode"] = "live"
    ledger = ledger_config(config, load_claims(CLAIMS, load_schema(CLAIMS_SCHEMA)), load_schema(SCHEMA), "claims.yaml")
    assert "cggm" in ledger["studies"]["balance"]["methods"] and ledger["train"]["epochs"] != 1
    assert ledger["tracking"]["mode"] == "live" and set(MACHINE_KEYS) <= set(ledger)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["claims"][0].update(method="qmf"), "claims.yaml (budget 'ledger'): key claims[0].method: 'qmf' is not"),
    (lambda d: d["claims"][1].update(settings=["target_label"]), "key claims[1].settings[0]: 'target_label'"),
    (lambda d: d["claims"][3].update(code_variant="lora"), "key claims[3].code_variant: 'lora' is not a method_variants"),
    (lambda d: d["config"]["studies"]["balance"].update(tune=["cggm"]), "key config.studies.balance.tune"),
    (lambda d: d["budgets"]["ledger"].update(seeds=[0, 1]), "at least min_seeds = 8 seeds"),
    (lambda d: d["config"]["tune"]["space"]["cggm"].pop("methods.cggm.lam"),
     "config key studies.balance.tune: 'equal' searches every method over a space of the same size"),
    (lambda d: d["config"]["tune"].update(timeout=60), "config key tune.timeout"),
])
def test_a_bad_ledger_is_refused_naming_the_file_and_key(mutate, message):
    doc = load_claims(CLAIMS, load_schema(CLAIMS_SCHEMA))
    mutate(doc)
    with pytest.raises(ConfigError, match=re.escape(message)):
        _ledger(doc)
    with pytest.raises(ConfigError, match="config key claims.budget: 'huge' is not a budget"):
        _ledger(budget="huge")


# --- nothing is tuned on test data ------------------------------------------------------------------

TINY = {
    "seeds": [0],
    "datasets": {"synth": {"loader": "synth", "synth": {"n": {"train": 120, "valid": 48, "test": 48}}}},
    "model": {"d_model": 8, "heads": 2},
    "train": {"epochs": 2, "batch_size": 32},
    "methods": {"casp": {"epochs": 2, "snapshot_every": 1, "pl_epochs": 1}},
    # the released code's CASP picks checkpoints on target validation labels: searched like any method
    "method_variants": {"casp_code": {"method": "casp", "params": {"label_use": "official_code"}}},
    "tune": {"trials": 2, "sampler": {"n_startup_trials": 1},
             "space": {"cggm": {"train.lr": {"low": 0.0001, "high": 0.01, "log": True},
                                "methods.cggm.rho": {"low": 0.5, "high": 2.0}},
                       "casp_code": {"methods.casp.lr": {"low": 0.0001, "high": 0.01, "log": True}}}},
    "studies": {
        "balance": {"datasets": ["synth"], "methods": ["cggm"], "settings": {"complete": {"type": "complete"}},
                    "tune": "equal"},
        "shift": {"datasets": ["synth"], "methods": ["casp_code"], "model": {"backbone": "casp_late"},
                  "settings": {"target_all": {"type": "domain", "domain": "target_all"}}, "tune": "equal"},
    },
}


def _permute_test_labels(store: Path) -> int:
    """Shuffle every label array of every test split in place (same bytes, same shape); how many."""
    rng = np.random.default_rng(0)
    files = sorted(store.glob("test*/y/*.npy"))
    for path in files:
        labels = np.load(path)
        np.save(path, labels[rng.permutation(len(labels))])
    return len(files)


def _trials(results: Path, study: str, method: str, init: Path | None, uri: str) -> list[tuple[dict, float]]:
    config = validate_config({**copy.deepcopy(TINY), "results": str(results), "tracking": {"uri": uri}},
                             load_schema(SCHEMA))
    search = tune.create(search_spec(config, study, "synth", method))
    done = tune.work(search, 0, results / "data" / "synth" / "manifest.json", init, threads=1)
    assert done["states"] == {"COMPLETE": 2}
    found = optuna.load_study(study_name=search["name"], storage=tune._storage(search["storage"]))
    return [(t.params, t.value) for t in found.get_trials()] + [(found.best_trial.params, found.best_value)]


def test_permuting_the_test_labels_changes_no_search(tmp_path):
    original, permuted = tmp_path / "original", tmp_path / "permuted"
    config = validate_config({**copy.deepcopy(TINY), "results": str(original)}, load_schema(SCHEMA))
    build_store("synth", config["datasets"]["synth"], original / "data" / "synth")
    backbone = original / "backbones" / "shift"
    train_job(backbone_spec(config, "shift", "synth", 0), original / "data" / "synth" / "manifest.json", backbone,
              threads=1)
    shutil.copytree(original / "data", permuted / "data")
    before = np.load(permuted / "data" / "synth" / "test" / "y" / "main.npy")
    assert _permute_test_labels(permuted / "data" / "synth") >= 4  # test and test@<domain>, each task
    assert not np.array_equal(before, np.load(permuted / "data" / "synth" / "test" / "y" / "main.npy"))
    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"  # one store for all four searches
    init_store(uri, EXPERIMENTS, tmp_path / "mlartifacts")
    for study, method, init in (("balance", "cggm", None), ("shift", "casp_code", backbone / "model.pt")):
        ours, theirs = (_trials(root.resolve(), study, method, init, uri) for root in (original, permuted))
        assert [p for p, _ in ours] == [p for p, _ in theirs], f"{method}: the searches chose other parameters"
        assert [v for _, v in theirs] == pytest.approx([v for _, v in ours], rel=1e-6), f"{method}: trial scores moved"


# --- through Snakemake -------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_claims_target_plans_equal_searches_before_eight_seeds_of_final_runs(tmp_path):
    """`snakemake -n claims`: the ledger module's jobs under results/claims, one search per method of
    every study, final runs over every seed, then the ledger table; the default target has none of them."""
    def plan(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"),
                               "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml"),
                               "-n", "--cores", "1", *args], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    ledger = _ledger()
    methods = sum(len(s["methods"]) for s in ledger["studies"].values())
    planned = plan("claims")
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", planned, flags=re.M))
    assert int(counts["ledger_tune_best"]) == methods and int(counts["claims_ledger"]) == 1
    finals = int(counts["ledger_train"]) + int(counts["ledger_adapt"])
    assert finals % len(ledger["seeds"]) == 0 and finals >= 8 * methods
    # the table's command line parses into every final run and every search (a list option placed
    # before the runs once swallowed them, and the ledger's last job failed after hours of runs)
    command = re.search(r"^Shell command: (mmrepro claims .*?) >", planned, flags=re.M).group(1)
    words = shlex.split(command)[1:]
    words[words.index("--spec") + 1] = "{}"   # a dry run writes no spec file; the option reads JSON text too
    args = cli.parser().parse_args(words)
    assert len(args.metrics) == finals and len(args.searches) == methods
    assert not any(name.startswith(("ledger_", "claims")) for name in
                   dict(re.findall(r"^(\w+)\s+(\d+)$", plan(), flags=re.M)))
