"""Config validation: defaults filled from the schema; bad configs fail naming the key."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import yaml

from conftest import REPO, SCHEMA, default_config
from mmrepro.config import (ConfigError, backbone_spec, dataset_spec, load_schema, merge_config, run_spec,
                            study_grid, train_config, validate_config)
from mmrepro.spec import DataSetting, MethodPlan


def test_default_config_is_valid_and_defaults_are_filled():
    config = default_config()
    assert config["resources"]["train"]["threads"] == 1
    assert config["train"]["device"] == "auto"
    assert config["datasets"]["synth"]["synth"]["modalities"][1]["events"] == 4


def test_minimal_config_gets_every_default():
    config = validate_config({"datasets": {"synth": {"loader": "synth"}},
                              "studies": {"balance": {"datasets": ["synth"], "methods": ["joint"],
                                                      "settings": {"complete": {"type": "complete"}}}}},
                             load_schema(SCHEMA))
    assert config["seeds"] == [0, 1, 2]
    assert config["datasets"]["synth"]["synth"]["n"] == {"train": 2000, "valid": 500, "test": 1000}
    assert config["model"]["backbone"] == "late"


def _broken(mutate) -> str:
    config = default_config()
    raw = copy.deepcopy(config)
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        validate_config(raw, load_schema(SCHEMA))
    return str(err.value)


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["studies"]["balance"].update(methods=["joint", "no_such_method"]), "studies.balance.methods[1]"),
    (lambda c: c["studies"]["balance"]["datasets"].append("imagenet"), "studies.balance.datasets[1]"),
    (lambda c: c["studies"]["missing"]["settings"]["rate0.7"].update(rate=-0.1), "studies.missing.settings.rate0.7.rate"),
    (lambda c: c["studies"]["missing"]["settings"]["rate0.7"].update(type="blur"), "studies.missing.settings.rate0.7.type"),
    (lambda c: c["studies"]["missing"]["settings"]["rate0.7"].update(redraw="never"),
     "studies.missing.settings.rate0.7.redraw"),
    (lambda c: c["studies"]["shift"]["settings"]["target_all"].update(domian="x"), "studies.shift.settings.target_all"),
    (lambda c: c["train"].update(lr=-1), "train.lr"),
    (lambda c: c["studies"]["balance"]["settings"].update(only_x={"type": "subset", "modalities": ["smell"]}),
     "studies.balance.settings.only_x"),
    (lambda c: c["studies"]["balance"]["settings"]["complete"].update(methods=["full_finetune"]),
     "studies.balance.settings.complete.methods[0]"),
    (lambda c: c["studies"]["shift"]["settings"]["target_all"].update(domain="mars"), "studies.shift.settings.target_all.domain"),
    (lambda c: c["studies"]["balance"]["settings"]["complete"].update(datasets=["mosi"]),
     "studies.balance.settings.complete.datasets[0]"),
    (lambda c: c["datasets"].update(mosi={"loader": "mmsa"}), "datasets.mosi"),
    (lambda c: c["studies"]["balance"].update(per_dataset={"mosi": {}}), "studies.balance.per_dataset.mosi"),
    (lambda c: c["studies"]["missing"].update(report_groups={"emotions": ["synth", "iemocap_mmin_happy"]}),
     "studies.missing.report_groups.emotions[1]"),
    (lambda c: c["studies"]["missing"].update(report_groups={"synth": ["synth"]}), "studies.missing.report_groups.synth"),
    (lambda c: c["studies"]["missing"].update(report_groups={"emotions": []}), "studies.missing.report_groups.emotions"),
    (lambda c: c["studies"]["balance"].update(per_dataset={"synth": {"train": {"lr": -1}}}),
     "studies.balance.per_dataset.synth.train.lr"),
    (lambda c: c["studies"]["balance"].update(per_dataset={"synth": {"model": {"widht": 3}}}),
     "studies.balance.per_dataset.synth.model"),
    (lambda c: c["studies"]["balance"].update(per_dataset={"synth": {"model": {"backbone": "resnet"}}}),
     "studies.balance.per_dataset.synth.model.backbone"),
    (lambda c: c["studies"]["balance"].update(per_dataset={"synth": {"methods": {"cggm": {"rhoo": 1.0}}}}),
     "studies.balance.per_dataset.synth.methods.cggm"),
    (lambda c: c["datasets"].update(mosi={"loader": "mmsa", "path": "a.pkl", "source": {"sha256": "abc"}}),
     "datasets.mosi.source.sha256"),
    (lambda c: c["studies"].update(imagenet={}), "studies"),
    (lambda c: c["model"].update(backbone="resnet"), "studies.balance.model.backbone"),
    (lambda c: c["methods"].update(cggmm={"rho": 1.0}), "methods.cggmm"),
    (lambda c: c["methods"].update(joint={"rho": 1.0}), "methods.joint"),
    (lambda c: c["datasets"]["synth"]["synth"]["interaction"].update(modalities=["text", "smell"]),
     "datasets.synth.synth.interaction.modalities"),
])
def test_bad_config_names_the_key(mutate, key):
    assert f"config key {key}" in _broken(mutate)


def test_unknown_method_message_lists_known_methods():
    message = _broken(lambda c: c["studies"]["balance"].update(methods=["cgm"]))
    assert "unknown method 'cgm'" in message and "joint" in message


def test_run_spec_resolves_plug_ins_and_setting():
    spec = run_spec(default_config(), "missing", "synth", "modality_dropout", "rate0.7", 2)
    assert spec.plan == MethodPlan(transform="modality_dropout", hook="joint", adapter="source_only")
    assert spec.data_setting == DataSetting(type="missing",
                                            params={"rate": 0.7, "test_rates": [0.0, 0.3, 0.5, 0.7, 0.9]})
    assert spec.seed == 2 and spec.task == "main"


def test_study_grid_is_the_full_product():
    config = default_config()
    grid = study_grid(config, "missing")
    assert len(grid) == len(config["seeds"]) * 3
    assert {g["method"] for g in grid} == {"mplmm", "modality_dropout", "modality_substitution"}


def test_a_setting_can_restrict_its_methods():
    config = default_config()
    balance = config["studies"]["balance"]
    balance["methods"] = ["joint", "full_finetune"]
    balance["settings"] = {"complete": {"type": "complete"},
                           "only_text": {"type": "subset", "modalities": ["text"], "methods": ["joint"]}}
    validate_config(config, load_schema(SCHEMA))
    runs = {(r["method"], r["setting"]) for r in study_grid(config, "balance")}
    assert runs == {("joint", "complete"), ("full_finetune", "complete"), ("joint", "only_text")}
    spec = run_spec(config, "balance", "synth", "joint", "only_text", 0)
    assert spec.data_setting == DataSetting(type="subset", params={"modalities": ["text"]})


def test_a_setting_can_restrict_its_datasets():
    config = default_config()
    config["datasets"]["food"] = {"loader": "food101", "path": "food101", "task": "label"}
    balance = config["studies"]["balance"]
    balance["datasets"] = ["synth", "food"]
    balance["settings"] = {"complete": {"type": "complete"},
                           "only_audio": {"type": "subset", "modalities": ["audio"], "datasets": ["synth"]}}
    validate_config(config, load_schema(SCHEMA))
    runs = {(r["dataset"], r["setting"]) for r in study_grid(config, "balance")}
    assert runs == {("synth", "complete"), ("food", "complete"), ("synth", "only_audio")}
    assert run_spec(config, "balance", "synth", "joint", "only_audio", 0).data_setting.params == {
        "modalities": ["audio"]}


def test_raw_paths_live_under_data_root_unless_absolute():
    config = default_config()
    config["data_root"] = "/data/mm"
    config["datasets"]["mosi"] = {"loader": "mmsa", "path": "MOSI/unaligned_50.pkl"}
    config["datasets"]["own"] = {"loader": "mult", "path": "/elsewhere/mosi_data.pkl"}
    validate_config(config, load_schema(SCHEMA))
    assert dataset_spec(config, "mosi")["path"] == "/data/mm/MOSI/unaligned_50.pkl"
    assert dataset_spec(config, "mosi")["checksums"] == "/data/mm/checksums.json"
    assert "synth" not in dataset_spec(config, "mosi"), "generator defaults mean nothing to a real dataset"
    assert dataset_spec(config, "own")["path"] == "/elsewhere/mosi_data.pkl"
    assert "path" not in dataset_spec(config, "synth")


def test_per_dataset_overrides_apply_over_study_and_top_level():
    config = default_config()
    config["datasets"]["mosi"] = {"loader": "mult", "path": "mosi_data.pkl", "task": "sentiment"}
    config["methods"]["cggm"] = {"rho": 1.3, "lam": 0.2}
    balance = config["studies"]["balance"]
    balance["datasets"] = ["synth", "mosi"]
    balance["train"] = {"epochs": 7}
    balance["per_dataset"] = {"mosi": {"train": {"batch_size": 24, "lr": 0.01}, "model": {"d_model": 40},
                                       "methods": {"cggm": {"lam": 0.05}}}}
    validate_config(config, load_schema(SCHEMA))
    mosi = run_spec(config, "balance", "mosi", "cggm", "complete", 0)
    synth = run_spec(config, "balance", "synth", "cggm", "complete", 0)
    assert (mosi.train.batch_size, mosi.train.lr, mosi.train.epochs) == (24, 0.01, 7)
    assert (synth.train.batch_size, synth.train.lr, synth.train.epochs) == (64, 0.001, 7)
    assert mosi.model.d_model == 40 and synth.model.d_model == 32
    assert mosi.method_params["cggm"] == {"rho": 1.3, "lam": 0.05}
    assert synth.method_params["cggm"] == {"rho": 1.3, "lam": 0.2}


def test_segmentation_datasets_accept_only_the_methods_their_model_supports():
    config = default_config()
    config["datasets"]["brats"] = {"loader": "brats", "path": "brats2021", "task": "seg"}
    balance = config["studies"]["balance"]
    balance["datasets"] = ["synth", "brats"]
    balance["methods"] = ["joint", "ogm_ge"]
    with pytest.raises(ConfigError, match=r"config key studies.balance.methods\[1\]: on dataset 'brats'.*ogm_ge"):
        validate_config(copy.deepcopy(config), load_schema(SCHEMA))
    balance["settings"] = {"complete": {"type": "complete", "datasets": ["synth"]},
                           "volumes": {"type": "complete", "datasets": ["brats"], "methods": ["joint"]}}
    validate_config(config, load_schema(SCHEMA))
    assert {(r["dataset"], r["method"]) for r in study_grid(config, "balance")} == {
        ("synth", "joint"), ("synth", "ogm_ge"), ("brats", "joint")}


def test_accuracy_selection_is_refused_on_a_segmentation_dataset_naming_the_key():
    config = default_config()
    config["datasets"]["brats"] = {"loader": "brats", "path": "brats2021", "task": "seg"}
    balance = config["studies"]["balance"]
    balance.update(datasets=["synth", "brats"], train={"selection": "valid_accuracy"})
    with pytest.raises(ConfigError, match=r"config key studies.balance.train.selection: .*dataset 'brats'"):
        validate_config(copy.deepcopy(config), load_schema(SCHEMA))
    balance["per_dataset"] = {"brats": {"train": {"selection": "valid_loss"}}}  # as paper.yaml's brats2021
    checked = validate_config(copy.deepcopy(config), load_schema(SCHEMA))
    assert run_spec(checked, "balance", "synth", "joint", "complete", 0).train.selection == "valid_accuracy"
    config["studies"]["balance"]["per_dataset"]["brats"]["train"]["selection"] = "valid_acc"
    with pytest.raises(ConfigError, match=r"config key studies.balance.per_dataset.brats.train.selection: 'valid_acc'"):
        validate_config(config, load_schema(SCHEMA))


def test_paper_studies_train_their_source_models_as_the_released_code():
    """CGGM (balance) and CASP (shift) keep the epoch of the best validation accuracy, MPLMM (missing) the
    lowest validation loss; none of the three codes shuffles; CGGM's BraTS rule never fires (loss there)."""
    config = merge_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()),
                          yaml.safe_load((REPO / "config" / "paper.yaml").read_text()))
    config = validate_config(config, load_schema(SCHEMA))
    rules = {(study, ds): (train_config(config, study, ds)["selection"], train_config(config, study, ds)["shuffle"])
             for study in ("balance", "missing", "shift") for ds in config["studies"][study]["datasets"]}
    assert rules.pop(("balance", "brats2021")) == ("valid_loss", False)
    assert {rule for (study, _), rule in rules.items() if study in ("balance", "shift")} == {("valid_accuracy", False)}
    assert {rule for (study, _), rule in rules.items() if study == "missing"} == {("valid_loss", False)}
    assert backbone_spec(config, "shift", "mosi_casp", 0, "casp_early").train.selection == "valid_accuracy"


