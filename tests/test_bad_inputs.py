"""The bad-input catalogue: every case is rejected by the verb a rule would run, before any compute,
with a message naming what is wrong and where, and leaves no output behind.

The cases below are the catalogue; ``docs/bad_inputs.md`` is generated from them
(``python tests/test_bad_inputs.py > docs/bad_inputs.md``) and a test keeps the two in sync.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, SCHEMA, default_config, small_synth  # noqa: E402
from test_real_data import D_AUDIO, N, dump, mmsa_data, mmsa_split  # noqa: E402

DOC = REPO / "docs" / "bad_inputs.md"
STAGES = {
    "check-config": "config check (Snakefile parse, `mmrepro check-config`): no job starts",
    "make-data": "`mmrepro make-data` (the data rule), before the store is written",
    "train": "`mmrepro train` (train/backbone rules), before training or a tracking run starts",
    "adapt": "`mmrepro adapt` (adapt rule), before adaptation or a tracking run starts",
}


@dataclass(frozen=True)
class Case:
    id: str
    bad: str  # the bad input, in words
    verb: str  # the verb that rejects it (a key of STAGES)
    make: Callable[[Path], list[str]]  # writes the inputs under a folder, returns the verb's arguments
    names: tuple[str, ...]  # what the message must say: where, then what


# --- config cases: the default config, one thing broken ----------------------------------------


def config(mutate: Callable[[dict], None]) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
        mutate(raw)
        (tmp / "config.yaml").write_text(yaml.safe_dump(raw))
        return ["check-config", str(tmp / "config.yaml"), "--schema", str(SCHEMA)]
    return make


def config_text(text: str, *, name: str = "config.yaml") -> Callable[[Path], list[str]]:
    """check-config on the default config and a second file written as ``text`` (None: not written)."""
    def make(tmp: Path) -> list[str]:
        if text is not None:
            (tmp / name).write_text(text)
        return ["check-config", str(REPO / "config" / "config.yaml"), name, "--schema", str(SCHEMA)]
    return make


def _set(path: str, value) -> Callable[[dict], None]:
    """Set the config key at ``path`` (``/``-separated: names may hold dots)."""
    def mutate(c: dict) -> None:
        *parents, last = path.split("/")
        for key in parents:
            c = c.setdefault(key, {})
        c[last] = value
    return mutate


def _both(*mutations) -> Callable[[dict], None]:
    return lambda c: [m(c) for m in mutations]


# --- store cases: a tiny synth store and a run spec, one thing broken ---------------------------

_STORE: dict[str, Path] = {}  # the untouched tiny store, built once per module (fixture below)


@pytest.fixture(scope="module", autouse=True)
def _tiny_store(tmp_path_factory):
    from mmrepro.data import build_store
    _STORE["root"] = build_store("synth", small_synth(train=48, valid=24, test=24),
                                 tmp_path_factory.mktemp("tiny") / "synth").parent


def spec(tmp: Path, study: str = "balance", **changes) -> dict:
    """A run spec's JSON (what a rule passes) of a balance, peft (fine-tuning) or shift (adapting)
    run, keys changed as given."""
    from mmrepro.config import run_spec
    cfg = default_config()
    cfg["model"].update(d_model=8, heads=2)
    cfg["studies"]["shift"]["model"].update(d_model=8, heads=2, layers=1)
    cfg["train"].update(epochs=1, batch_size=16)
    method, setting = {"balance": ("joint", "complete"), "peft": ("full_finetune", "complete"),
                       "shift": ("source_only", "target_all")}[study]
    s = run_spec(cfg, study, "synth", method, setting, 0)
    return {**s.to_dict(), "results": str(tmp / "out"), **changes}


def store(corrupt: Callable[[Path], None] = lambda root: None, *, init: Callable[[Path], Path] | None = None,
          study: str = "balance", **spec_changes) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        root = tmp / "store"
        shutil.copytree(_STORE["root"], root)
        corrupt(root)
        args = ["train", "--spec", json.dumps(spec(tmp, study, **spec_changes)), "--data", str(root / "manifest.json"),
                "--out-dir", str(tmp / "out" / "run")]
        return args + (["--init", str(init(tmp))] if init else [])
    return make


def _edit(split: str, key: str, change: Callable[[np.ndarray], None]) -> Callable[[Path], None]:
    """Change values in place, keeping the file's size (what a stray script or bit rot does)."""
    def corrupt(root: Path) -> None:
        a = np.load(root / split / f"{key}.npy", mmap_mode="r+")
        change(a)
        a.flush()
    return corrupt


