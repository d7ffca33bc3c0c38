"""BraTS 2021 conversion on tiny real ``.nii.gz`` cases, and the schema/loader support for volumes."""

from __future__ import annotations

import gc
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mmrepro.data.brats import (BRATS_REGIONS, MODALITIES, convert_brats, crop_window, region_masks, split_sizes,
                                to_brats_labels)
from mmrepro.data.loader import SplitLoader
from mmrepro.data.standin.volumes import write_case
from mmrepro.data.schema import (DataValidationError, DatasetSchema, ModalitySpec, TaskSpec, count_nonfinite,
                                 validate_split)
from mmrepro.data.store import FeatureStore, write_store

SHAPE = (24, 20, 16)
BRAIN = (slice(4, 20), slice(3, 17), slice(2, 14))  # brain box 16 x 14 x 12
CROP = (12, 16, 10)  # crops axes 0 and 2, pads axis 1
KEYS = (*MODALITIES, "seg")
SPLITS = {"train": 0.6, "valid": 0.2, "test": 0.2}


def make_case(root: Path, i: int, *, shape=SHAPE) -> dict[str, np.ndarray]:
    """Write one case in the release's naming; return the arrays written (seg in BraTS labels)."""
    rng = np.random.default_rng(100 + i)
    case = f"BraTS2021_{i:05d}"
    brain = np.zeros(shape, bool)
    brain[BRAIN] = True
    brain[4, 3, 2] = False  # a dent: the box stays, the mask is not a full box
    out = {}
    for k, m in enumerate(MODALITIES):
        v = np.zeros(shape, np.int16)
        v[brain] = rng.integers(50 + 100 * k, 400 + 150 * k, size=int(brain.sum()))
        out[m] = v
    seg = np.zeros(shape, np.uint8)
    c = (12 + i % 3 - 1, 10, 8)  # tumour near the brain centre, moving a little per case
    seg[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 2:c[2] + 2] = 2  # oedema
    seg[c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 2, c[2] - 1:c[2] + 1] = 1  # necrotic core
    seg[c[0] - 1:c[0] + 1, c[1] - 1:c[1] + 1, c[2] - 1:c[2] + 1] = 4  # enhancing
    out["seg"] = seg
    write_case(root, case, out)
    return out


@pytest.fixture
def raw(tmp_path: Path):
    root = tmp_path / "BraTS2021_Training_Data"
    cases = {f"BraTS2021_{i:05d}": make_case(root, i) for i in range(5)}
    (root / "README.txt").write_text("not a case")
    return root, cases


def convert(root: Path, tmp_path: Path, **kw):
    kw = {"crop": CROP, "splits": SPLITS, "seed": 3, "scratch_dir": tmp_path / "scratch", **kw}
    (tmp_path / "scratch").mkdir(parents=True, exist_ok=True)
    return convert_brats(root, name="brats", **kw)


def stored(tmp_path: Path, root: Path, **kw) -> FeatureStore:
    schema, splits, prov = convert(root, tmp_path, **kw)
    write_store(tmp_path / "store", schema, splits, prov)
    assert list((tmp_path / "scratch").iterdir()) == []  # scratch gone once the store is written
    return FeatureStore(tmp_path / "store")


def case_rows(fs: FeatureStore):
    """(case, split arrays, row) for every stored case."""
    for split in fs.splits:
        arrays = fs.open_split(split)
        for row, case in enumerate(arrays["ids"].tolist()):
            yield case, arrays, row


def expected_window(crop):
    lo = [s.start for s in BRAIN]
    hi = [s.stop for s in BRAIN]
    return crop_window(lo, hi, crop)


# ---------------------------------------------------------------------------------------------
# End to end: convert, store, reopen, load