def test_paper_balance_grid_has_every_row_of_cggm_tables():
    """CGGM's Sec. 4.3 baselines (cggm.md) and CGGM on each sequence dataset of the paper, the unimodal
    rows on every modality, and Table 6's ablation on IEMOCAP; none dropped for a backbone it lacks."""
    config = merge_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()),
                          yaml.safe_load((REPO / "config" / "paper.yaml").read_text()))
    grid = study_grid(validate_config(config, load_schema(SCHEMA)), "balance")
    complete = {(r["dataset"], r["method"]) for r in grid if r["setting"] == "complete"}
    baselines = ["joint", "mrd", "mslr", "gblending", "greedy", "ogm_ge", "agm", "pmr", "umt", "ume", "qmf",
                 "reconboost"]
    for dataset, modalities in (("mosi_mult", 3), ("iemocap_mmin", 3), ("food101", 2)):
        assert {(dataset, m) for m in [*baselines, "cggm"]} <= complete, dataset
        unimodal = {r["setting"] for r in grid if r["dataset"] == dataset and r["setting"].startswith("only_")}
        assert len(unimodal) == modalities, dataset
    ablation = {r["method"] for r in grid if r["dataset"] == "iemocap_mmin" and r["setting"] == "ablation"}
    assert ablation == {"cggm_magnitude", "cggm_direction"}


