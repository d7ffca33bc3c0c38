"""IEMOCAP in the MMIN/CGGM HDF5 layout: tiny data roots written here with h5py in exactly that
layout (``A/comparE.h5``, ``V/denseface.h5``, ``L/bert_large.h5``, ``A/comparE_mean_std.h5``,
``target/<fold>/{trn,val,tst}_{label,int2name}.npy``), converted, written to a store, read back
through the loader; and every refusal, checked for the file, split and key it names."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from mmrepro.data.iemocap_h5 import IEMOCAP_4CLASS_TOTALS, _infer_class_names, convert_iemocap_h5
from mmrepro.data.loader import SplitLoader
from mmrepro.data.schema import DataValidationError
from mmrepro.data.standin.mmin import write_mmin_root
from mmrepro.data.store import FeatureStore, write_store

DIMS = {"text": 6, "audio": 5, "vision": 4}
FOLDERS = {"text": ("L", "bert_large"), "audio": ("A", "comparE"), "vision": ("V", "denseface")}
CAPS = (4, 7, 3)  # text, audio, vision
CAP = dict(zip(("text", "audio", "vision"), CAPS))
SETS = {"train": "trn", "valid": "val", "test": "tst"}
# per split: (name, class, frames of text, audio, vision); lengths at, below and at 1 frame of the caps
UTTS = {
    "train": [("Ses02F_impro01_F000", 2, 4, 7, 3), ("Ses02M_script01_M001", 0, 2, 5, 1),
              ("Ses03F_impro02_F002", 3, 1, 3, 2), ("Ses04M_impro03_M003", 1, 3, 6, 3)],
    "valid": [("Ses01F_impro01_F000", 1, 4, 4, 3), ("Ses01F_script02_F005", 3, 2, 2, 2)],
    "test": [("Ses01M_impro01_M000", 0, 3, 7, 1), ("Ses01M_impro04_M010", 2, 1, 1, 3),
             ("Ses01M_script03_M020", 1, 4, 5, 2)],
}
MEAN = np.array([1.0, -2.0, 0.5, 3.0, 0.0])
STD = np.array([2.0, 0.5, 1.0, 4.0, 1.5])


def feature(name: str, m: str, t: int) -> np.ndarray:
    """Deterministic, distinct per utterance and modality (seeded by the name)."""
    rng = np.random.default_rng([sum(map(ord, name)), len(m), t])
    return rng.normal(2.0, 3.0, size=(t, DIMS[m])).astype(np.float32)


def make_root(tmp: Path, *, fold: int = 1, utts=UTTS, with_stats: bool = True) -> Path:
    modalities = list(FOLDERS)
    features = {m: [(name, feature(name, m, frames[modalities.index(m)]))
                    for split_utts in utts.values() for name, _, *frames in split_utts]
                   + [("Ses05F_unused_F000", feature("unused", m, 2))]  # in the file, in no split
                for m in modalities}
    targets = {fold: {split: (np.eye(4, dtype=np.float32)[[c for _, c, *_ in items]], [n for n, *_ in items])
                      for split, items in utts.items()}}
    stats = {cv: (MEAN + (cv - 1), STD) for cv in (1, 2)} if with_stats else None
    return write_mmin_root(tmp / "IEMOCAP_features_2021", features, targets, stats,
                           kinds={m: kind for m, (_, kind) in FOLDERS.items()})


def build(tmp: Path, converted) -> FeatureStore:
    schema, splits, provenance = converted
    write_store(tmp / "store", schema, splits, provenance)
    return FeatureStore(tmp / "store")


def convert(root: Path, **kw):
    return convert_iemocap_h5(root, name="iemocap", lengths=CAPS, **kw)


def expect_error(match: str, fn, *args, **kw) -> DataValidationError:
    with pytest.raises(DataValidationError, match=match) as e:
        fn(*args, **kw)
    return e.value


# ---------------------------------------------------------------------------------------------


def test_round_trip_shapes_padding_labels_ids_and_trn_norm(tmp_path):
    root = make_root(tmp_path)
    fs = build(tmp_path, convert(root))
    sch = fs.schema
    assert [(m.name, m.length, m.dim) for m in sch.modalities] == [
        ("text", 4, 6), ("audio", 7, 5), ("vision", 3, 4)]
    assert [(t.name, t.type, t.num_classes) for t in sch.tasks] == [
        ("emotion", "classification", 4), *[(f"class_{k}", "classification", 2) for k in range(4)]]
    assert sch.extra["emotions"] == ["class_0", "class_1", "class_2", "class_3"]  # tiny data: order unknown
    assert sch.extra["audio_norm"] == "trn" and sch.extra["fold"] == 1
    prov = fs.manifest["provenance"]
    assert prov["classes"]["source"].startswith("unknown") and prov["classes"]["totals"] == [2, 3, 2, 2]
    assert prov["files"]["A/comparE.h5"]["utterances_in_file"] == 10
    assert prov["files"]["A/comparE.h5"]["utterances_used"] == 9
    for split, items in UTTS.items():
        a = fs.open_split(split)
        assert a["ids"].tolist() == [n for n, *_ in items]
        assert a["y/emotion"].dtype == np.int64 and a["y/emotion"].tolist() == [c for _, c, *_ in items]
        for k in range(4):  # the one-vs-rest binary tasks
            assert a[f"y/class_{k}"].tolist() == [int(c == k) for _, c, *_ in items]
        for i, (name, _, *frames) in enumerate(items):
            for m, t in zip(("text", "audio", "vision"), frames):
                raw = feature(name, m, t).astype(np.float64)
                want = (raw - MEAN) / STD if m == "audio" else raw
                x = a[f"x/{m}"][i]
                assert x.shape == (CAP[m], DIMS[m]) and a[f"len/{m}"][i] == t
                np.testing.assert_allclose(x[:t], want, rtol=1e-5, atol=1e-6)
                assert not x[t:].any()  # zero padding after the valid frames
    loader = SplitLoader(fs.open_split("test"), sch, "emotion", batch_size=2, shuffle=False, seed=0)
    batches = list(loader)
    assert [len(b) for b in batches] == [2, 1]
    b = batches[0]
    assert {m: tuple(v.shape) for m, v in b.x.items()} == {"text": (2, 4, 6), "audio": (2, 7, 5), "vision": (2, 3, 4)}
    assert b.y.tolist() == [0, 2] and b.lengths["audio"].tolist() == [7, 1] and b.lengths["text"].tolist() == [3, 1]


def test_trn_norm_uses_the_folds_statistics(tmp_path):
    root = make_root(tmp_path, fold=2)
    fs = build(tmp_path, convert(root, fold=2))
    a = fs.open_split("train")
    raw = feature("Ses02F_impro01_F000", "audio", 7).astype(np.float64)
    np.testing.assert_allclose(a["x/audio"][0], (raw - (MEAN + 1)) / STD, rtol=1e-5, atol=1e-6)


def test_utt_norm_matches_hand_computation(tmp_path):
    utts = {**UTTS, "train": UTTS["train"] + [("Ses02F_const_F009", 0, 1, 4, 1)]}
    root = make_root(tmp_path, utts=utts, with_stats=False)  # 'utt' needs no statistics file
    with h5py.File(root / "A" / "comparE.h5", "a") as h5:  # one constant column: std 0 -> 1
        x = h5["Ses02F_const_F009"][()]
        x[:, 2] = 7.5
        del h5["Ses02F_const_F009"]
        h5["Ses02F_const_F009"] = x
    fs = build(tmp_path, convert(root, audio_norm="utt"))
    a = fs.open_split("train")
    for i, (name, _, _, t, _) in enumerate(utts["train"]):
        with h5py.File(root / "A" / "comparE.h5", "r") as h5:
            raw = h5[name][()].astype(np.float64)
        mean = raw.sum(axis=0) / t
        std = np.sqrt(((raw - mean) ** 2).sum(axis=0) / (t - 1))  # unbiased, as torch.std
        std[std == 0] = 1.0
        np.testing.assert_allclose(a["x/audio"][i, :t], (raw - mean) / std, rtol=1e-5, atol=1e-6)
        assert not a["x/audio"][i, t:].any()
    assert np.all(a["x/audio"][4, :4, 2] == 0.0)  # the constant column: mean removed, divided by 1
    # one-frame utterance (test row 1): unbiased std undefined -> frame becomes 0, and is counted
    t = fs.open_split("test")
    assert t["len/audio"][1] == 1 and not t["x/audio"][1].any()
    assert fs.manifest["provenance"]["utt_norm_single_frame"] == {"train": 0, "valid": 0, "test": 1}
    # text and vision are never normalised
    np.testing.assert_allclose(a["x/text"][0, :4], feature("Ses02F_impro01_F000", "text", 4), rtol=1e-6)


def test_audio_norm_none_keeps_raw_audio(tmp_path):
    root = make_root(tmp_path, with_stats=False)
    fs = build(tmp_path, convert(root, audio_norm="none"))
    a = fs.open_split("valid")
    np.testing.assert_array_equal(a["x/audio"][0, :4], feature("Ses01F_impro01_F000", "audio", 4))


def test_overlong_error_or_truncate(tmp_path):
    root = make_root(tmp_path)
    with h5py.File(root / "V" / "denseface.h5", "a") as h5:
        del h5["Ses01F_script02_F005"]
        h5["Ses01F_script02_F005"] = feature("Ses01F_script02_F005", "vision", 5)
    with h5py.File(root / "A" / "comparE.h5", "a") as h5:
        del h5["Ses02M_script01_M001"]
        h5["Ses02M_script01_M001"] = feature("Ses02M_script01_M001", "audio", 9)
    e = expect_error("longer than the padded length 7", convert, root, audio_norm="utt")
    assert (Path(e.file).name, e.split, e.key) == ("comparE.h5", "train", "Ses02M_script01_M001")
    fs = build(tmp_path, convert(root, audio_norm="utt", overlong="truncate"))
    a, v = fs.open_split("train"), fs.open_split("valid")
    assert a["len/audio"][1] == 7 and v["len/vision"][1] == 3
    np.testing.assert_array_equal(v["x/vision"][1], feature("Ses01F_script02_F005", "vision", 5)[:3])
    raw = feature("Ses02M_script01_M001", "audio", 9).astype(np.float64)  # normalised over all 9 frames, then cut
    want = (raw - raw.mean(axis=0)) / raw.std(axis=0, ddof=1)
    np.testing.assert_allclose(a["x/audio"][1], want[:7], rtol=1e-5, atol=1e-6)
    trunc = fs.manifest["provenance"]["truncated"]
    assert trunc["train"]["audio"]["count"] == 1 and trunc["train"]["audio"]["max_found"] == 9
    assert trunc["valid"]["vision"]["examples"] == ["Ses01F_script02_F005"] and trunc["test"] == {}


def test_nonfinite_refused_naming_utterance_or_zeroed_and_counted(tmp_path):
    root = make_root(tmp_path)
    with h5py.File(root / "A" / "comparE.h5", "a") as h5:
        x = h5["Ses01M_impro01_M000"][()]
        x[0, 1], x[3, 4] = np.nan, -np.inf
        del h5["Ses01M_impro01_M000"]
        h5["Ses01M_impro01_M000"] = x
    e = expect_error("2 non-finite audio value", build, tmp_path, convert(root))
    assert (Path(e.file).name, e.split, e.key) == ("comparE.h5", "test", "Ses01M_impro01_M000")
    assert not (tmp_path / "store").exists()
    fs = build(tmp_path, convert(root, nan_policy="zero"))
    a = fs.open_split("test")
    assert a["x/audio"][0, 0, 1] == pytest.approx((0.0 - MEAN[1]) / STD[1])  # zeroed, then normalised
    assert a["x/audio"][0, 3, 4] == pytest.approx((0.0 - MEAN[4]) / STD[4])
    assert fs.manifest["provenance"]["nonfinite"]["test"]["audio"] == {
        "replaced_with_zero": 2, "utterances": 1, "examples": ["Ses01M_impro01_M000"]}
    assert fs.manifest["provenance"]["nonfinite"]["train"] == {}


def test_missing_files_name_the_file(tmp_path):
    root = make_root(tmp_path)
    (root / "V" / "denseface.h5").rename(root / "V" / "other.h5")
    e = expect_error("vision feature file not found", convert, root)
    assert e.file.endswith("V/denseface.h5")
    (root / "V" / "other.h5").rename(root / "V" / "denseface.h5")
    e = expect_error("fold directory not found", convert, root, fold=3)
    assert e.file.endswith("target/3")
    (root / "target" / "1" / "val_label.npy").unlink()
    e = expect_error("target file not found", convert, root)
    assert e.file.endswith("val_label.npy") and e.split == "valid"
    root2 = make_root(tmp_path / "b", with_stats=False)
    e = expect_error("audio statistics file not found", convert, root2)
    assert e.file.endswith("A/comparE_mean_std.h5")


def test_utterance_missing_from_a_feature_file(tmp_path):
    root = make_root(tmp_path)
    with h5py.File(root / "L" / "bert_large.h5", "a") as h5:
        del h5["Ses01F_script02_F005"]
    e = expect_error("utterance missing from the text feature file", convert, root)
    assert (Path(e.file).name, e.split, e.key) == ("bert_large.h5", "valid", "Ses01F_script02_F005")


def test_feature_dim_differs_or_not_frame_level(tmp_path):
    root = make_root(tmp_path)
    with h5py.File(root / "A" / "comparE.h5", "a") as h5:
        del h5["Ses03F_impro02_F002"]
        h5["Ses03F_impro02_F002"] = np.zeros((3, 6), np.float32)
    e = expect_error(r"audio feature dim 6 differs from the other utterances' 5", convert, root)
    assert (e.split, e.key) == ("train", "Ses03F_impro02_F002")
    with h5py.File(root / "A" / "comparE.h5", "a") as h5:
        del h5["Ses03F_impro02_F002"]
        h5["Ses03F_impro02_F002"] = np.zeros(5, np.float32)
    e = expect_error(r"expected frame-level features \(T, D\)", convert, root)
    assert e.key == "Ses03F_impro02_F002" and e.file.endswith("comparE.h5")


def test_label_problems(tmp_path):
    root = make_root(tmp_path)
    path = root / "target" / "1" / "tst_label.npy"
    good = np.load(path)
    bad = good.copy()
    bad[2] = [0, 1, 1, 0]
    np.save(path, bad)
    e = expect_error(r"1 label row\(s\) are not one-hot \(rows \[2\]", convert, root)
    assert (e.file, e.split, e.key) == (str(path), "test", "label")
    np.save(path, good[:, :3])
    e = expect_error(r"expected one-hot labels of shape \(N, 4\), found \(3, 3\)", convert, root)
    assert e.split == "test"
    np.save(path, good[:2])
    e = expect_error(r"3 names but 2 label rows in tst_label.npy", convert, root)
    assert e.file.endswith("tst_int2name.npy") and e.split == "test"


def test_duplicate_ids_within_and_across_splits(tmp_path):
    root = make_root(tmp_path)
    path = root / "target" / "1" / "trn_int2name.npy"
    names = np.load(path)
    dup = names.copy()
    dup[3] = names[0]
    np.save(path, dup)
    e = expect_error("1 duplicate utterance name", convert, root)
    assert (e.split, e.key) == ("train", "Ses02F_impro01_F000") and e.file.endswith("trn_int2name.npy")
    shared = names.copy()
    shared[3] = [b"Ses01M_impro01_M000"]  # a test utterance
    np.save(path, shared)
    e = expect_error("also in split 'train'", convert, root)
    assert (e.split, e.key) == ("test", "Ses01M_impro01_M000")


def test_corrupt_or_truncated_h5_names_the_file(tmp_path):
    root = make_root(tmp_path)
    path = root / "L" / "bert_large.h5"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    e = expect_error("cannot open as HDF5", convert, root)
    assert e.file == str(path)
    path.write_bytes(b"not an hdf5 file at all" * 10)
    e = expect_error("cannot open as HDF5", convert, root)
    assert e.file == str(path)


def test_bad_training_statistics(tmp_path):
    root = make_root(tmp_path)
    stats = root / "A" / "comparE_mean_std.h5"
    with h5py.File(stats, "a") as h5:
        h5["1/std"][2] = 0.0
    e = expect_error(r"std is 0 in 1 dim\(s\)", convert, root)
    assert (e.file, e.key) == (str(stats), "1/std")
    with h5py.File(stats, "a") as h5:
        del h5["1/mean"]
        h5["1/mean"] = np.zeros(3)
    e = expect_error(r"expected shape \(5,\)", convert, root)
    assert e.key == "1/mean"
    with h5py.File(stats, "a") as h5:
        del h5["1"]
    e = expect_error("no group for fold 1", convert, root)
    assert e.key == "1"


def test_one_dimensional_int2name_and_given_class_names(tmp_path):
    root = make_root(tmp_path)
    path = root / "target" / "1" / "val_int2name.npy"
    np.save(path, np.array([n for n, *_ in UTTS["valid"]]))  # 1-D unicode names
    names = ("neutral", "happy", "sad", "angry")
    fs = build(tmp_path, convert(root, class_names=names))
    assert fs.open_split("valid")["ids"].tolist() == [n for n, *_ in UTTS["valid"]]
    prov = fs.manifest["provenance"]
    assert "1-D array of names" in prov["int2name_format"]["valid"]
    assert "as CGGM reads it" in prov["int2name_format"]["train"]
    assert fs.schema.extra["emotions"] == list(names) and prov["classes"]["source"] == "given (class_names)"


def test_class_order_inferred_only_from_the_exact_iemocap_totals():
    t = IEMOCAP_4CLASS_TOTALS
    assert _infer_class_names(np.array([t["neutral"], t["happy"], t["angry"], t["sad"]])) == [
        "neutral", "happy", "angry", "sad"]
    assert _infer_class_names(np.array([t["sad"], t["angry"], t["happy"], t["neutral"]])) == [
        "sad", "angry", "happy", "neutral"]
    assert _infer_class_names(np.array([t["sad"], t["angry"], t["happy"], t["neutral"] - 1])) is None
    assert sum(t.values()) == 5531


def test_parameter_checks(tmp_path):
    root = make_root(tmp_path)
    for kw in ({"audio_norm": "global"}, {"overlong": "clip"}, {"nan_policy": "drop"}, {"fold": 0},
               {"class_names": ("a", "b", "c")}):
        with pytest.raises(ValueError):
            convert(root, **kw)
    with pytest.raises(ValueError, match="lengths"):
        convert_iemocap_h5(root, name="x", lengths=(22, 350))
