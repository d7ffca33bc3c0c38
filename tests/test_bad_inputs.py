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


def spec(tmp: Path, **changes) -> dict:
    """A run spec's JSON (what a rule passes), keys changed as given."""
    from mmrepro.config import run_spec
    cfg = default_config()
    cfg["model"].update(d_model=8, heads=2)
    cfg["train"].update(epochs=1, batch_size=16)
    s = run_spec(cfg, "balance", "synth", "joint", "complete", 0)
    return {**s.to_dict(), "results": str(tmp / "out"), **changes}


def store(corrupt: Callable[[Path], None] = lambda root: None, *, init: Callable[[Path], Path] | None = None,
          **spec_changes) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        root = tmp / "store"
        shutil.copytree(_STORE["root"], root)
        corrupt(root)
        args = ["train", "--spec", json.dumps(spec(tmp, **spec_changes)), "--data", str(root / "manifest.json"),
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
         ("config key methods.lora", "r must be a positive integer")),
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
    Case("spec_not_json", "--spec that is not JSON", "train",
         lambda tmp: ["train", "--spec", "{study: balance", "--data", "x", "--out-dir", str(tmp / "out")],
         ("--spec", "not valid JSON")),
]


@pytest.fixture
def no_compute(monkeypatch):
    """Training and tracking fail the test if reached: a bad input must be rejected before."""
    def reached(*args, **kwargs):
        raise AssertionError("compute started before the bad input was rejected")
    monkeypatch.setattr("mmrepro.jobs.fit", reached)
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
def test_bad_input_is_rejected_before_compute_naming_what_and_where(case, tmp_path, capsys, no_compute):
    code, err = run_verb(case.make(tmp_path), capsys)
    assert code == 2, err
    assert f"mmrepro {case.verb}: error:" in err, err  # after argparse's usage line for malformed arguments
    for text in case.names:
        assert text in err, (text, err)
    left = [p for p in (tmp_path / "out").rglob("*") if p.is_file() or p.name.startswith(".")]
    assert not left, f"output left behind: {left}"  # no file of the run, no temporary store


@pytest.mark.parametrize("verb, make", [("check-config", config(lambda c: None)), ("make-data", raw()),
                                        ("train", store()), ("train", store(init=lambda tmp: _untouched_init(tmp)))],
                         ids=["config", "raw", "store", "init"])
def test_the_untouched_inputs_pass_every_check(verb, make, tmp_path, capsys, no_compute):
    """Control: the inputs the cases break are valid as built (config passes; raw data converts; a
    train job reaches compute), so each case fails because of its one change."""
    args = make(tmp_path)
    if verb == "train":
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
    return "\n".join(lines) + "\n"


def test_the_docs_table_lists_every_case():
    assert DOC.read_text() == catalogue(), "docs/bad_inputs.md is stale: python tests/test_bad_inputs.py > docs/bad_inputs.md"


if __name__ == "__main__":
    sys.stdout.write(catalogue())
