"""The feature store: schema validation before writing, the manifest, memory-mapped reads and
the integrity checks (size on open, SHA-256 on verify). Tiny hand-built schema and arrays."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from mmrepro.data.schema import DatasetSchema, DataValidationError, ModalitySpec, TaskSpec, validate_split
from mmrepro.data.store import FORMAT_VERSION, MANIFEST, FeatureStore, write_store

SCHEMA = DatasetSchema(
    name="tiny",
    modalities=(ModalitySpec("a", length=6, dim=5), ModalitySpec("b", length=4, dim=3)),
    tasks=(TaskSpec("score", "regression", value_range=(-3.0, 3.0)), TaskSpec("cls", "classification", num_classes=3)),
    splits=("train", "test"),
)
SOURCE = "hand:tiny"
PROVENANCE = {"dataset": "tiny", "source": SOURCE}


def make_arrays(n: int, seed: int = 0, split: str = "train") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x/a": rng.standard_normal((n, 6, 5)).astype(np.float32),
        "len/a": rng.integers(1, 7, size=n).astype(np.int64),
        "x/b": rng.standard_normal((n, 4, 3)).astype(np.float32),
        "len/b": rng.integers(0, 5, size=n).astype(np.int64),
        "y/score": rng.uniform(-3, 3, size=n).astype(np.float32),
        "y/cls": rng.integers(0, 3, size=n).astype(np.int64),
        "ids": np.array([f"{split}-{seed}-{i}" for i in range(n)]),
    }


def splits_of(seed: int = 0, n_train: int = 7, n_test: int = 3, extra: tuple[str, ...] = ()):
    out = [("train", make_arrays(n_train, seed, "train"), {"score": {"mae": 0.25}}),
           ("test", make_arrays(n_test, seed + 100, "test"), {})]
    out += [(name, make_arrays(2, seed + 200, name), {}) for name in extra]
    return out


@pytest.fixture
def store(tmp_path: Path):
    root = tmp_path / "stores" / "tiny"
    data = splits_of()
    manifest = write_store(root, SCHEMA, data, PROVENANCE)
    return root, manifest, {split: arrays for split, arrays, _ in data}


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_arrays_equal_and_memory_mapped(store):
    root, manifest, written = store
    assert manifest == root / MANIFEST and manifest.is_file()
    fs = FeatureStore(root)
    assert sorted(fs.splits) == ["test", "train"]
    for split, arrays in written.items():
        opened = fs.open_split(split)
        assert set(opened) == set(arrays)
        for key, a in arrays.items():
            assert isinstance(opened[key], np.memmap), key
            assert opened[key].dtype == a.dtype, key
            np.testing.assert_array_equal(np.asarray(opened[key]), a, err_msg=key)


def test_manifest_records_shapes_dtypes_bytes_and_sha256(store):
    root, manifest, written = store
    m = json.loads(manifest.read_text())
    assert m["format_version"] == FORMAT_VERSION == 1
    assert m["provenance"]["dataset"] == "tiny" and m["provenance"]["source"] == SOURCE
    assert "created" in m["provenance"]
    assert m["splits"]["train"]["n"] == 7 and m["splits"]["test"]["n"] == 3
    assert m["oracle"] == {"train": {"score": {"mae": 0.25}}}  # empty oracle of test not recorded
    for split, arrays in written.items():
        entries = m["splits"][split]["arrays"]
        assert set(entries) == set(arrays)
        for key, a in arrays.items():
            e = entries[key]
            assert e["file"] == f"{split}/{key}.npy"
            assert e["shape"] == list(a.shape)
            assert e["dtype"] == a.dtype.str
            path = root / e["file"]
            assert e["bytes"] == path.stat().st_size
            assert e["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_schema_and_oracle_read_back(store):
    root, manifest, _ = store
    fs = FeatureStore(manifest)  # the manifest path works as well as the folder
    assert fs.root == root
    assert fs.schema == SCHEMA
    assert fs.schema.task("score").value_range == (-3.0, 3.0)
    assert fs.schema.task("cls").num_classes == 3
    assert fs.oracle("train", "score") == {"mae": 0.25}
    assert fs.oracle("test", "score") == {}


def test_present_mask_round_trip(tmp_path):
    schema = DatasetSchema(SCHEMA.name, SCHEMA.modalities, SCHEMA.tasks, ("train",), has_present_mask=True)
    arrays = make_arrays(5)
    arrays["present"] = np.array([[1, 1], [1, 0], [0, 1], [1, 1], [0, 1]], dtype=bool)
    write_store(tmp_path / "s", schema, [("train", arrays, {})], PROVENANCE)
    fs = FeatureStore(tmp_path / "s")
    assert fs.schema.has_present_mask is True
    np.testing.assert_array_equal(fs.open_split("train")["present"], arrays["present"])
    # and a store whose schema promises a mask refuses a split without one
    del arrays["present"]
    with pytest.raises(DataValidationError, match="key=present"):
        write_store(tmp_path / "s2", schema, [("train", arrays, {})], PROVENANCE)


def test_unknown_split_raises(store):
    root, _, _ = store
    with pytest.raises(DataValidationError, match=r"split=valid.*unknown split.*\['test', 'train'\]"):
        FeatureStore(root).open_split("valid")


# ---------------------------------------------------------------------------------------------
# Integrity


def test_verify_passes_then_flipped_byte_is_caught(store):
    root, _, _ = store
    fs = FeatureStore(root)
    fs.verify()
    path = root / "train" / "x/a.npy"
    size = path.stat().st_size
    _flip_last_byte(path)
    assert path.stat().st_size == size
    # the size check on open cannot see it ...
    fs.open_split("train")
    # ... the checksum does
    with pytest.raises(DataValidationError, match="checksum mismatch") as ei:
        FeatureStore(root).verify()
    err = ei.value
    assert err.file == str(path) and err.split == "train" and err.key == "x/a"
    assert str(path) in str(err) and "key=x/a" in str(err)


def test_truncated_file_fails_on_open(store):
    root, _, _ = store
    path = root / "test" / "y/cls.npy"
    raw = path.read_bytes()
    path.write_bytes(raw[:-8])
    with pytest.raises(DataValidationError, match="truncated") as ei:
        FeatureStore(root).open_split("test")
    assert ei.value.split == "test" and ei.value.key == "y/cls" and ei.value.file == str(path)
    assert "split=test" in str(ei.value) and "key=y/cls" in str(ei.value)
    assert f"{len(raw) - 8} bytes, manifest says {len(raw)}" in str(ei.value)
    # other splits are still readable
    FeatureStore(root).open_split("train")


def test_deleted_file_fails_on_open_and_verify(store):
    root, _, _ = store
    path = root / "train" / "len/b.npy"
    path.unlink()
    with pytest.raises(DataValidationError, match="missing") as ei:
        FeatureStore(root).open_split("train")
    assert (ei.value.split, ei.value.key, ei.value.file) == ("train", "len/b", str(path))
    with pytest.raises(DataValidationError, match="key=len/b"):
        FeatureStore(root).verify()


def test_same_size_header_damage_is_unreadable_not_a_crash(store):
    root, _, _ = store
    path = root / "train" / "y/score.npy"
    raw = bytearray(path.read_bytes())
    raw[:6] = b"XXXXXX"  # destroy the .npy magic string, keep the size
    path.write_bytes(bytes(raw))
    with pytest.raises(DataValidationError, match="unreadable array") as ei:
        FeatureStore(root).open_split("train")
    assert ei.value.key == "y/score"


def test_corrupt_manifest_json(store):
    root, manifest, _ = store
    manifest.write_text(manifest.read_text()[:-20])
    with pytest.raises(DataValidationError, match="not valid JSON") as ei:
        FeatureStore(root)
    assert ei.value.file == str(manifest)


def test_missing_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataValidationError, match="manifest.json is missing"):
        FeatureStore(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Validation before anything is written


def _nan3(a):
    a["x/b"][0, 0, 0] = np.nan
    a["x/b"][2, 1, 2] = np.inf
    a["x/b"][3, 3, 1] = np.nan


def _wrong_shape(a):
    a["x/a"] = a["x/a"][:, :, :4].copy()


def _label_out_of_range(a):
    a["y/score"][1] = 3.5


def _dup_ids(a):
    a["ids"][4] = a["ids"][0]


def _missing_key(a):
    del a["len/b"]


def _class_too_big(a):
    a["y/cls"][2] = 3


def _class_negative(a):
    a["y/cls"][2] = -1


def _float_class(a):
    a["y/cls"] = a["y/cls"].astype(np.float32)


def _length_too_long(a):
    a["len/a"][0] = 7


def _nan_label(a):
    a["y/score"][0] = np.nan


def _no_ids(a):
    del a["ids"]


BAD = [
    (_nan3, "x/b", r"3 NaN/inf value\(s\) found"),
    (_wrong_shape, "x/a", r"expected shape \(7, 6, 5\), found \(7, 6, 4\)"),
    (_label_out_of_range, "y/score", r"labels must lie in \[-3.0, 3.0\], found \[.*, 3.5\]"),
    (_dup_ids, "ids", "not unique"),
    (_missing_key, "len/b", r"missing array \(expected shape \(7,\)\)"),
    (_class_too_big, "y/cls", r"class labels must lie in \[0, 2\], found \[0, 3\]"),
    (_class_negative, "y/cls", r"class labels must lie in \[0, 2\], found \[-1, "),
    (_float_class, "y/cls", "expected dtype kind 'i', found float32"),
    (_length_too_long, "len/a", r"lengths must lie in \[0, 6\], found \[.*, 7\]"),
    (_nan_label, "y/score", r"1 NaN/inf"),
    (_no_ids, "ids", "missing array"),
]


@pytest.mark.parametrize("corrupt,key,message", BAD, ids=[b[0].__name__.strip("_") for b in BAD])
def test_validate_split_names_key_and_problem(corrupt, key, message):
    arrays = make_arrays(7)
    validate_split(SCHEMA, "train", arrays, file="f.h5")  # valid as made
    corrupt(arrays)
    with pytest.raises(DataValidationError, match=message) as ei:
        validate_split(SCHEMA, "train", arrays, file="f.h5")
    assert (ei.value.file, ei.value.split, ei.value.key) == ("f.h5", "train", key)
    assert str(ei.value).startswith(f"file=f.h5, split=train, key={key}: ")


@pytest.mark.parametrize("corrupt,key,message", BAD, ids=[b[0].__name__.strip("_") for b in BAD])
def test_failed_write_leaves_nothing_behind(tmp_path, corrupt, key, message):
    parent = tmp_path / "stores"
    data = splits_of()
    corrupt(data[0][1])
    with pytest.raises(DataValidationError, match=message) as ei:
        write_store(parent / "tiny", SCHEMA, data, PROVENANCE)
    assert ei.value.key == key and ei.value.file == SOURCE
    assert list(parent.iterdir()) == []  # no store, no hidden temporary folder


def test_failure_in_a_later_split_removes_the_partly_written_temp(tmp_path):
    parent = tmp_path / "stores"
    data = splits_of()
    data[1][1]["y/cls"][0] = 9  # the test split fails after train was written to the temp folder
    with pytest.raises(DataValidationError, match="split=test, key=y/cls"):
        write_store(parent / "tiny", SCHEMA, data, PROVENANCE)
    assert list(parent.iterdir()) == []


def test_declared_split_not_written(tmp_path):
    with pytest.raises(DataValidationError, match=r"\['test'\] declared by the schema were not written"):
        write_store(tmp_path / "tiny", SCHEMA, splits_of()[:1], PROVENANCE)
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_old_store(store):
    root, _, written = store
    before = (root / MANIFEST).read_text()
    data = splits_of(seed=5)
    _nan3(data[0][1])
    with pytest.raises(DataValidationError):
        write_store(root, SCHEMA, data, PROVENANCE)
    assert (root / MANIFEST).read_text() == before
    FeatureStore(root).verify()
    np.testing.assert_array_equal(FeatureStore(root).open_split("train")["x/a"], written["train"]["x/a"])
    assert sorted(p.name for p in root.parent.iterdir()) == ["tiny"]


def test_rewrite_replaces_existing_store(tmp_path):
    root = tmp_path / "stores" / "tiny"
    write_store(root, SCHEMA, splits_of(seed=0, extra=("valid",)), PROVENANCE)
    assert sorted(FeatureStore(root).splits) == ["test", "train", "valid"]
    stale = root / "stale.txt"
    stale.write_text("left from before")
    new = splits_of(seed=1, n_train=5)
    write_store(root, SCHEMA, new, {**PROVENANCE, "dataset": "tiny-v2"})
    fs = FeatureStore(root)
    assert sorted(fs.splits) == ["test", "train"]
    assert fs.manifest["provenance"]["dataset"] == "tiny-v2"
    assert not (root / "valid").exists() and not stale.exists()
    train = fs.open_split("train")
    assert train["x/a"].shape == (5, 6, 5)
    np.testing.assert_array_equal(train["ids"], new[0][1]["ids"])
    np.testing.assert_array_equal(train["y/score"], new[0][1]["y/score"])
    fs.verify()
    assert sorted(p.name for p in root.parent.iterdir()) == ["tiny"]


# ---------------------------------------------------------------------------------------------
# Work folders of killed conversions

KILLED_WRITER = """
import sys, time
sys.path.insert(0, {tests!r})
from test_store import PROVENANCE, SCHEMA, splits_of
from mmrepro.data.store import write_store

