"""UPMC Food-101 converter: a tiny raw tree in the real layout and tiny local HF encoders, run through
convert -> write_store -> FeatureStore -> SplitLoader, plus every validation failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmrepro.data import food101
from mmrepro.data.food101 import EncoderFolderError, convert_food101, estimate_store_bytes
from mmrepro.data.loader import SplitLoader
from mmrepro.data.schema import DataValidationError
from mmrepro.data.standin.food import save_image_encoder, save_text_encoder, write_jpeg, write_titles
from mmrepro.data.store import FeatureStore, write_store

CLASSES = ["pizza", "apple_pie", "sushi"]  # on disk in this order; the index is the sorted order
N_TRAIN, N_TEST = 6, 2
TEXT_LEN = 12
WORDS = ("apple pie recipe pizza sushi the best with cheese fresh homemade easy roll salmon crust "
         "a of and , ' ! - how to make").split()
LONG_TEXT = "the best homemade apple pie recipe with fresh apple and a crust , easy how to make apple pie"


# ---------------------------------------------------------------------------------------------
# Fixtures: encoders and raw trees


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    base = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    bert_dir = save_text_encoder(base / "bert", WORDS, max_position_embeddings=64, **small)
    vit_dir = save_image_encoder(base / "vit", image_size=32, patch_size=8, num_channels=3, **small)
    return {"text_encoder": str(bert_dir), "image_encoder": str(vit_dir)}


def _jpeg(path: Path, rng: np.random.Generator) -> None:
    h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
    base = rng.integers(0, 256, size=3)
    write_jpeg(path, np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8))


def make_raw(root: Path, *, header: bool = False, seed: int = 0) -> dict[str, list[list[str]]]:
    """A raw UPMC tree: images/{train,test}/<class>/<class>_<i>.jpg and the two title CSVs."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[list[str]]] = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        rows[split] = []
        for cls in CLASSES:
            for i in range(n):
                file = f"{cls}_{i}.jpg"
                _jpeg(root / "images" / split / cls / file, rng)
                words = cls.replace("_", " ")
                text = [f"easy {words} recipe", f'the "best" {words}, with cheese', f"{words} ! how to make"][i % 3]
                rows[split].append([file, text, cls])
        rows[split][0][1] = LONG_TEXT  # longer than TEXT_LEN tokens: truncated
    write_csvs(root, rows, header=header)
    return rows


def write_csvs(root: Path, rows: dict[str, list[list[str]]], *, header: bool = False) -> None:
    write_titles(root, rows, header=["image_path", "text", "food"] if header else None)


def convert(root: Path, encoders: dict, **kw):
    params = {"text_length": TEXT_LEN, "image_tokens": 5, "valid_fraction": 0.34, "seed": 0, "batch_size": 4,
              "progress": False, "scratch": root.parent / "scratch", **encoders, **kw}
    return convert_food101(root, name="food101", **params)


def scratch_left(root: Path) -> list[Path]:
    return [p for d in (root.parent, root.parent / "scratch") if d.is_dir()
            for p in d.iterdir() if p.name.startswith(".food101-scratch")]


@pytest.fixture(scope="module")
def built(tmp_path_factory, encoders):
    base = tmp_path_factory.mktemp("food")
    root = base / "upmc"
    rows = make_raw(root)
    schema, splits, prov = convert(root, encoders)
    manifest = write_store(base / "store", schema, splits, prov)
    return {"root": root, "rows": rows, "store": FeatureStore(manifest), "prov": prov}


# ---------------------------------------------------------------------------------------------
# Direct reference computations (independent of the converter's code paths)


def direct_text(encoders, text: str, length: int = TEXT_LEN):
    from transformers import BertModel, BertTokenizer

    tok = BertTokenizer.from_pretrained(encoders["text_encoder"])
    model = BertModel.from_pretrained(encoders["text_encoder"]).eval()
    enc = tok(text, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).last_hidden_state[0].numpy(), int(enc["attention_mask"].sum())