def test_store_round_trip_schema_and_loader_batches(raw, tmp_path):
    root, cases = raw
    fs = stored(tmp_path, root)
    fs.verify()
    m = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert m["schema"]["modalities"] == [{"name": n, "shape": [1, *CROP]} for n in MODALITIES]
    assert m["schema"]["tasks"] == [{"name": "seg", "type": "segmentation", "value_range": None,
                                     "num_classes": 4, "shape": list(CROP)}]
    assert m["schema"]["splits"] == ["train", "valid", "test"]
    assert fs.schema.modality("t1ce").shape == (1, *CROP) and not fs.schema.modality("t1ce").is_sequence
    assert {s: m["splits"][s]["n"] for s in fs.splits} == {"train": 3, "valid": 1, "test": 1}
    prov = m["provenance"]
    assert prov["case_splits"] == {s: fs.open_split(s)["ids"].tolist() for s in fs.splits}
    assert sorted(sum(prov["case_splits"].values(), [])) == sorted(cases)
    assert prov["source_files"] == 25 and len(prov["source_sha256"]) == 64
    assert prov["nonstandard_shapes"] == {c: list(SHAPE) for c in cases}
    assert prov["ignored_entries"] == {"count": 1, "examples": ["README.txt"]}
    assert prov["params"]["crop"] == list(CROP) and prov["params"]["seed"] == 3
    train = fs.open_split("train")
    assert not any(k.startswith("len/") for k in train)
    assert train["x/flair"].dtype == np.float16 and train["y/seg"].dtype == np.uint8
    ld = SplitLoader(train, fs.schema, "seg", batch_size=2, shuffle=True, seed=0)
    batches = list(ld)
    assert [len(b) for b in batches] == [2, 1]
    b = batches[0]
    assert set(b.x) == set(MODALITIES) and b.lengths == {}
    for v in b.x.values():
        assert v.shape == (2, 1, *CROP) and v.dtype == torch.float32
    assert b.y.shape == (2, *CROP) and b.y.dtype == torch.int64
    assert b.present.shape == (2, 4) and bool(b.present.all())
    rows = b.index.numpy()
    np.testing.assert_array_equal(b.x["t2"].numpy(), train["x/t2"][rows].astype(np.float32))
    np.testing.assert_array_equal(b.y.numpy(), train["y/seg"][rows])
    # present masks and modality subsets work as for sequences
    present = np.array([[1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], bool)
    b = SplitLoader(train, fs.schema, "seg", batch_size=3, shuffle=False, seed=0, present=present,
                    modalities=["t2", "flair"]).batch(np.arange(3))
    assert set(b.x) == {"t2", "flair"} and b.present.tolist() == [[True, True], [True, True], [True, False]]


def test_normalisation_brain_voxels_zero_mean_unit_std(raw, tmp_path):
    root, cases = raw
    fs = stored(tmp_path, root, crop=(20, 16, 14), dtype="float32")  # pads every axis: no brain voxel lost
    src, dst = expected_window((20, 16, 14))
    for case, arrays, row in case_rows(fs):
        for m in MODALITIES:
            x = np.asarray(arrays[f"x/{m}"][row, 0], dtype=np.float64)
            brain = x != 0
            assert brain.sum() == np.count_nonzero(cases[case][m])
            assert abs(x[brain].mean()) < 1e-5 and abs(x[brain].std() - 1) < 1e-5, (case, m)
            # the same voxels, in the same place: an independent z-score of the raw file
            v = cases[case][m].astype(np.float64)
            z = np.where(v != 0, (v - v[v != 0].mean()) / v[v != 0].std(), 0)
            np.testing.assert_allclose(x[dst], z[src], atol=1e-5)
            window = np.zeros(x.shape, bool)
            window[dst] = True
            assert not x[~window].any()  # padding is background
    # float16 store: the same statistics within float16 precision
    fs16 = stored(tmp_path / "f16", root)
    for case, arrays, row in case_rows(fs16):
        x = np.asarray(arrays["x/t1"][row, 0], dtype=np.float64)
        assert abs(x[x != 0].mean()) < 0.2 and abs(x[x != 0].std() - 1) < 0.1  # cropped: a subset of the brain


def test_labels_remapped_and_regions(raw, tmp_path):
    root, cases = raw
    fs = stored(tmp_path, root)
    src, dst = expected_window(CROP)
    for case, arrays, row in case_rows(fs):
        y = np.asarray(arrays["y/seg"][row])
        orig = cases[case]["seg"]
        assert set(np.unique(y).tolist()) == {0, 1, 2, 3}
        np.testing.assert_array_equal(to_brats_labels(y)[dst], orig[src])
        masks = region_masks(y)
        assert set(masks) == {"ET", "TC", "WT"}
        for region, labels in BRATS_REGIONS.items():
            np.testing.assert_array_equal(masks[region][dst], np.isin(orig[src], labels), err_msg=region)
            assert masks[region].dtype == bool
        # torch tensors too
        tmasks = region_masks(torch.from_numpy(y.astype(np.int64)))
        for region in masks:
            assert tmasks[region].dtype == torch.bool
            np.testing.assert_array_equal(tmasks[region].numpy(), masks[region])
    assert region_masks(np.array([0, 1, 2, 3]))["TC"].tolist() == [False, True, False, True]
    assert region_masks(np.array([0, 1, 2, 3]))["WT"].tolist() == [False, True, True, True]
    assert region_masks(np.array([0, 1, 2, 3]))["ET"].tolist() == [False, False, False, True]


def test_crop_and_pad_keep_the_tumour_and_record_losses(raw, tmp_path):
    root, cases = raw
    schema, splits, prov = convert(root, tmp_path)
    assert prov["crop"] == {"brain_box_exceeds_crop": 5, "tumour_voxels_lost": {}, "tumour_voxels_lost_total": 0}
    counts = np.zeros(4, np.int64)
    for split, arrays, _ in splits:
        assert arrays["x/t1"].shape == (len(arrays["ids"]), 1, *CROP) and arrays["y/seg"].shape[1:] == CROP
        for row, case in enumerate(arrays["ids"].tolist()):
            y, orig = arrays["y/seg"][row], cases[case]["seg"]
            for lab, internal in ((1, 1), (2, 2), (4, 3)):
                assert np.count_nonzero(y == internal) == np.count_nonzero(orig == lab), (case, lab)
            # axis 1 was padded: 14 brain voxels centred in 16, zero rows on both sides
            x = arrays["x/t2"][row, 0]
            assert not x[:, 0].any() and not x[:, -1].any() and x[:, 1].any() and x[:, -2].any()
            counts += np.bincount(y.ravel(), minlength=4)
    assert set(prov["label_voxels"]) == set(SPLITS)
    assert np.array(list(prov["label_voxels"].values())).sum(0).tolist() == counts.tolist()
    # a crop smaller than the tumour cuts it, and the provenance says how much per case
    _, splits, prov = convert(root, tmp_path / "small", crop=(4, 4, 2))
    list(splits)
    lost = prov["crop"]["tumour_voxels_lost"]
    assert set(lost) == set(cases) and all(n > 0 for n in lost.values())
    assert prov["crop"]["tumour_voxels_lost_total"] == sum(lost.values())


def test_crop_window_centre_crop_and_pad():
    src, dst = crop_window([2, 0], [12, 4], [6, 8])
    assert src == (slice(4, 10), slice(0, 4)) and dst == (slice(0, 6), slice(2, 6))
    src, dst = crop_window([0], [5], [5])
    assert src == (slice(0, 5),) and dst == (slice(0, 5),)


def test_seeded_split_is_deterministic(raw, tmp_path):
    root, cases = raw
    a = convert(root, tmp_path / "a", seed=7)[2]["case_splits"]
    b = convert(root, tmp_path / "b", seed=7)[2]["case_splits"]
    assert a == b
    others = [convert(root, tmp_path / f"s{s}", seed=s)[2]["case_splits"] for s in range(4)]
    assert any(o != a for o in others)
    for s in [a, *others]:
        assert [len(v) for v in s.values()] == [3, 1, 1]
        assert sorted(sum(s.values(), [])) == sorted(cases)
        assert all(v == sorted(v) for v in s.values())
    gc.collect()
    for sub in ("a", "b", *(f"s{s}" for s in range(4))):
        assert list((tmp_path / sub / "scratch").iterdir()) == []  # never iterated, collected: removed


def test_split_sizes():
    assert split_sizes(5, SPLITS) == {"train": 3, "valid": 1, "test": 1}
    assert split_sizes(10, {"train": 0.7, "valid": 0.1, "test": 0.2}) == {"train": 7, "valid": 1, "test": 2}
    assert split_sizes(1251, {"train": 0.7, "valid": 0.1, "test": 0.2}) == {"train": 876, "valid": 125, "test": 250}
    assert split_sizes(3, {"train": 0.98, "valid": 0.01, "test": 0.01}) == {"train": 1, "valid": 1, "test": 1}
    with pytest.raises(ValueError, match="cannot fill"):
        split_sizes(2, SPLITS)


def test_bad_parameters(raw, tmp_path):
    root, _ = raw
    with pytest.raises(ValueError, match="crop"):
        convert(root, tmp_path, crop=(8, 8))
    with pytest.raises(ValueError, match="fractions"):
        convert(root, tmp_path, splits={"train": 0.5, "test": 0.4})
    with pytest.raises(ValueError, match="dtype"):
        convert(root, tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="modalities"):
        convert(root, tmp_path, modalities=("t1", "dwi"))
    with pytest.raises(DataValidationError, match="no case folders"):
        convert(tmp_path / "scratch", tmp_path)
    with pytest.raises(DataValidationError, match=r"5 case\(s\) cannot fill 6 splits"):
        convert(root, tmp_path, splits={f"s{i}": 1 / 6 for i in range(6)})
    assert list((tmp_path / "scratch").iterdir()) == []


def test_modality_subset_and_order(raw, tmp_path):
    root, _ = raw
    schema, splits, _ = convert(root, tmp_path, modalities=("t2", "flair"))
    assert schema.modality_names == ["t2", "flair"]
    arrays = dict((s, a) for s, a, _ in splits)["train"]
    assert sorted(k for k in arrays if k.startswith("x/")) == ["x/flair", "x/t2"]


# ---------------------------------------------------------------------------------------------
# Failures: each names the file, the split and the key, and leaves no scratch


def _rewrite(path: Path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def _missing(path):
    path.unlink()


def _shape_mismatch(path):
    _rewrite(path, np.ones((24, 20, 15), np.int16))


def _nan(path):
    v = nib.load(path).get_fdata().astype(np.float32)
    v[10, 10, 8] = np.nan
    _rewrite(path, v)


def _inf(path):
    v = nib.load(path).get_fdata().astype(np.float32)
    v[10, 10, 8] = -np.inf
    v[11, 10, 8] = np.inf
    _rewrite(path, v)


def _label_3(path):
    v = np.asarray(nib.load(path).dataobj).copy()
    v[5, 5, 5] = 3
    _rewrite(path, v)


def _label_fraction(path):
    v = nib.load(path).get_fdata().astype(np.float32)
    v[5, 5, 5] = 0.5
    _rewrite(path, v)


def _truncated(path):
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])