def _resave(split: str, key: str, change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def corrupt(root: Path) -> None:
        path = root / split / f"{key}.npy"
        size = path.stat().st_size
        np.save(path, change(np.load(path)))
        assert path.stat().st_size == size, "the case needs a same-size file"
    return corrupt


def _truncate(split: str, key: str) -> Callable[[Path], None]:
    def corrupt(root: Path) -> None:
        path = root / split / f"{key}.npy"
        path.write_bytes(path.read_bytes()[:-64])
    return corrupt


def _header(root: Path) -> None:
    path = root / "train" / "y" / "main.npy"
    raw = bytearray(path.read_bytes())
    raw[:6] = b"XXXXXX"
    path.write_bytes(bytes(raw))


def _saved(study: str = "shift", file: Callable[[Path], None] = lambda p: None, *, weights: bool = False,
           **model) -> Callable[[Path], Path]:
    """A model.pt as a training job writes it: the model the ``study``'s run starts from (its run
    spec's ``checkpoint``), model keys changed as given, then ``file`` applied to it. The check
    reads the recorded keys before any weight: the weights are left empty unless ``weights``."""
    def init(tmp: Path) -> Path:
        from mmrepro.data.store import FeatureStore
        from mmrepro.models.build import build_model
        start = spec(tmp, study)["checkpoint"]
        keys, path = {**start["model"], **model}, tmp / "model.pt"
        schema = FeatureStore(tmp / "store").schema
        state = build_model(schema, schema.task(start["task"]), **keys).state_dict() if weights else {}
        torch.save({"state_dict": state, "model": keys, "task": start["task"],
                    "transform": {"name": start["transform"], "params": {}}}, path)
        file(path)
        return path
    return init


def _task(task: str) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        torch.save({**torch.load(path), "task": task}, path)
    return change


def adapt(model: Callable[[Path], Path] = _saved(weights=True)) -> Callable[[Path], list[str]]:
    """An adapt job on the tiny store (shift's source_only on target_all), given ``model``."""
    def make(tmp: Path) -> list[str]:
        root = tmp / "store"
        shutil.copytree(_STORE["root"], root)
        return ["adapt", "--spec", json.dumps(spec(tmp, "shift")), "--data", str(root / "manifest.json"),
                "--model", str(model(tmp)), "--out-dir", str(tmp / "out" / "run")]
    return make


def _checkpoint(truncate: bool) -> Callable[[Path], Path]:
    """A checkpoint of another model (d_model 16, not 8), or a truncated one."""
    def init(tmp: Path) -> Path:
        from mmrepro.data.store import FeatureStore
        from mmrepro.models.build import build_model
        fs = FeatureStore(tmp / "store")
        model = build_model(fs.schema, fs.schema.task("main"), **{**spec(tmp)["model"], "d_model": 16})
        path = tmp / "backbone.pt"
        torch.save({"state_dict": model.state_dict()}, path)
        if truncate:
            path.write_bytes(path.read_bytes()[:200])
        return path
    return init


# --- raw-data cases: a small MMSA feature pickle, one thing broken ------------------------------


def raw(mutate: Callable[[dict], None] = lambda d: None, *, file: Callable[[Path], None] = lambda p: None,
        **entry) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        data = mmsa_data()
        mutate(data)
        path = dump(data, tmp / "raw" / "features.pkl")
        file(path)
        ds = {"loader": "mmsa", "path": str(path), "params": {}, "task": "sentiment", **entry}
        return ["make-data", "--dataset", "mosi", "--spec", json.dumps(ds), "--out",
                str(tmp / "out" / "mosi" / "manifest.json")]
    return make


def _halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_vision(d: dict) -> None:
    d["valid"]["vision"][0, 0, :2] = np.nan


def _label(d: dict) -> None:
    d["train"]["regression_labels"][2] = 3.5


CASES = [
    # config
    Case("missing_rate_above_1", "missing rate 1.5", "check-config",
         config(_set("studies/missing/settings/rate0.3/rate", 1.5)),
         ("config key studies.missing.settings.rate0.3.rate", "1.5")),
    Case("missing_rate_negative", "missing rate -0.2", "check-config",
         config(_set("studies/missing/settings/rate0.3/rate", -0.2)),
         ("config key studies.missing.settings.rate0.3.rate", "-0.2")),
    Case("lora_rank_0", "LoRA rank 0", "check-config",
         config(_both(_set("studies/peft/methods", ["full_finetune", "lora"]), _set("methods/lora", {"r": 0}))),
         ("config key methods.lora.r", "must be >= 1, got 0")),
    Case("heads_do_not_divide_d_model", "d_model 30 with 4 attention heads", "check-config",
         config(_set("model/d_model", 30)), ("config key studies.balance.model.heads", "not divisible")),
    Case("nan_learning_rate", "learning rate .nan", "check-config", config(_set("train/lr", float("nan"))),
         ("config key train.lr", "not a finite number")),
    Case("infinite_label_noise", "synth label_noise .inf", "check-config",
         config(_set("datasets/synth/synth/label_noise", float("inf"))),
         ("config key datasets.synth.synth.label_noise", "not a finite number")),
    Case("zero_epochs", "train.epochs 0", "check-config", config(_set("train/epochs", 0)),
         ("config key train.epochs", "minimum")),
    Case("dropout_above_1", "model.dropout 1.5", "check-config", config(_set("model/dropout", 1.5)),
         ("config key model.dropout", "maximum")),
    Case("misspelt_key", "train.epohcs (a typo)", "check-config", config(_set("train/epohcs", 3)),
         ("config key train", "'epohcs' was unexpected")),
    Case("unknown_method", "method `cgm`", "check-config", config(_set("studies/balance/methods", ["joint", "cgm"])),
         ("config key studies.balance.methods[1]", "unknown method 'cgm'")),
    Case("unknown_dataset", "study dataset `imagenet`", "check-config",
         config(_set("studies/balance/datasets", ["imagenet"])),
         ("config key studies.balance.datasets[0]", "unknown dataset 'imagenet'")),
    Case("unknown_backbone", "backbone `resnet`", "check-config", config(_set("model/backbone", "resnet")),
         ("config key studies.balance.model.backbone", "unknown backbone 'resnet'")),
    Case("unknown_setting_type", "setting type `blur`", "check-config",
         config(_set("studies/missing/settings/rate0.3/type", "blur")),
         ("config key studies.missing.settings.rate0.3.type", "unknown data setting 'blur'")),
    Case("unknown_subset_modality", "subset of modality `smell`", "check-config",
         config(_set("studies/balance/settings/only_smell", {"type": "subset", "modalities": ["smell"]})),
         ("config key studies.balance.settings.only_smell", "smell")),
    Case("unknown_domain", "domain `mars`", "check-config",
         config(_set("studies/shift/settings/target_all/domain", "mars")),
         ("config key studies.shift.settings.target_all.domain", "no domain 'mars'")),
    Case("unknown_method_parameter", "CGGM parameter `rhoo`", "check-config", config(_set("methods/cggm", {"rhoo": 1})),
         ("config key methods.cggm", "rhoo")),
    Case("real_dataset_without_path", "an mmsa dataset with no path", "check-config",
         config(_set("datasets/mosi", {"loader": "mmsa"})), ("config key datasets.mosi", "'path' is a required")),
    Case("method_parameter_a_word", "`methods.cggm.rho: high`", "check-config", config(_set("methods/cggm", {"rho": "high"})),
         ("config key methods.cggm.rho", "expected float > 0, got 'high'")),
    Case("method_parameter_decimal_comma", "`methods.cggm.rho: 1,3`", "check-config",
         config_text("methods:\n  cggm:\n    rho: 1,3\n"),
         ("config key methods.cggm.rho", "got '1,3'", "write a decimal point")),
    Case("method_parameter_out_of_range", "`methods.cggm.rho: -5`", "check-config", config(_set("methods/cggm", {"rho": -5})),
         ("config key methods.cggm.rho", "must be > 0, got -5")),
    Case("method_parameter_quoted_number", "`methods.lora.r: \"8\"`", "check-config", config(_set("methods/lora", {"r": "8"})),
         ("config key methods.lora.r", "expected int >= 1, got '8'", "without quotes")),
    Case("method_parameter_unused_plugin", "`methods.mean_teacher.ema: 1.5`, a plug-in no study runs", "check-config",
         config(_set("methods/mean_teacher", {"ema": 1.5})), ("config key methods.mean_teacher.ema", "must be in [0, 1)")),
    Case("adapter_choice_unknown", "`methods.casp.protocol: sometimes`", "check-config",
         config(_set("methods/casp", {"protocol": "sometimes"})),
         ("config key methods.casp.protocol", "must be one of ['offline', 'online']")),
    Case("variant_parameter_out_of_range", "`method_variants.<name>.params.lam: -1`", "check-config",
         config(_set("method_variants/cggm_neg", {"method": "cggm", "params": {"lam": -1}})),
         ("config key method_variants.cggm_neg.params.lam", "must be >= 0, got -1")),
    Case("search_range_outside_the_parameter", "tune space `methods.cggm.rho: {low: -1, high: 2}`", "check-config",
         config(_both(_set("studies/balance/tune", ["cggm"]),
                      _set("tune/space/cggm/methods.cggm.rho", {"low": -1.0, "high": 2.0}))),
         ("config key tune.space.cggm.methods.cggm.rho.low", "must be > 0")),
    Case("yaml_malformed", "a config file with an unclosed `{`", "check-config",
         config_text("results: out\nmethods:\n  cggm: {rho: 1.3\n"),
         ("config file config.yaml, line 4, column 1", "not valid YAML")),
    Case("yaml_tab_indent", "a config file indented with a tab", "check-config", config_text("train:\n\tlr: 0.1\n"),
         ("config file config.yaml, line 2, column 1", "'\\t'")),
    Case("config_not_a_mapping", "a config file holding a list", "check-config", config_text("- results\n"),
         ("config file config.yaml", "a YAML mapping")),
    Case("config_file_missing", "a config file that does not exist", "check-config", config_text(None, name="nothere.yaml"),
         ("config file nothere.yaml", "no such file")),
    Case("target_after_configfile", "a target after the config files (`... config.yaml balance`)", "check-config",
         config_text(None, name="balance"), ("config file balance", "put targets first")),
    Case("results_is_a_file", "`results:` names a file", "check-config",
         lambda tmp: (tmp.joinpath("taken").write_text("x"), config(_set("results", str(tmp / "taken")))(tmp))[1],
         ("config key results", "is a file, not a folder")),
    # raw data
    Case("raw_file_missing", "raw feature file absent", "make-data",
         raw(file=lambda p: p.unlink()), ("features.pkl", "missing; run `mmrepro fetch`")),
    Case("raw_pickle_truncated", "raw pickle cut in half", "make-data", raw(file=_halve),
         ("file=", "features.pkl", "cannot unpickle")),
    Case("raw_not_a_pickle", "raw file is text", "make-data", raw(file=lambda p: p.write_text("hello\n")),
         ("features.pkl", "cannot unpickle")),
    Case("raw_split_missing", "raw pickle lacks the test split", "make-data", raw(lambda d: d.pop("test")),
         ("split=test", "missing split")),
    Case("raw_nan_features", "NaN in raw vision features", "make-data", raw(_nan_vision),
         ("split=valid, key=vision", "non-finite")),
    Case("raw_label_out_of_range", "sentiment label 3.5 (range [-3, 3])", "make-data", raw(_label),
         ("split=train, key=y/sentiment", "labels must lie in [-3.0, 3.0]")),
    Case("raw_feature_dims_differ", "audio has 6 dims in valid, 5 in train", "make-data",
         raw(lambda d: d.update(valid=mmsa_split("valid", N["valid"], 1, d_audio=D_AUDIO + 1))),
         ("split=valid, key=x/audio", "expected shape (3, 10, 5), found (3, 10, 6)")),
    Case("raw_checksum_mismatch", "raw file differs from its published SHA-256", "make-data",
         raw(source={"sha256": "0" * 64}), ("features.pkl", "0000000000")),
    # feature store and run inputs
    Case("no_store", "no feature store (manifest.json absent)", "train",
         store(lambda root: (root / "manifest.json").unlink()), ("manifest.json", "manifest.json is missing")),
    Case("manifest_corrupt", "manifest.json cut short", "train",
         store(lambda root: (root / "manifest.json").write_text((root / "manifest.json").read_text()[:-30])),
         ("manifest.json", "not valid JSON")),
    Case("array_truncated", "an array file cut short", "train", store(_truncate("train", "x/text")),
         ("split=train, key=x/text", "truncated")),
    Case("array_missing", "an array file deleted", "train",
         store(lambda root: (root / "valid" / "len" / "audio.npy").unlink()),
         ("split=valid, key=len/audio", "array file is missing")),
    Case("array_header_damaged", "an .npy header overwritten", "train", store(_header),
         ("split=train, key=y/main", "unreadable array")),
    Case("array_wrong_shape", "features reshaped (same bytes)", "train",
         store(_resave("train", "x/text", lambda a: a.reshape(len(a), -1))),
         ("split=train, key=x/text", "expected [48, 20, 32] <f4, found [48, 640] <f4")),
    Case("array_wrong_dtype", "float features stored as int32 (same bytes)", "train",
         store(_resave("train", "x/text", lambda a: a.view(np.int32))),
         ("split=train, key=x/text", "found [48, 20, 32] <i4")),
    Case("store_nan_features", "NaN written into stored features", "train",
         store(_edit("train", "x/audio", lambda a: a.__setitem__((3, 0, 0), np.nan))),
         ("split=train, key=x/audio", "1 NaN/inf value(s)")),
    Case("store_inf_test_features", "inf in the test split (read only after training)", "train",
         store(_edit("test", "x/vision", lambda a: a.__setitem__((0, 1, 2), np.inf))),
         ("split=test, key=x/vision", "NaN/inf")),
    Case("store_label_out_of_range", "regression label 10 (range [-3, 3])", "train",
         store(_edit("valid", "y/main", lambda a: a.__setitem__(0, 10.0))),
         ("split=valid, key=y/main", "labels must lie in [-3.0, 3.0]")),
    Case("store_class_out_of_range", "class label 7 of 4 classes", "train",
         store(_edit("train", "y/main_cls", lambda a: a.__setitem__(5, 7)), task="main_cls"),
         ("split=train, key=y/main_cls", "class labels must lie in [0, 3]")),
    Case("store_length_past_padding", "sequence length 99 (padded to 20)", "train",
         store(_edit("train", "len/text", lambda a: a.__setitem__(0, 99))),
         ("split=train, key=len/text", "lengths must lie in [0, 20]")),
    Case("store_duplicate_ids", "two samples with one id", "train",
         store(_resave("valid", "ids", lambda a: np.where(np.arange(len(a)) == 1, a[0], a))),
         ("split=valid, key=ids", "not unique")),
    Case("unknown_task", "task `sentiment` on a store without it", "train", store(task="sentiment"),
         ("manifest.json", "no task 'sentiment'")),
    Case("unknown_store_modality", "subset of modality `smell` on a real store", "train",
         store(data_setting={"type": "subset", "params": {"modalities": ["smell"]}}),
         ("manifest.json", "['smell'] not in the dataset's modalities")),
    Case("unknown_split", "domain `mars` the store has no split for", "train",
         store(data_setting={"type": "domain", "params": {"domain": "mars"}}),
         ("split=test@mars", "unknown split")),
    Case("checkpoint_truncated", "--init checkpoint cut short", "train", store(init=_checkpoint(True)),
         ("backbone.pt", "not a model checkpoint")),
    Case("checkpoint_other_model", "--init checkpoint of a model with another width", "train",
         store(init=_checkpoint(False)), ("backbone.pt", "shapes differ")),
    Case("init_checkpoint_of_another_task", "--init backbone trained on task `main`, not the pretraining task",
         "train", store(init=_saved("peft", _task("main")), study="peft"),
         ("model.pt", "the backbone to fine-tune", "task 'main' (expected 'pretrain')")),
    Case("adapt_model_of_another_size", "--model a `late` d_model 32 model, the spec's is `casp_late` d_model 8",
         "adapt", adapt(_saved(backbone="late", d_model=32)),
         ("model.pt", "the model to adapt", "backbone 'late' (expected 'casp_late')", "d_model 32 (expected 8)")),
    Case("adapt_model_of_another_study", "--model an `mplmm_mult` model (the missing study's)", "adapt",
         adapt(_saved(backbone="mplmm_mult")), ("model.pt", "backbone 'mplmm_mult' (expected 'casp_late')")),
    Case("adapt_model_of_another_task", "--model trained on task `pretrain`", "adapt",
         adapt(_saved(file=_task("pretrain"))), ("model.pt", "task 'pretrain' (expected 'main')")),
    Case("adapt_model_is_json", "--model a JSON file (metrics.json)", "adapt",
         adapt(lambda tmp: (tmp / "metrics.json", (tmp / "metrics.json").write_text('{"mae": 1}'))[0]),
         ("metrics.json", "not a model checkpoint")),
    Case("adapt_model_truncated", "--model cut short", "adapt", adapt(_saved(file=_halve)),
         ("model.pt", "not a model checkpoint")),
    Case("adapt_model_missing", "--model a path with no file", "adapt", adapt(lambda tmp: tmp / "nothing" / "model.pt"),
         ("nothing/model.pt", "checkpoint file is missing")),
    Case("spec_not_json", "--spec that is not JSON", "train",
         lambda tmp: ["train", "--spec", "{study: balance", "--data", "x", "--out-dir", str(tmp / "out")],
         ("--spec", "not valid JSON")),
    Case("spec_file_missing", "--spec naming a file that does not exist", "train",
         lambda tmp: ["train", "--spec", str(tmp / "specs" / "0123.json"), "--data", "x", "--out-dir", str(tmp / "out")],
         ("--spec", "no spec file", "0123.json")),
]


@pytest.fixture
def no_compute(monkeypatch):
    """Training and tracking fail the test if reached: a bad input must be rejected before."""
    def reached(*args, **kwargs):
        raise AssertionError("compute started before the bad input was rejected")
    monkeypatch.setattr("mmrepro.jobs.fit", reached)
    monkeypatch.setattr("mmrepro.jobs.open_run", reached)
    monkeypatch.setattr("mmrepro.jobs.RunTracker", reached)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def run_verb(args: list[str], capsys) -> tuple[int, str]:
    from mmrepro.cli import main
    try:
        code = main(args)
    except SystemExit as e:  # argparse rejects malformed arguments itself
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_rejected_before_compute_naming_what_and_where(case, tmp_path, capsys, no_compute, monkeypatch):
    monkeypatch.chdir(tmp_path)  # config files named as a user types them, relative
    code, err = run_verb(case.make(tmp_path), capsys)
    assert code == 2, err
    assert f"mmrepro {case.verb}: error:" in err, err  # after argparse's usage line for malformed arguments
    for text in case.names:
        assert text in err, (text, err)
    left = [p for p in (tmp_path / "out").rglob("*") if p.is_file() or p.name.startswith(".")]
    assert not left, f"output left behind: {left}"  # no file of the run, no temporary store


@pytest.mark.parametrize("verb, make", [("check-config", config(lambda c: None)), ("make-data", raw()),
                                        ("train", store()), ("train", store(init=lambda tmp: _untouched_init(tmp))),
                                        ("train", store(init=_saved("peft", weights=True), study="peft")),
                                        ("adapt", adapt())],
                         ids=["config", "raw", "store", "init", "finetune", "adapt"])
def test_the_untouched_inputs_pass_every_check(verb, make, tmp_path, capsys, no_compute):
    """Control: the inputs the cases break are valid as built (config passes; raw data converts; a
    train job reaches compute), so each case fails because of its one change."""
    args = make(tmp_path)
    if verb in ("train", "adapt"):
        with pytest.raises(AssertionError, match="compute started"):
            run_verb(args, capsys)
    else:
        code, err = run_verb(args, capsys)
        assert code == 0, err


def _untouched_init(tmp: Path) -> Path:
    from mmrepro.data.store import FeatureStore
    from mmrepro.models.build import build_model
    fs = FeatureStore(tmp / "store")
    path = tmp / "backbone.pt"
    torch.save({"state_dict": build_model(fs.schema, fs.schema.task("main"), **spec(tmp)["model"]).state_dict()}, path)
    return path


# --- the command line: what Snakemake itself reads before any of the workflow's code runs ---------


@dataclass(frozen=True)
class SnakemakeCase:
    id: str
    bad: str
    args: tuple[str, ...]  # snakemake's arguments, run in a folder holding bad.yaml and good.yaml
    shows: str  # what the user sees (Snakemake's last line, or the workflow's message)
    fix: str


SNAKEMAKE_CASES = [
    SnakemakeCase("configfile_missing", "`--configfile` naming a file that does not exist",
                  ("-n", "--configfile", "nothere.yaml"), "No such file or directory: 'nothere.yaml'",
                  "Snakemake reads --configfile before the workflow loads and ends in a traceback whose last line "
                  "names the file: correct the path (`mmrepro check-config FILE...` says it in one line)"),
    SnakemakeCase("target_after_configfile", "a target after `--configfile` (`--configfile good.yaml balance`)",
                  ("-n", "--configfile", "good.yaml", "balance"), "No such file or directory: 'balance'",
                  "every word after --configfile is read as a config file: put targets first, "
                  "`snakemake --cores all balance --configfile config/paper.yaml`"),
    SnakemakeCase("configfile_malformed", "`--configfile` naming a malformed YAML file",
                  ("-n", "--configfile", "bad.yaml"), "Config file is not valid JSON or YAML",
                  "Snakemake names neither file nor line: `mmrepro check-config bad.yaml` names the line and column"),
    SnakemakeCase("default_config_malformed", "config/config.yaml itself malformed (an edit gone wrong)",
                  ("-n",), "config file config/config.yaml, line 4, column 1: not valid YAML",
                  "the Snakefile reads config/config.yaml first and names the line: fix it there"),
]


@pytest.mark.parametrize("case", SNAKEMAKE_CASES, ids=[c.id for c in SNAKEMAKE_CASES])
def test_what_snakemake_shows_for_a_bad_command_line_is_what_the_docs_say(case, tmp_path):
    import os
    import subprocess
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    (tmp_path / "good.yaml").write_text("{}")
    if case.id == "default_config_malformed":
        (tmp_path / "config").mkdir()
        (tmp_path / "config" / "config.yaml").write_text(BAD_YAML)
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), *case.args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert done.returncode != 0 and case.shows in done.stdout + done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "results").exists()