def direct_image(encoders, path: Path, *, side: int | None, processor: bool = False) -> np.ndarray:
    """ViT tokens of one image: CLS then the 4x4 patch grid mean-pooled to side x side (None: all)."""
    from transformers import ViTImageProcessor, ViTModel

    img = Image.open(path).convert("RGB")
    if processor:
        proc = ViTImageProcessor.from_pretrained(encoders["image_encoder"])
        pv = proc(images=img, return_tensors="pt")["pixel_values"]
    else:  # CGGM's evaluation transform: bilinear resize, [0, 1], no normalisation
        arr = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        pv = torch.from_numpy(arr.transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        h = ViTModel.from_pretrained(encoders["image_encoder"]).eval()(pixel_values=pv).last_hidden_state[0].numpy()
    if side is None:
        return h
    grid = h[1:].reshape(4, 4, -1)
    f = 4 // side
    pooled = grid.reshape(side, f, side, f, -1).mean(axis=(1, 3)).reshape(side * side, -1)
    return np.concatenate([h[:1], pooled])


# ---------------------------------------------------------------------------------------------
# The converted store


def test_store_schema_splits_ids_labels_lengths(built, encoders):
    store, rows = built["store"], built["rows"]
    s = store.schema
    assert [(m.name, m.length, m.dim) for m in s.modalities] == [("image", 5, 16), ("text", TEXT_LEN, 16)]
    assert s.task("label").num_classes == 3 and s.extra["classes"] == sorted(CLASSES)
    assert built["prov"]["classes"] == ["apple_pie", "pizza", "sushi"]
    # valid: round(6 * 0.34) = 2 per class out of train; test untouched
    assert {k: v["n"] for k, v in store.manifest["splits"].items()} == {"train": 12, "valid": 6, "test": 6}
    ids = {sp: list(store.open_split(sp)["ids"]) for sp in ("train", "valid", "test")}
    assert set(ids["train"]) | set(ids["valid"]) == {f"train/{c}/{f}" for f, _, c in rows["train"]}
    assert not set(ids["train"]) & set(ids["valid"])
    assert set(ids["test"]) == {f"test/{c}/{f}" for f, _, c in rows["test"]}
    text_of = {f"{sp}/{c}/{f}": t for sp in ("train", "test") for f, t, c in rows[sp]}
    from transformers import BertTokenizer
    tok = BertTokenizer.from_pretrained(encoders["text_encoder"])
    for sp in ("train", "valid", "test"):
        a = store.open_split(sp)
        assert a["x/text"].dtype == np.float16 and a["x/image"].dtype == np.float16
        cls = [i.split("/")[1] for i in a["ids"]]
        np.testing.assert_array_equal(a["y/label"], [sorted(CLASSES).index(c) for c in cls])
        expect_len = [min(len(tok(text_of[i])["input_ids"]), TEXT_LEN) for i in a["ids"]]
        np.testing.assert_array_equal(a["len/text"], expect_len)
        np.testing.assert_array_equal(a["len/image"], 5)
        # features are real, sample-specific numbers: no two samples share their image tokens
        flat = np.asarray(a["x/image"], dtype=np.float32).reshape(len(cls), -1)
        assert np.isfinite(flat).all() and len(np.unique(flat.round(3), axis=0)) == len(cls)
    assert TEXT_LEN in store.open_split("test")["len/text"]  # the long text was truncated ...
    assert built["prov"]["text_truncated"]["test"] == 1      # ... and counted
    assert built["prov"]["valid_split"]["ids"] == list(ids["valid"])


def test_loader_batches_carry_encoder_outputs(built, encoders):
    store, root = built["store"], built["root"]
    for split in ("train", "valid", "test"):
        arrays = store.open_split(split)
        loader = SplitLoader(arrays, store.schema, "label", batch_size=4, shuffle=False, seed=0)
        batch = next(iter(loader))
        assert batch.x["image"].shape == (4, 5, 16) and batch.x["text"].shape == (4, TEXT_LEN, 16)
        assert batch.x["text"].dtype == torch.float32 and batch.y.dtype == torch.long
        text_of = {f"{sp}/{c}/{f}": t for sp in ("train", "test") for f, t, c in built["rows"][sp]}
        for row in (0, 3):
            sid = str(arrays["ids"][row])
            want_t, want_len = direct_text(encoders, text_of[sid])
            want_i = direct_image(encoders, root / "images" / sid, side=2)
            np.testing.assert_allclose(batch.x["text"][row].numpy(), want_t, atol=3e-3, rtol=2e-3)
            np.testing.assert_allclose(batch.x["image"][row].numpy(), want_i, atol=3e-3, rtol=2e-3)
            assert int(batch.lengths["text"][row]) == want_len
            assert int(batch.y[row]) == sorted(CLASSES).index(sid.split("/")[1])
            # and not the features of a neighbouring sample
            other = direct_image(encoders, root / "images" / str(arrays["ids"][row + 1]), side=2)
            assert np.abs(batch.x["image"][row].numpy() - other).max() > 0.05


def test_float32_processor_all_tokens_exact(tmp_path, encoders):
    root = tmp_path / "upmc"
    rows = make_raw(root, header=True)  # a header line is detected and skipped
    schema, splits, prov = convert(root, encoders, dtype="float32", image_transform="processor", image_tokens=None,
                                   workers=2)
    assert prov["csv"]["train"]["header"] == ["image_path", "text", "food"]
    assert [(m.name, m.length) for m in schema.modalities] == [("image", 17), ("text", TEXT_LEN)]
    store = FeatureStore(write_store(tmp_path / "store", schema, splits, prov))
    a = store.open_split("test")
    assert a["x/image"].dtype == np.float32 and len(a["ids"]) == len(rows["test"])
    for row in range(len(a["ids"])):
        sid = str(a["ids"][row])
        want = direct_image(encoders, root / "images" / sid, side=None, processor=True)
        np.testing.assert_allclose(a["x/image"][row], want, atol=1e-5, rtol=1e-5)
        text = next(t for f, t, c in rows["test"] if f"test/{c}/{f}" == sid)
        np.testing.assert_allclose(a["x/text"][row], direct_text(encoders, text)[0], atol=1e-5, rtol=1e-5)
    # the two transforms really differ (normalised vs [0, 1] input)
    cggm = direct_image(encoders, root / "images" / str(a["ids"][0]), side=None)
    assert np.abs(cggm - a["x/image"][0]).max() > 0.05
    assert not scratch_left(root)


def test_valid_split_is_seeded(tmp_path, encoders):
    root = tmp_path / "upmc"
    make_raw(root)

    def valid_ids(seed):
        _, splits, prov = convert(root, encoders, seed=seed)
        arrays = dict((s, a) for s, a, _ in splits)
        assert list(arrays["valid"]["ids"]) == prov["valid_split"]["ids"]
        assert prov["valid_split"]["seed"] == seed
        return list(arrays["valid"]["ids"])

    a0, b0, a1 = valid_ids(0), valid_ids(0), valid_ids(1)
    assert a0 == b0 and a0 != a1
    for ids in (a0, a1):  # stratified: 2 of each class's 6 rows
        assert sorted(i.split("/")[1] for i in ids) == sorted(CLASSES * 2)
    # the split itself, on a larger id list: seed decides, sizes follow the fraction per class
    recs = [food101._Record(id=f"train/{c}/{i}", image=Path("x"), text="t", cls=c, row=i)
            for c in "abc" for i in range(40)]
    t0, v0 = food101._carve_valid(recs, valid_fraction=0.25, seed=7)
    t1, v1 = food101._carve_valid(recs, valid_fraction=0.25, seed=8)
    assert len(v0) == len(v1) == 30 and len(t0) == 90 and {r.id for r in v0} != {r.id for r in v1}
    assert {r.id for r in v0} == {r.id for r in food101._carve_valid(recs, valid_fraction=0.25, seed=7)[1]}


# ---------------------------------------------------------------------------------------------
# Validation failures: named, before encoding, nothing left behind


def _break(kind: str, root: Path, rows: dict) -> tuple[str, list[str]]:
    """Damage the tree; return (file expected in the message, further expected substrings)."""
    if kind == "missing_image":
        (root / "images/train/sushi/sushi_2.jpg").unlink()
        return "sushi_2.jpg", ["split=train", "image file not found", "row"]
    if kind == "truncated_jpeg":
        p = root / "images/test/pizza/pizza_1.jpg"
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return "pizza_1.jpg", ["split=test", "unreadable image", "row"]
    if kind == "unknown_class":
        rows["test"].append(["ramen_0.jpg", "ramen bowl", "ramen"])
        write_csvs(root, rows)
        return "test_titles.csv", ["split=test", "unknown class 'ramen'", f"row {len(rows['test'])}"]
    if kind == "empty_text":
        rows["train"][4][1] = "  "
        write_csvs(root, rows)
        return "train_titles.csv", ["split=train", "empty text", "row 5"]
    if kind == "duplicate_id":
        rows["train"].append(list(rows["train"][2]))
        write_csvs(root, rows)
        return "train_titles.csv", ["split=train", "duplicate id", "also row 3"]
    if kind == "missing_csv":
        (root / "texts/test_titles.csv").unlink()
        return "test_titles.csv", ["split=test", "CSV not found"]
    if kind == "short_record":
        rows["train"][1] = rows["train"][1][:2]
        write_csvs(root, rows)
        return "train_titles.csv", ["split=train", "expected 3 fields", "row 2"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_image", "truncated_jpeg", "unknown_class", "empty_text", "duplicate_id",
                                  "missing_csv", "short_record"])