def splits():
    yield splits_of()[0]
    open({ready!r}, "w").close()
    time.sleep(600)  # killed here, its train split written into the work folder

write_store({root!r}, SCHEMA, splits(), PROVENANCE)
"""


def test_the_next_conversion_removes_what_a_killed_one_left(tmp_path, caplog):
    """kill -9 mid-conversion leaves the hidden work folder; the next conversion of the same store
    removes it (its process is gone), and leaves another host's with a warning naming it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mmrepro.data.store import leftovers

    root, ready = tmp_path / "stores" / "tiny", tmp_path / "ready"
    code = KILLED_WRITER.format(tests=str(Path(__file__).parent), ready=str(ready), root=str(root))
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 120
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert ready.exists(), "the writer never reached its second split"
    (left,) = leftovers(root.parent, "tiny")
    assert (left / "train" / "x" / "a.npy").is_file() and not root.exists()
    elsewhere = root.parent / ".tiny.partial-otherhost-123-abcdefgh"
    elsewhere.mkdir()

    write_store(root, SCHEMA, splits_of(), PROVENANCE)
    assert not left.exists() and sorted(FeatureStore(root).splits) == ["test", "train"]
    assert elsewhere.exists() and "otherhost" in caplog.text and str(elsewhere) in caplog.text