BAD_YAML = "results: out\nmethods:\n  cggm: {rho: 1.3\n"


def test_the_catalogue_has_at_least_20_cases_across_stages():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
    assert {c.verb for c in CASES} == set(STAGES)


def catalogue() -> str:
    """The Markdown page docs/bad_inputs.md, generated from CASES."""
    lines = ["# Bad inputs: what is rejected, by what, and what the message says", "",
             "Generated from `tests/test_bad_inputs.py` (`python tests/test_bad_inputs.py > docs/bad_inputs.md`);",
             "a test fails when this page and the test's cases differ. Each case is rejected with exit code 2",
             "before any training, tracking run or store is written, and leaves no output file behind.", "",
             "Where each check runs:", ""]
    lines += [f"- **{verb}**: {where}" for verb, where in STAGES.items()]
    lines += ["", "| # | case | bad input | rejected by | the message names |", "|---|---|---|---|---|"]
    for i, c in enumerate(CASES, 1):
        names = " ; ".join(f"`{n}`" for n in c.names).replace("|", "\\|")
        lines.append(f"| {i} | `{c.id}` | {c.bad} | `{c.verb}` | {names} |")
    lines += ["", "## The command line, before the workflow loads", "",
              "Snakemake reads `--configfile` files itself before any of the workflow's code runs, so these",
              "messages are Snakemake's (a traceback ending in the line shown), except where the Snakefile reads",
              "a file first. `mmrepro check-config` and `mmrepro doctor --configfile` read the same files and",
              "answer each case in one line (cases above).", "",
              "| # | case | bad input | what the user sees | what to do |", "|---|---|---|---|---|"]
    for i, c in enumerate(SNAKEMAKE_CASES, 1):
        lines.append(f"| {i} | `{c.id}` | {c.bad} | `{c.shows}` | {c.fix} |")
    return "\n".join(lines) + "\n"


def test_the_docs_table_lists_every_case():
    assert DOC.read_text() == catalogue(), "docs/bad_inputs.md is stale: python tests/test_bad_inputs.py > docs/bad_inputs.md"


if __name__ == "__main__":
    sys.stdout.write(catalogue())