def test_bad_raw_data_is_named_before_encoding(tmp_path, encoders, kind, monkeypatch):
    root = tmp_path / "upmc"
    rows = make_raw(root)
    file, parts = _break(kind, root, rows)

    def no_encoding(*a, **k):
        raise AssertionError("encoding started before validation finished")

    monkeypatch.setattr(food101, "_encode_split", no_encoding)
    with pytest.raises(DataValidationError) as e:
        convert(root, encoders)
    msg = str(e.value)
    assert file in msg and f"file={root}" in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    assert not scratch_left(root)


def test_empty_text_can_be_kept(tmp_path, encoders):
    root = tmp_path / "upmc"
    rows = make_raw(root)
    rows["test"][1][1] = ""
    write_csvs(root, rows)
    _, splits, prov = convert(root, encoders, empty_text="keep")
    test = dict((s, a) for s, a, _ in splits)["test"]
    sid = f"test/{rows['test'][1][2]}/{rows['test'][1][0]}"
    assert prov["csv"]["test"]["empty_text_kept"] == 1
    assert int(test["len/text"][list(test["ids"]).index(sid)]) == 2  # [CLS] [SEP]


def test_all_problems_are_counted(tmp_path, encoders):
    root = tmp_path / "upmc"
    make_raw(root)
    for f in ("images/train/sushi/sushi_0.jpg", "images/train/pizza/pizza_3.jpg", "images/test/sushi/sushi_1.jpg"):
        (root / f).unlink()
    with pytest.raises(DataValidationError, match=r"3 image problems in all") as e:
        convert(root, encoders)
    assert "pizza_3.jpg" in str(e.value) and "sushi_1.jpg" in str(e.value)


