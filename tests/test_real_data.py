"""Converters of the real-dataset pickles (MMSA and MulT layouts) into feature stores.

Each test writes a tiny pickle in exactly the published layout (real key names, realistic dtypes:
float64 features, bytes ids in MulT files, ``text_bert`` as (N, 3, T)), converts it with
:mod:`mmrepro.data.mmsa`, writes the store and reads it back, or checks the error message.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmrepro.data.mmsa import EMOTIONS, PUBLISHED_SHA256, convert_mmsa, convert_mult
from mmrepro.data.schema import DataValidationError
from mmrepro.data.standin.sequences import write_pickle
from mmrepro.data.store import FeatureStore, write_store

N = {"train": 5, "valid": 3, "test": 4}
T_TEXT, T_AUDIO, T_VISION = 6, 10, 8  # stand-ins for MMSA unaligned 50 / 500 / 375
D_AUDIO, D_VISION = 5, 20  # MOSI: COVAREP 5, Facet 20


def mmsa_split(split: str, n: int, seed: int, *, d_audio: int = D_AUDIO, sims: bool = False,
               t_audio: int = T_AUDIO, t_vision: int = T_VISION) -> dict:
    rng = np.random.default_rng(seed)
    text_len = rng.integers(2, T_TEXT + 1, size=n)
    mask = (np.arange(T_TEXT)[None, :] < text_len[:, None]).astype(np.float64)
    token_ids = np.where(mask > 0, rng.integers(100, 30000, size=(n, T_TEXT)), 0).astype(np.float64)
    audio_len = rng.integers(1, t_audio + 1, size=n)
    vision_len = rng.integers(1, t_vision + 1, size=n)
    audio = rng.standard_normal((n, t_audio, d_audio))
    audio[np.arange(t_audio)[None, :] >= audio_len[:, None]] = 0.0
    vision = rng.standard_normal((n, t_vision, D_VISION)).astype(np.float32)
    lo = 1.0 if sims else 3.0
    d = {
        "raw_text": [f"utterance {split} {i}" for i in range(n)],
        "audio": audio,  # float64, as in some releases: the converter casts
        "vision": vision,
        "id": [f"vid{split}{i // 2}$_${i % 2 + 1}" for i in range(n)],
        "text": rng.standard_normal((n, T_TEXT, 768)).astype(np.float32),
        "text_bert": np.stack([token_ids, mask, np.zeros_like(mask)], axis=1),
        "audio_lengths": list(audio_len.tolist()),
        "vision_lengths": vision_len.astype(np.int64),
        "annotations": ["Positive"] * n,
        "classification_labels": np.zeros(n),
        "regression_labels": rng.uniform(-lo, lo, size=n).astype(np.float32),
    }
    if sims:
        for m in "TAV":
            d[f"regression_labels_{m}"] = rng.uniform(-1, 1, size=n).astype(np.float32)
    return d


def mmsa_data(**kw) -> dict:
    return {split: mmsa_split(split, n, seed, **kw) for seed, (split, n) in enumerate(N.items())}


dump = write_pickle  # the stand-in generator's writer (other test modules import it from here)


def build(tmp_path: Path, converted) -> FeatureStore:
    schema, splits, provenance = converted
    write_store(tmp_path / "store", schema, splits, provenance)
    return FeatureStore(tmp_path / "store")


# ---------------------------------------------------------------------------------------------
# MMSA


def test_mmsa_round_trip_shapes_labels_ids_lengths(tmp_path):
    data = mmsa_data()
    fs = build(tmp_path, convert_mmsa(dump(data, tmp_path / "unaligned_50.pkl"), name="mosi"))
    schema = fs.schema
    assert [(m.name, m.length, m.dim) for m in schema.modalities] == [
        ("text", T_TEXT, 768), ("audio", T_AUDIO, D_AUDIO), ("vision", T_VISION, D_VISION)]
    assert [(t.name, t.type, t.value_range) for t in schema.tasks] == [("sentiment", "regression", (-3.0, 3.0))]
    for split, n in N.items():
        src, got = data[split], fs.open_split(split)
        assert got["x/text"].shape == (n, T_TEXT, 768) and got["x/text"].dtype == np.float32
        assert got["x/audio"].shape == (n, T_AUDIO, D_AUDIO) and got["x/audio"].dtype == np.float32
        np.testing.assert_allclose(got["x/audio"], src["audio"].astype(np.float32))
        np.testing.assert_array_equal(got["x/vision"], src["vision"])
        np.testing.assert_array_equal(got["len/text"], src["text_bert"][:, 1].sum(1).astype(np.int64))
        np.testing.assert_array_equal(got["len/audio"], np.asarray(src["audio_lengths"]))
        np.testing.assert_array_equal(got["len/vision"], src["vision_lengths"])
        assert got["len/audio"].dtype == np.int64
        np.testing.assert_array_equal(got["y/sentiment"], src["regression_labels"])
        assert got["ids"].dtype.kind == "U" and list(got["ids"]) == src["id"]
    prov = fs.manifest["provenance"]
    assert prov["format"] == "mmsa" and prov["cast_to_float32"]["train"] == {"audio": "float64", "text_bert": "float64"}
    assert prov["lengths"]["train"]["audio"] == "audio_lengths"
    assert "raw_text" in prov["ignored_keys"]["train"] and prov["nonfinite"] == {}
    assert len(prov["sha256"]) == 64 and prov["sha256_checked"] is False


def test_mmsa_sims_unimodal_labels_and_label_range(tmp_path):
    data = mmsa_data(sims=True)
    path = dump(data, tmp_path / "SIMS" / "unaligned_39.pkl")
    fs = build(tmp_path, convert_mmsa(path, name="sims", label_range=(-1, 1)))
    names = [t.name for t in fs.schema.tasks]
    assert names == ["sentiment", "sentiment_text", "sentiment_audio", "sentiment_vision"]
    assert all(t.value_range == (-1.0, 1.0) for t in fs.schema.tasks)
    got = fs.open_split("valid")
    np.testing.assert_array_equal(got["y/sentiment_audio"], data["valid"]["regression_labels_A"])
    # a MOSI-range label in a SIMS file is out of range
    data["test"]["regression_labels"][0] = 1.5
    schema, splits, prov = convert_mmsa(dump(data, tmp_path / "b.pkl"), name="sims", label_range=(-1, 1))
    with pytest.raises(DataValidationError, match=r"split=test, key=y/sentiment: labels must lie in \[-1.0, 1.0\]"):
        write_store(tmp_path / "s2", schema, splits, prov)


def test_mmsa_bert_inputs_view_and_aligned_lengths(tmp_path):
    data = mmsa_data(t_audio=T_TEXT, t_vision=T_TEXT)  # aligned_50 layout: all sequences equally long
    fs = build(tmp_path, convert_mmsa(dump(data, tmp_path / "aligned_50.pkl"), name="mosi", text="bert_inputs"))
    assert fs.schema.modality("text").dim == 3
    got = fs.open_split("train")
    np.testing.assert_array_equal(got["x/text"][:, :, 0], data["train"]["text_bert"][:, 0].astype(np.float32))
    text_len = data["train"]["text_bert"][:, 1].sum(1).astype(np.int64)
    # aligned data: MMSA uses the text mask length for audio and vision too
    np.testing.assert_array_equal(got["len/audio"], text_len)
    np.testing.assert_array_equal(got["len/vision"], text_len)
    assert "aligned" in fs.manifest["provenance"]["lengths"]["train"]["vision"]


def test_mmsa_lengths_past_padding_are_clipped_and_recorded(tmp_path):
    data = mmsa_data()
    data["train"]["audio_lengths"][1] = T_AUDIO + 7
    fs = build(tmp_path, convert_mmsa(dump(data, tmp_path / "a.pkl"), name="mosi"))
    assert fs.open_split("train")["len/audio"][1] == T_AUDIO
    assert fs.manifest["provenance"]["lengths_clipped"]["train"]["audio_lengths"]["count"] == 1


def test_truncated_and_non_pickle_files_name_the_file(tmp_path):
    path = dump(mmsa_data(), tmp_path / "unaligned_50.pkl")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataValidationError, match=rf"file={path}: cannot unpickle .*truncated"):
        convert_mmsa(path, name="mosi")
    other = tmp_path / "notes.pkl"
    other.write_text("not a pickle at all\n")
    with pytest.raises(DataValidationError, match=rf"file={other}: cannot unpickle"):
        convert_mult(other, name="mosi")
    with pytest.raises(DataValidationError, match="file not found"):
        convert_mmsa(tmp_path / "missing.pkl", name="mosi")


def test_missing_key_and_missing_split(tmp_path):
    data = mmsa_data()
    del data["valid"]["vision"]
    with pytest.raises(DataValidationError, match=r"split=valid, key=vision: missing key"):
        convert_mmsa(dump(data, tmp_path / "a.pkl"), name="mosi")
    data = mmsa_data()
    del data["test"]
    with pytest.raises(DataValidationError, match=r"split=test: missing split"):
        convert_mmsa(dump(data, tmp_path / "b.pkl"), name="mosi")


def test_audio_dims_differ_between_splits(tmp_path):
    data = mmsa_data()
    data["valid"] = mmsa_split("valid", N["valid"], 1, d_audio=D_AUDIO + 1)
    schema, splits, prov = convert_mmsa(dump(data, tmp_path / "a.pkl"), name="mosi")
    expected = r"split=valid, key=x/audio: expected shape \(3, 10, 5\), found \(3, 10, 6\)"
    with pytest.raises(DataValidationError, match=expected):
        write_store(tmp_path / "store", schema, splits, prov)
    assert not (tmp_path / "store").exists()


def test_nan_in_vision_error_names_split_key_and_count(tmp_path):
    data = mmsa_data()
    data["valid"]["vision"][0, 0, :2] = np.nan
    data["valid"]["vision"][2, 3, 4] = -np.inf
    path = dump(data, tmp_path / "a.pkl")
    with pytest.raises(DataValidationError) as e:
        convert_mmsa(path, name="mosi")
    msg = str(e.value)
    assert f"file={path}" in msg and "split=valid" in msg and "key=vision" in msg
    assert "3 non-finite value(s) (2 NaN, 1 -inf, 0 +inf)" in msg
    assert (e.value.split, e.value.key) == ("valid", "vision")


def test_nan_in_vision_zero_policy_replaces_and_records(tmp_path):
    data = mmsa_data()
    data["valid"]["vision"][0, 0, :2] = np.nan
    data["valid"]["vision"][2, 3, 4] = -np.inf
    data["test"]["audio"][1, 0, 0] = -np.inf
    fs = build(tmp_path, convert_mmsa(dump(data, tmp_path / "a.pkl"), name="mosi", nan_policy="zero"))
    nonfinite = fs.manifest["provenance"]["nonfinite"]
    assert nonfinite == {"valid": {"vision": {"replaced_with_zero": 3, "nan": 2, "neginf": 1, "posinf": 0}},
                         "test": {"audio": {"replaced_with_zero": 1, "nan": 0, "neginf": 1, "posinf": 0}}}
    got = fs.open_split("valid")["x/vision"]
    assert np.isfinite(got).all() and got[0, 0, 0] == 0 and got[2, 3, 4] == 0
    np.testing.assert_array_equal(got[1], data["valid"]["vision"][1])


def test_label_out_of_range(tmp_path):
    data = mmsa_data()
    data["train"]["regression_labels"][2] = 3.5
    schema, splits, prov = convert_mmsa(dump(data, tmp_path / "a.pkl"), name="mosi")
    with pytest.raises(DataValidationError, match=r"split=train, key=y/sentiment: labels must lie in \[-3.0, 3.0\]"):
        write_store(tmp_path / "store", schema, splits, prov)


def test_duplicate_mmsa_ids(tmp_path):
    data = mmsa_data()
    data["test"]["id"][3] = data["test"]["id"][0]
    with pytest.raises(DataValidationError, match=r"split=test, key=id: 1 duplicate sample id"):
        convert_mmsa(dump(data, tmp_path / "a.pkl"), name="mosi")


def test_published_checksum_is_enforced_by_path(tmp_path):
    rel = next(iter(PUBLISHED_SHA256))
    path = dump(mmsa_data(), tmp_path / rel)
    with pytest.raises(DataValidationError, match="SHA-256 mismatch"):
        convert_mmsa(path, name="mosi")
    with pytest.raises(DataValidationError, match="SHA-256 mismatch"):
        convert_mult(dump(mmsa_data(), tmp_path / "x.pkl"), name="mosi", sha256="0" * 64)


# ---------------------------------------------------------------------------------------------
# MulT


def mult_split(split: str, n: int, seed: int, *, emotion: bool = False, t: int = 4) -> dict:
    rng = np.random.default_rng(100 + seed)
    d_a, d_v = (74, 35)  # IEMOCAP/MOSEI COVAREP and Facet dims
    audio = rng.standard_normal((n, t, d_a))
    audio[0, 0, 0] = -np.inf  # the released files carry -inf in audio
    d = {"text": rng.standard_normal((n, t, 300)).astype(np.float32), "audio": audio,
         "vision": rng.standard_normal((n, t, d_v)).astype(np.float32)}
    if emotion:
        present = rng.integers(0, 2, size=(n, 4))
        d["labels"] = np.stack([1 - present, present], axis=2).astype(np.float32)
    else:
        d["labels"] = rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32)
    d["id"] = np.array([[f"v{split}{i}".encode(), str(i).encode(), str(i + 1).encode()] for i in range(n)])
    return d


def mult_data(**kw) -> dict:
    return {split: mult_split(split, n, seed, **kw) for seed, (split, n) in enumerate(N.items())}


def test_mult_sentiment_bytes_ids_and_full_lengths(tmp_path):
    data = mult_data()
    path = dump(data, tmp_path / "mosi_data_noalign.pkl")
    with pytest.raises(DataValidationError, match=r"split=train, key=audio: 1 non-finite value\(s\) \(0 NaN, 1 -inf"):
        convert_mult(path, name="mosi")
    fs = build(tmp_path, convert_mult(path, name="mosi", nan_policy="zero"))
    assert [(m.name, m.length, m.dim) for m in fs.schema.modalities] == [
        ("text", 4, 300), ("audio", 4, 74), ("vision", 4, 35)]
    got = fs.open_split("valid")
    assert got["ids"].dtype.kind == "U"
    assert list(got["ids"]) == [f"vvalid{i}$_${i}$_${i + 1}" for i in range(N["valid"])]
    np.testing.assert_array_equal(got["y/sentiment"], data["valid"]["labels"].reshape(-1))
    np.testing.assert_array_equal(got["len/audio"], np.full(N["valid"], 4))
    prov = fs.manifest["provenance"]
    assert "joined with '$_$'" in prov["ids"]["valid"] and "full padded length" in prov["lengths"]["test"]["audio"]
    assert prov["nonfinite"]["train"]["audio"]["neginf"] == 1


def test_mult_ids_fall_back_when_not_unique_or_absent(tmp_path):
    data = mult_data()
    data["train"]["id"][1] = data["train"]["id"][0]
    del data["test"]["id"]
    fs = build(tmp_path, convert_mult(dump(data, tmp_path / "mosei_senti_data.pkl"), name="mosei",
                                      nan_policy="zero"))
    assert list(fs.open_split("train")["ids"]) == [f"train_{i}" for i in range(N["train"])]
    assert list(fs.open_split("test")["ids"]) == [f"test_{i}" for i in range(N["test"])]
    ids = fs.manifest["provenance"]["ids"]
    assert "1 duplicate" in ids["train"] and "no id" in ids["test"] and "joined" in ids["valid"]


def test_mult_iemocap_both_label_views_by_hand(tmp_path):
    data = mult_data(emotion=True)
    # rows: neutral; happy; sad+angry (several); none; angry
    present = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]])
    data["train"]["labels"] = np.stack([1 - present, present], axis=2).astype(np.float32)
    path = dump(data, tmp_path / "iemocap_data.pkl")
    fs = build(tmp_path, convert_mult(path, name="iemocap", task="emotion", nan_policy="zero"))
    assert [(t.name, t.num_classes) for t in fs.schema.tasks] == [
        ("emotion", 4), ("neutral", 2), ("happy", 2), ("sad", 2), ("angry", 2)]
    got = fs.open_split("train")
    # 4-class: argmax over emotions of the present column; several -> first present, none -> neutral (0)
    np.testing.assert_array_equal(got["y/emotion"], [0, 1, 2, 0, 3])
    np.testing.assert_array_equal(got["y/neutral"], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(got["y/happy"], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(got["y/sad"], [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(got["y/angry"], [0, 0, 1, 0, 1])
    assert got["y/emotion"].dtype == np.int64 and got["y/sad"].dtype == np.int64
    rec = fs.manifest["provenance"]["emotion_4class"]["train"]
    assert (rec["no_emotion"], rec["several_emotions"]) == (1, 1)
    assert rec["example_rows"] == {"none": [3], "several": [2]} and rec["class_counts"] == [2, 1, 1, 1]
    assert list(EMOTIONS) == fs.schema.extra["emotions"]
    with pytest.raises(DataValidationError, match=r"split=train, key=labels: 1 sample\(s\) with no emotion"):
        convert_mult(path, name="iemocap", task="emotion", nan_policy="zero", emotion_ambiguous="error")


def test_mult_iemocap_label_shape_and_one_hot_checks(tmp_path):
    data = mult_data(emotion=True)
    path = dump(data, tmp_path / "iemocap_data.pkl")
    with pytest.raises(DataValidationError, match="use task='emotion'"):
        convert_mult(path, name="iemocap", nan_policy="zero")
    data["valid"]["labels"][0, 1] = [1, 1]
    not_one_hot = r"split=valid, key=labels: 1 \(absent, present\) pair\(s\) are not one-hot"
    with pytest.raises(DataValidationError, match=not_one_hot):
        convert_mult(dump(data, tmp_path / "b.pkl"), name="iemocap", task="emotion", nan_policy="zero")
    sentiment = mult_data()
    with pytest.raises(DataValidationError, match=r"split=train, key=labels: expected IEMOCAP labels of shape \(5, 4, 2"):
        convert_mult(dump(sentiment, tmp_path / "c.pkl"), name="mosi", task="emotion", nan_policy="zero")


def test_the_config_names_a_pickle_and_the_pipeline_converts_it(tmp_path):
    """The workflow path: a config entry with loader/path/params validates and build_store converts it."""
    from conftest import SCHEMA
    from mmrepro.config import ConfigError, load_schema, validate_config
    from mmrepro.data import build_store

    path = dump(mmsa_data(), tmp_path / "MOSI" / "Processed" / "unaligned_toy.pkl")
    config = {"datasets": {"mosi": {"loader": "mmsa", "path": str(path), "task": "sentiment",
                                    "params": {"nan_policy": "zero"}}},
              "studies": {"balance": {"datasets": ["mosi"], "methods": ["joint"],
                                      "settings": {"complete": {"type": "complete"}}}}}
    validate_config(config, load_schema(SCHEMA))
    store = FeatureStore(build_store("mosi", config["datasets"]["mosi"], tmp_path / "store" / "mosi"))
    assert store.schema.modality_names == ["text", "audio", "vision"]
    assert store.schema.task("sentiment").type == "regression"
    no_path = {**config, "datasets": {"mosi": {"loader": "mmsa"}}}
    with pytest.raises(ConfigError, match="config key datasets.mosi: 'path' is a required property"):
        validate_config(no_path, load_schema(SCHEMA))