def test_a_top_level_key_reaches_a_study_that_overrides_other_keys_of_its_section():
    """A study's model/train sections hold only what is written there: the schema's defaults filled in
    them used to hide the top level's keys (a top-level dropout or max_steps never reached them)."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["model"]["dropout"], config["train"]["max_steps"] = 0.3, 2
    config = validate_config(config, load_schema(SCHEMA))
    assert config["studies"]["missing"]["model"] == {"backbone": "mplmm_mult", "d_model": 8, "layers": 1, "heads": 2}
    spec = run_spec(config, "missing", "synth", "mplmm", "rate0.7", 0)
    assert (spec.model.dropout, spec.train.max_steps, spec.train.epochs, spec.model.d_model) == (0.3, 2, 6, 8)


def test_a_setting_naming_a_modality_a_real_dataset_lacks_fails_at_config_time():
    """paper.yaml's only_text ran on BraTS (MRI sequences, no text) until the check knew each loader's modalities."""
    config = default_config()
    config["datasets"]["brats"] = {"loader": "brats", "path": "brats2021", "task": "seg"}
    config["studies"]["balance"].update(datasets=["synth", "brats"], settings={
        "complete": {"type": "complete"}, "only_text": {"type": "subset", "modalities": ["text"], "methods": ["joint"]}})
    with pytest.raises(ConfigError, match=r"config key studies.balance.settings.only_text: on dataset 'brats': "
                                          r"subset.modalities: \['text'\] not in the dataset's modalities"):
        validate_config(config, load_schema(SCHEMA))
    config["studies"]["balance"]["settings"]["only_text"]["datasets"] = ["synth"]
    validate_config(config, load_schema(SCHEMA))


def test_paper_grid_runs_casp_at_its_codes_budget_not_the_demos():
    """paper.yaml inherited config.yaml's demo budget for CASP (3 epochs, snapshot every 1, 1 pseudo-label
    epoch) although its comment said the code's defaults: found reading the rehearsal's run specs."""
    config = {}
    for name in ("config.yaml", "paper.yaml"):
        merge_config(config, yaml.safe_load((REPO / "config" / name).read_text()))
    config = validate_config(config, load_schema(SCHEMA))
    spec = run_spec(config, "shift", "mosi_casp", "casp", "to_sims", 0, "casp_late")
    assert spec.method_params["casp"] == {"epochs": 15, "snapshot_every": 3, "pl_epochs": 5}
def test_a_jobs_spec_file_is_named_by_its_content_and_written_once(tmp_path):
    """The rules pass this short path instead of the JSON: a changed spec is another path (Snakemake's
    params trigger reruns the job), an unchanged one the same file; a dry run writes nothing."""
    from mmrepro.config import spec_file
    from mmrepro.spec import RunSpec
    config = {**default_config(), "results": str(tmp_path / "results")}
    spec = run_spec(config, "balance", "synth", "joint", "complete", 0)
    changed = replace(spec, seed=1)
    assert spec_file(config, spec.to_json(), write=False) == spec_file(config, spec.to_json(), write=False)
    assert not (tmp_path / "results").exists()
    path = spec_file(config, spec.to_json())
    assert RunSpec.from_json(open(path).read()) == spec and path.startswith(f"{tmp_path}/results/specs/")
    assert spec_file(config, changed.to_json()) != path and len(list((tmp_path / "results" / "specs").iterdir())) == 2