def test_scratch_removed_on_encoding_failure_and_success(tmp_path, encoders, monkeypatch):
    root = tmp_path / "upmc"
    make_raw(root)
    calls = {"n": 0}
    real = food101._reduce_image

    def fail_later(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-way through train, after scratch arrays exist
            assert scratch_left(root), "scratch folder should exist while encoding"
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(food101, "_reduce_image", fail_later)
    with pytest.raises(RuntimeError, match="boom"):
        convert(root, encoders)
    assert calls["n"] == 3 and not scratch_left(root)
    monkeypatch.setattr(food101, "_reduce_image", real)
    schema, splits, prov = convert(root, encoders)
    assert not scratch_left(root)  # deleted once encoded; the open maps still hold the data
    arrays = dict((s, a) for s, a, _ in splits)
    assert np.asarray(arrays["train"]["x/text"], dtype=np.float32).std() > 0.1
    assert prov["scratch"].startswith(str(root.parent / "scratch"))


# ---------------------------------------------------------------------------------------------
# Encoder folders and parameters


def test_missing_encoder_param_names_it_and_hints(tmp_path, encoders):
    root = tmp_path / "upmc"
    make_raw(root)
    with pytest.raises(EncoderFolderError) as e:
        convert(root, {"image_encoder": encoders["image_encoder"]})
    msg = str(e.value)
    assert e.value.key == "text_encoder" and "text_encoder" in msg
    assert "config.json" in msg and "model.safetensors" in msg and "vocab.txt" in msg
    assert "save_pretrained" in msg and "google-bert/bert-base-uncased" in msg
    assert isinstance(e.value, DataValidationError)


@pytest.mark.parametrize("param,remove,expect", [
    ("image_encoder", "preprocessor_config.json", "preprocessor_config.json"),
    ("text_encoder", "model.safetensors", "pytorch_model.bin"),
    ("image_encoder", "config.json", "config.json"),
])
def test_encoder_folder_lacking_files(tmp_path, encoders, param, remove, expect):
    import shutil

    root = tmp_path / "upmc"
    make_raw(root)
    broken = tmp_path / "broken"
    shutil.copytree(encoders[param], broken)
    (broken / remove).unlink()
    with pytest.raises(EncoderFolderError) as e:
        convert(root, {**encoders, param: str(broken)})
    msg = str(e.value)
    assert f"file={broken}" in msg and f"key={param}" in msg and expect in msg and "save_pretrained" in msg
    assert not scratch_left(root)


def test_encoder_folder_not_found(tmp_path, encoders):
    root = tmp_path / "upmc"
    make_raw(root)
    with pytest.raises(EncoderFolderError, match=r"key=image_encoder.*folder not found.*preprocessor_config.json"):
        convert(root, {**encoders, "image_encoder": str(tmp_path / "nowhere")})


def test_image_tokens_must_fit_the_grid(tmp_path, encoders):
    root = tmp_path / "upmc"
    make_raw(root)
    with pytest.raises(ValueError, match=r"one of \[2, 5, 10, 17\]"):
        convert(root, encoders, image_tokens=7)
    assert food101._image_token_plan(None, 1, 14) == (197, 14)
    assert food101._image_token_plan(50, 1, 14) == (50, 7)
    assert food101._image_token_plan(49, 0, 7) == (49, 7)


def test_reduce_image_pools_the_patch_grid():
    h = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    out = food101._reduce_image(h, 1, 4, 2)
    assert out.shape == (2, 5, 3)
    torch.testing.assert_close(out[:, 0], h[:, 0])
    grid = h[:, 1:].reshape(2, 4, 4, 3)
    torch.testing.assert_close(out[:, 1], grid[:, :2, :2].mean(dim=(1, 2)))
    torch.testing.assert_close(out[:, 4], grid[:, 2:, 2:].mean(dim=(1, 2)))
    fmap = torch.randn(2, 3, 4, 4)  # ResNet-style (B, C, H, W): no prefix
    torch.testing.assert_close(food101._reduce_image(fmap, 0, 4, 4), fmap.flatten(2).transpose(1, 2))


def test_storage_estimate():
    assert estimate_store_bytes() == 90_704 * (50 + 50) * 768 * 2  # ~13.9 GB
    assert estimate_store_bytes(image_tokens=197) == 90_704 * 247 * 768 * 2  # ~34.4 GB
    assert estimate_store_bytes(10, dtype="float32") == 10 * 100 * 768 * 4