def _corrupt(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # gzip CRC/stream fails
    path.write_bytes(bytes(raw))


def _not_gzip(path):
    path.write_bytes(b"this is not a NIfTI file")


def _header_damage(path):
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[344:348] = b"XXXX"  # NIfTI magic
    path.write_bytes(gzip.compress(bytes(raw)))


def _four_d(path):
    _rewrite(path, np.ones((*SHAPE, 2), np.int16))


def _all_zero(path):
    _rewrite(path, np.zeros(SHAPE, np.int16))


def _constant(path):
    v = np.asarray(nib.load(path).dataobj).copy()
    v[v != 0] = 7
    _rewrite(path, v)


FAILURES = [
    (_missing, "t1ce", "missing file"),
    (_shape_mismatch, "t2", r"shape \(24, 20, 15\) differs from the case's flair shape \(24, 20, 16\)"),
    (_nan, "flair", r"1 NaN/inf voxel\(s\)"),
    (_inf, "t1", r"2 NaN/inf voxel\(s\)"),
    (_label_3, "seg", r"labels must be in \[0, 1, 2, 4\], found \[3\]"),
    (_label_fraction, "seg", "non-integer label values"),
    (_truncated, "t1", "unreadable or truncated .nii.gz"),
    (_corrupt, "t2", "unreadable or truncated .nii.gz"),
    (_not_gzip, "seg", "unreadable or truncated .nii.gz"),
    (_header_damage, "flair", "unreadable or truncated .nii.gz"),
    (_four_d, "t1ce", r"expected a 3-D volume, found shape \(24, 20, 16, 2\)"),
    (_all_zero, "t1", "no brain voxels"),
    (_constant, "t2", "constant"),
]


@pytest.mark.parametrize("damage,key,message", FAILURES, ids=[f[0].__name__.strip("_") for f in FAILURES])
def test_bad_case_names_file_split_and_key(raw, tmp_path, damage, key, message):
    root, _ = raw
    case = "BraTS2021_00003"
    path = root / case / f"{case}_{key}.nii.gz"
    split = next(s for s, names in convert(root, tmp_path / "ok")[2]["case_splits"].items() if case in names)
    damage(path)
    with pytest.raises(DataValidationError, match=message) as ei:
        convert(root, tmp_path)
    err = ei.value
    assert (err.file, err.split, err.key) == (str(path), split, key)
    assert str(err).startswith(f"file={path}, split={split}, key={key}: ")
    assert list((tmp_path / "scratch").iterdir()) == []  # scratch removed


# ---------------------------------------------------------------------------------------------
# Schema and loader support for array modalities and segmentation


VOL = DatasetSchema(
    name="vol",
    modalities=(ModalitySpec("seq", length=5, dim=3), ModalitySpec("img", shape=(2, 4, 3, 2))),
    tasks=(TaskSpec("seg", "segmentation", num_classes=3, shape=(4, 3, 2)),),
    splits=("train",),
)


def vol_arrays(n=4):
    rng = np.random.default_rng(0)
    return {"x/seq": rng.standard_normal((n, 5, 3)).astype(np.float32), "len/seq": np.full(n, 5),
            "x/img": rng.standard_normal((n, 2, 4, 3, 2)).astype(np.float16),
            "y/seg": rng.integers(0, 3, (n, 4, 3, 2)).astype(np.uint8), "ids": np.array([f"v{i}" for i in range(n)])}


def test_schema_dict_forms_and_old_manifests():
    seq = ModalitySpec("a", 6, 5)
    assert seq.is_sequence and seq.sample_shape == (6, 5)
    assert seq.to_dict() == {"name": "a", "length": 6, "dim": 5}
    assert ModalitySpec("v", shape=[1, 8, 8, 8]).shape == (1, 8, 8, 8)
    d = json.loads(json.dumps(VOL.to_dict()))
    assert d["modalities"] == [{"name": "seq", "length": 5, "dim": 3}, {"name": "img", "shape": [2, 4, 3, 2]}]
    assert d["tasks"] == [{"name": "seg", "type": "segmentation", "value_range": None, "num_classes": 3,
                           "shape": [4, 3, 2]}]
    assert DatasetSchema.from_dict(json.loads(json.dumps(d))) == VOL
    old = {"name": "tiny", "modalities": [{"name": "a", "length": 6, "dim": 5}],
           "tasks": [{"name": "score", "type": "regression", "value_range": [-3.0, 3.0], "num_classes": None},
                     {"name": "cls", "type": "classification", "value_range": None, "num_classes": 3}],
           "splits": ["train"], "has_present_mask": False, "extra": {}}
    schema = DatasetSchema.from_dict(old)
    assert schema.to_dict() == {**old, "splits": ("train",), "modalities": tuple(old["modalities"]),
                                "tasks": ({**old["tasks"][0], "value_range": (-3.0, 3.0)}, old["tasks"][1])}
    assert json.loads(json.dumps(schema.to_dict())) == old
    assert schema.expected_arrays(2)["len/a"] == ((2,), "i")
    exp = VOL.expected_arrays(7)
    assert exp["x/img"] == ((7, 2, 4, 3, 2), "f") and "len/img" not in exp and exp["y/seg"] == ((7, 4, 3, 2), "i")
    for bad in (lambda: ModalitySpec("x"), lambda: ModalitySpec("x", 3), lambda: ModalitySpec("x", 3, 2, shape=(1,)),
                lambda: ModalitySpec("x", shape=()), lambda: ModalitySpec("x", shape=(1, 0)),
                lambda: TaskSpec("s", "segmentation", num_classes=2), lambda: TaskSpec("s", "segmentation", shape=(2,)),
                lambda: TaskSpec("c", "classification", num_classes=2, shape=(2,))):
        with pytest.raises(ValueError):
            bad()


@pytest.mark.parametrize("corrupt,key,message", [
    (lambda a: a["y/seg"].__setitem__((1, 0, 0, 0), 3), "y/seg", r"class labels must lie in \[0, 2\], found \[0, 3\]"),
    (lambda a: a.__setitem__("y/seg", a["y/seg"][:, :3]), "y/seg",
     r"expected shape \(4, 4, 3, 2\), found \(4, 3, 3, 2\)"),
    (lambda a: a.__setitem__("y/seg", a["y/seg"].astype(np.float32)), "y/seg", "expected dtype kind 'i'"),
    (lambda a: a["x/img"].__setitem__((3, 1, 2, 2, 1), np.inf), "x/img", r"1 NaN/inf"),
    (lambda a: a.__setitem__("x/img", a["x/img"][:, :1]), "x/img", r"expected shape \(4, 2, 4, 3, 2\)"),
    (lambda a: a["len/seq"].__setitem__(0, 6), "len/seq", r"lengths must lie in \[0, 5\]"),
])
def test_validate_split_volumes_and_segmentation(corrupt, key, message):
    arrays = vol_arrays()
    assert validate_split(VOL, "train", arrays, file="f") == 4
    corrupt(arrays)
    with pytest.raises(DataValidationError, match=message) as ei:
        validate_split(VOL, "train", arrays, file="f")
    assert ei.value.key == key


def test_count_nonfinite_chunks_large_rows():
    a = np.zeros((3, 64, 64, 64), np.float16)
    a[2, 1, 2, 3] = np.nan
    a[0, 0, 0, 0] = np.inf
    assert count_nonfinite(a) == 2 == count_nonfinite(a, rows_per_chunk=1) == count_nonfinite(a, rows_per_chunk=256)
    assert count_nonfinite(np.float32(np.nan)) == 1


def test_mixed_store_and_loader(tmp_path):
    arrays = vol_arrays(5)
    write_store(tmp_path / "s", VOL, [("train", arrays, {})], {"source": "hand"})
    fs = FeatureStore(tmp_path / "s")
    assert fs.schema == VOL
    ld = SplitLoader(fs.open_split("train"), fs.schema, "seg", batch_size=3, shuffle=False, seed=0)
    b = ld.batch(np.array([0, 2]))
    assert b.x["img"].shape == (2, 2, 4, 3, 2) and b.x["img"].dtype == torch.float32
    assert b.x["seq"].shape == (2, 5, 3) and set(b.lengths) == {"seq"}
    assert b.y.shape == (2, 4, 3, 2) and b.y.dtype == torch.int64
    np.testing.assert_array_equal(b.y.numpy(), arrays["y/seg"][[0, 2]])
    moved = b.to("cpu")
    assert moved.y.shape == b.y.shape
