"""Converter for BraTS 2021 (multimodal MRI brain-tumour segmentation) into a feature store.

``convert_brats(path, *, name, ...)`` returns ``(schema, splits, provenance)`` for
:func:`mmrepro.data.store.write_store`, like the converters of :mod:`mmrepro.data.mmsa`.

Input: the BraTS 2021 training release, one folder per case, ``BraTS2021_XXXXX/`` holding
``BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz`` (240x240x155 in the release; other shapes are
accepted as long as the five files of a case agree). Labels: 0 background, 1 necrotic tumour
core, 2 oedema, 4 enhancing tumour.

Store layout (see :mod:`mmrepro.data.schema`): one array modality per MRI sequence, default order
``flair, t1ce, t1, t2`` (CGGM's), ``x/<m>`` ``(N, 1, *crop)`` in ``dtype`` (float16 by default:
z-scores need no more), a ``segmentation`` task ``seg`` with 4 classes, ``y/seg`` uint8
``(N, *crop)``, ``ids`` = case names. Spatial axes are the NIfTI voxel axes (i, j, k) as stored
on disk, not reoriented; in the release k is the axial slice axis (the one CGGM slices).
:class:`mmrepro.data.loader.SplitLoader` yields ``(B, 1, *crop)`` float32 volumes and int64
``(B, *crop)`` label maps.

Preprocessing, per case, in this order:

1. Read and check the five files (each error is a :class:`DataValidationError` naming the file,
   the split the case was assigned to, and the key ``t1``/``t1ce``/``t2``/``flair``/``seg``):
   missing file, unreadable or truncated ``.nii.gz`` (gzip CRC/length and NIfTI header are
   checked), not 3-D, shape differing from the case's other files, NaN/inf, a modality with no
   nonzero (brain) voxel or constant over the brain, non-integer seg values or values outside
   {0, 1, 2, 4}.
2. Z-score each modality over its own brain voxels (nonzero voxels of that modality; statistics
   in float64); background stays exactly 0.
3. Crop to the brain bounding box (voxels nonzero in any modality), then per axis centre-crop
   (box larger than ``crop``) or zero-pad symmetrically (smaller) to ``crop``. The same window
   applies to the label map (padding is background). Tumour voxels cut off by the fixed crop are
   counted per case in the provenance (``crop.tumour_voxels_lost``); nothing is silently lost.
4. Remap label 4 -> 3 (internal classes 0..3). :func:`region_masks` gives the evaluation regions
   on internal labels (ET = {3}, TC = {1, 3}, WT = {1, 2, 3}, i.e. {4}, {1, 4}, {1, 2, 4} in
   BraTS labels) and :func:`to_brats_labels` maps predictions back.

Split: case-level, seeded (``numpy.random.default_rng(seed)`` permutation of the sorted case
names), sizes from the ``splits`` fractions by largest remainder, every split at least one case;
the case names of each split, the seed and fractions are recorded in the provenance, so the split
is reproducible and inspectable. Memory: cases are processed one at a time straight into
``numpy.lib.format.open_memmap`` scratch arrays (in ``scratch_dir``, default the system temporary
directory: point it at a large disk for the real release: 18 MiB per case at 128^3 and float16,
about 22 GiB for the 1251 training cases, and while :func:`write_store` copies them into the
store both copies exist for a while); the scratch folder is removed if conversion fails, each split's scratch files once
:func:`write_store` has taken the next split, and the whole folder when the returned iterator is
exhausted or garbage-collected. The provenance records a SHA-256 over all source files read.

What was confirmed from the official CGGM code (``zrguo/CGGM`` at ``d7890a8``; read
``datasets/BratsDataset.py``, ``datasets/dataloader.py``, ``run/brats_run.py``,
``src/segtrain.py``, ``src/eval_metrics.py``, ``models/segmodel.py``, ``README.md``; nothing copied)
-----------------------------------------------------------------------------------------------
* The public code holds **no BraTS preprocessing**: its dataset class reads ready-made HDF5
  files, one per case, from sub-folders ``train``, ``valid`` and ``test`` of the data path, each
  with an ``image`` array (4 channels first, then three spatial axes) and a ``label`` array. So
  CGGM's normalisation, its volume crop and its case split (fractions, seed, case lists) **could
  not be confirmed**; the z-score-over-brain / bounding-box crop / 70-10-20 seeded split here are
  this project's choices, following ``datasets.md``.
* Channel order of those files (from the model's per-backbone comments and the order the dataset
  returns them): flair, t1ce, t1, t2. That is the default ``modalities`` order here.
* Labels: 4 becomes 3 when loading; the network predicts 4 classes. Same here.
* The task in the code is **2-D**: every item is one slice along the last spatial axis, drawn at
  random among indices 0..127 until the slice contains tumour (for training *and* for
  validation/test, so evaluation sees one random tumour-bearing slice per case per pass), then an
  in-plane centre crop to 160x160. Training adds a random 90-degree rotation (0, 1 or 2 quarter
  turns), a random flip of one in-plane axis and, with probability 0.1, Gaussian noise. The slice
  range 0..127 suggests the prepared volumes have 128 slices, but the files are not public. To
  mimic that protocol from this store, convert with ``crop=(160, 160, 128)`` and sample
  tumour-bearing k-slices at load time (``train.slices``: :class:`mmrepro.data.loader.SliceSampling`).
  No 128^3 crop appears in the code.
* Loss: equal mix (0.5/0.5) of class-weighted cross-entropy (class weights 0.2, 0.3, 0.25, 0.25)
  and one minus a soft Dice over the foreground classes 1..3 pooled together over the batch
  (softmax probabilities, smoothing 0.01).
* Dice for evaluation, on argmax predictions with internal labels: ET = class 3, TC = classes
  1 or 3, WT = any nonzero class; per slice with a small epsilon (so an empty prediction on an
  empty truth scores about 1), averaged over slices; the reported score is the mean of the three.
* Training settings of the BraTS script (for whoever writes the config): SGD, momentum 0.9,
  weight decay 3e-4, per-iteration cosine schedule from 0.01 to 0.001 after 10 linear warm-up
  epochs starting at 4e-4, batch 64, 75 epochs, classifier lr 6e-3, rho 1.0, lambda 0.1,
  seed 666; a ``clip`` of 0.8 is declared but not used by the segmentation trainer. Model: one
  ResNet-101 + ASPP branch per modality (output stride 16) and a DeepLabv3+-style decoder over
  the concatenated branches; the unimodal classifiers are one such decoder per modality.
* Quirks for the method/trainer owners (not data): the segmentation trainer scales the gradients
  of parameters whose names contain ``vision_encoder``/``text_encoder``, which this model does not
  have, so only the direction term of CGGM acts on BraTS; its best-Dice bookkeeping never updates
  (it starts at 0 and keeps the smaller value); the test split is loaded but never evaluated.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.lib.format import open_memmap

from mmrepro.data import LOADER_MODALITIES
from mmrepro.data.schema import DataValidationError, DatasetSchema, ModalitySpec, TaskSpec, count_nonfinite
from mmrepro.data.store import remove_stale, work_folder

#: MRI sequences of a case, in CGGM's channel order (the default order of the store's modalities).
MODALITIES = LOADER_MODALITIES["brats"]
SEG_KEY = "seg"
CASE_PATTERN = re.compile(r"^BraTS2021_\d+$")
RELEASE_SHAPE = (240, 240, 155)
#: BraTS label -> internal class.
LABEL_MAP = {0: 0, 1: 1, 2: 2, 4: 3}
NUM_CLASSES = 4
#: Evaluation regions as sets of internal classes (BraTS labels: ET {4}, TC {1, 4}, WT {1, 2, 4}).
REGIONS = {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)}
BRATS_REGIONS = {"ET": (4,), "TC": (1, 4), "WT": (1, 2, 4)}
DEFAULT_SPLITS = {"train": 0.7, "valid": 0.1, "test": 0.2}
DTYPES = ("float16", "float32")

SplitItem = tuple[str, dict[str, np.ndarray], dict[str, Any]]
Converted = tuple[DatasetSchema, Iterator[SplitItem], dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# Labels and regions


def region_masks(labels):
    """Boolean masks of the BraTS regions ET, TC, WT from internal labels (0..3, ``4 -> 3``).

    Works on numpy arrays and torch tensors alike (elementwise comparisons only), any shape.
    """
    out = {}
    for region, classes in REGIONS.items():
        mask = labels == classes[0]
        for c in classes[1:]:
            mask = mask | (labels == c)
        out[region] = mask
    return out


def to_brats_labels(labels: np.ndarray) -> np.ndarray:
    """Internal classes back to BraTS labels (3 -> 4), e.g. to write predictions as NIfTI."""
    out = np.array(labels, copy=True)
    out[out == 3] = 4
    return out


# ---------------------------------------------------------------------------------------------
# Public converter


def convert_brats(path: Path | str, *, name: str, crop: Sequence[int] = (128, 128, 128),
                  splits: Mapping[str, float] | None = None, seed: int = 0, dtype: str = "float16",
                  modalities: Sequence[str] = MODALITIES, scratch_dir: Path | str | None = None) -> Converted:
    """Convert a folder of BraTS 2021 case folders into ``(schema, splits, provenance)``.

    ``crop``: output voxels per axis (i, j, k) after the brain-bounding-box crop and centre
    crop/pad. ``splits``: split name -> fraction of cases (positive, summing to 1; default
    train 0.7 / valid 0.1 / test 0.2), assigned per case with ``seed``. ``dtype``: ``float16``
    or ``float32`` for the stored volumes. ``modalities``: which sequences to store, in order (any
    order/subset of ``flair, t1ce, t1, t2``). ``scratch_dir``: where the scratch arrays go.
    All cases are converted before this returns (so the provenance is complete); the arrays are
    memory-mapped scratch files handed over split by split.
    """
    crop = _crop_param(crop)
    fractions = _fractions(splits if splits is not None else DEFAULT_SPLITS)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    modalities = tuple(modalities)
    if not modalities or len(set(modalities)) != len(modalities) or set(modalities) - set(MODALITIES):
        raise ValueError(f"modalities must be distinct names among {MODALITIES}, got {list(modalities)}")
    root = Path(path)
    if not root.is_dir():
        raise DataValidationError("not a folder of BraTS case folders", file=str(root))
    cases, ignored = _find_cases(root)
    assignment = _assign(cases, fractions, seed, file=str(root))

    schema = DatasetSchema(
        name=name,
        modalities=tuple(ModalitySpec(m, shape=(1, *crop)) for m in modalities),
        tasks=(TaskSpec(SEG_KEY, "segmentation", num_classes=NUM_CLASSES, shape=crop),),
        splits=tuple(fractions),
        extra={"source_format": "brats2021", "label_map": {str(k): v for k, v in LABEL_MAP.items()},
               "regions": {k: list(v) for k, v in REGIONS.items()},
               "brats_regions": {k: list(v) for k, v in BRATS_REGIONS.items()},
               "axes": "NIfTI voxel axes (i, j, k) as stored; k is the axial slice axis in the release"},
    )
    provenance: dict[str, Any] = {
        "dataset": name, "source": str(root), "format": "brats2021 NIfTI case folders",
        "converter": "mmrepro.data.brats.convert_brats",
        "params": {"crop": list(crop), "splits": fractions, "seed": seed, "dtype": dtype,
                   "modalities": list(modalities)},
        "normalisation": "z-score per case and modality over that modality's nonzero voxels; background 0",
        "cropping": "brain bounding box (nonzero in any modality), then centre crop / symmetric zero pad",
        "label_map": {str(k): v for k, v in LABEL_MAP.items()},
        "n_cases": len(cases), "case_splits": {s: list(c) for s, c in assignment.items()},
        "ignored_entries": {"count": len(ignored), "examples": ignored[:10]},
    }

    parent = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())
    remove_stale(parent, "brats-scratch")
    scratch = work_folder(parent, "brats-scratch")
    try:
        converted, stats = {}, _Stats()
        for split, names in assignment.items():
            converted[split] = _convert_split(root, split, names, crop=crop, dtype=dtype, modalities=modalities,
                                              scratch=scratch / split, stats=stats)
        provenance.update(stats.as_provenance())
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return schema, _hand_over(converted, scratch), provenance


# ---------------------------------------------------------------------------------------------
# Parameters, discovery, split


def _crop_param(crop: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(crop)
    if len(values) != 3 or any(int(v) != v or v <= 0 for v in values):
        raise ValueError(f"crop must be three positive integers, got {crop!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _fractions(splits: Mapping[str, float]) -> dict[str, float]:
    out = {str(k): float(v) for k, v in dict(splits).items()}
    if not out or any(not v > 0 for v in out.values()) or abs(sum(out.values()) - 1.0) > 1e-6:
        raise ValueError(f"splits must map split names to positive fractions summing to 1, got {dict(splits)}")
    return out


def _find_cases(root: Path) -> tuple[list[str], list[str]]:
    cases, ignored = [], []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and CASE_PATTERN.match(entry.name):
            cases.append(entry.name)
        elif not entry.name.startswith("."):
            ignored.append(entry.name)
    if not cases:
        raise DataValidationError(f"no case folders named BraTS2021_<number> found (found {ignored[:5]})",
                                  file=str(root))
    return cases, ignored


def split_sizes(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Cases per split: largest-remainder rounding of ``n * fraction``, each split at least one case."""
    names = list(fractions)
    if n < len(names):
        raise ValueError(f"{n} case(s) cannot fill {len(names)} splits {names}")
    raw = {s: n * fractions[s] for s in names}
    sizes = {s: int(np.floor(raw[s])) for s in names}
    for s in sorted(names, key=lambda s: -(raw[s] - sizes[s]))[:n - sum(sizes.values())]:
        sizes[s] += 1
    for s in names:
        if sizes[s] == 0:
            sizes[max(names, key=lambda t: sizes[t])] -= 1
            sizes[s] = 1
    return sizes


def _assign(cases: list[str], fractions: dict[str, float], seed: int, *, file: str) -> dict[str, list[str]]:
    try:
        sizes = split_sizes(len(cases), fractions)
    except ValueError as e:
        raise DataValidationError(str(e), file=file) from e
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    out, start = {}, 0
    for split, size in sizes.items():
        out[split] = sorted(order[start:start + size])
        start += size
    return out


# ---------------------------------------------------------------------------------------------
# Reading and preprocessing one case


class _Stats:
    """What the provenance reports about the cases converted."""

    def __init__(self) -> None:
        self.file_sha256: dict[str, str] = {}
        self.shapes: dict[str, list[int]] = {}
        self.box_exceeds_crop = 0
        self.tumour_lost: dict[str, int] = {}
        self.label_voxels: dict[str, list[int]] = {}

    def as_provenance(self) -> dict[str, Any]:
        lines = "".join(f"{k}\t{v}\n" for k, v in sorted(self.file_sha256.items()))
        return {
            "source_sha256": hashlib.sha256(lines.encode()).hexdigest(), "source_files": len(self.file_sha256),
            "source_sha256_method": "sha256 of the sorted lines '<case>/<file><TAB><sha256 of the file>\\n'",
            "nonstandard_shapes": self.shapes,
            "crop": {"brain_box_exceeds_crop": self.box_exceeds_crop, "tumour_voxels_lost": self.tumour_lost,
                     "tumour_voxels_lost_total": int(sum(self.tumour_lost.values()))},
            "label_voxels": self.label_voxels,
        }


def _read(path: Path, *, split: str, key: str, stats: _Stats) -> np.ndarray:
    file = str(path)
    if not path.is_file():
        raise DataValidationError("missing file", file=file, split=split, key=key)
    raw = path.read_bytes()
    stats.file_sha256[f"{path.parent.name}/{path.name}"] = hashlib.sha256(raw).hexdigest()
    try:
        image = nib.Nifti1Image.from_bytes(gzip.decompress(raw))
        data = image.get_fdata(dtype=np.float32)
    except Exception as e:  # gzip, zlib, EOF, header and data-size errors all mean the same here
        raise DataValidationError(f"unreadable or truncated .nii.gz ({type(e).__name__}: {e})",
                                  file=file, split=split, key=key) from e
    del raw, image
    if data.ndim != 3:
        raise DataValidationError(f"expected a 3-D volume, found shape {data.shape}", file=file, split=split, key=key)
    bad = count_nonfinite(data)
    if bad:
        raise DataValidationError(f"{bad} NaN/inf voxel(s) found", file=file, split=split, key=key)
    return data


def _read_case(root: Path, case: str, split: str, modalities: tuple[str, ...],
               stats: _Stats) -> tuple[dict[str, np.ndarray], np.ndarray]:
    folder = root / case
    volumes: dict[str, np.ndarray] = {}
    shape = None
    for key in (*modalities, SEG_KEY):
        path = folder / f"{case}_{key}.nii.gz"
        data = _read(path, split=split, key=key, stats=stats)
        if shape is None:
            shape, first = data.shape, key
        elif data.shape != shape:
            raise DataValidationError(f"shape {data.shape} differs from the case's {first} shape {shape}",
                                      file=str(path), split=split, key=key)
        volumes[key] = data
    if shape != RELEASE_SHAPE:
        stats.shapes[case] = list(shape)
    seg_path = str(folder / f"{case}_{SEG_KEY}.nii.gz")
    seg = volumes.pop(SEG_KEY)
    if not np.array_equal(seg, np.round(seg)):
        raise DataValidationError("non-integer label values found", file=seg_path, split=split, key=SEG_KEY)
    values = np.unique(seg).astype(np.int64)
    unknown = sorted(set(values.tolist()) - set(LABEL_MAP))
    if unknown:
        raise DataValidationError(f"labels must be in {sorted(LABEL_MAP)}, found {unknown[:10]}",
                                  file=seg_path, split=split, key=SEG_KEY)
    labels = np.zeros(shape, np.uint8)
    for src, dst in LABEL_MAP.items():
        if src:
            labels[seg == src] = dst
    return volumes, labels


def _zscore(volume: np.ndarray, *, file: str, split: str, key: str) -> np.ndarray:
    brain = volume != 0
    if not brain.any():
        raise DataValidationError("no brain voxels (the volume is all zero)", file=file, split=split, key=key)
    values = volume[brain].astype(np.float64)
    mean, std = values.mean(), values.std()
    if not std > 0:
        raise DataValidationError("brain voxels are constant (standard deviation 0)", file=file, split=split, key=key)
    out = np.zeros(volume.shape, np.float32)
    out[brain] = ((values - mean) / std).astype(np.float32)
    return out


def crop_window(box_lo: Sequence[int], box_hi: Sequence[int],
                crop: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Source and destination slices that centre-crop or zero-pad the box ``[lo, hi)`` to ``crop``."""
    src, dst = [], []
    for lo, hi, c in zip(box_lo, box_hi, crop):
        size = hi - lo
        if size >= c:
            start = lo + (size - c) // 2
            src.append(slice(start, start + c))
            dst.append(slice(0, c))
        else:
            offset = (c - size) // 2
            src.append(slice(lo, hi))
            dst.append(slice(offset, offset + size))
    return tuple(src), tuple(dst)


def _convert_split(root: Path, split: str, names: list[str], *, crop: tuple[int, int, int], dtype: str,
                   modalities: tuple[str, ...], scratch: Path, stats: _Stats) -> dict[str, np.ndarray]:
    scratch.mkdir(parents=True)
    n = len(names)
    arrays: dict[str, np.ndarray] = {
        f"x/{m}": open_memmap(scratch / f"x_{m}.npy", mode="w+", dtype=dtype, shape=(n, 1, *crop)) for m in modalities}
    arrays[f"y/{SEG_KEY}"] = open_memmap(scratch / f"y_{SEG_KEY}.npy", mode="w+", dtype=np.uint8, shape=(n, *crop))
    counts = np.zeros(NUM_CLASSES, np.int64)
    for row, case in enumerate(names):
        volumes, labels = _read_case(root, case, split, modalities, stats)
        for m in modalities:
            volumes[m] = _zscore(volumes[m], file=str(root / case / f"{case}_{m}.nii.gz"), split=split, key=m)
        brain = np.zeros(labels.shape, bool)
        for v in volumes.values():
            brain |= v != 0
        nonzero = np.nonzero(brain)
        lo = [int(ix.min()) for ix in nonzero]
        hi = [int(ix.max()) + 1 for ix in nonzero]
        if any(h - l > c for l, h, c in zip(lo, hi, crop)):
            stats.box_exceeds_crop += 1
        src, dst = crop_window(lo, hi, crop)
        for m in modalities:
            out = np.zeros(crop, dtype)
            out[dst] = volumes[m][src]
            bad = count_nonfinite(out)
            if bad:
                raise DataValidationError(f"{bad} value(s) overflow {dtype} after normalisation",
                                          file=str(root / case / f"{case}_{m}.nii.gz"), split=split, key=m)
            arrays[f"x/{m}"][row, 0] = out
        cropped = np.zeros(crop, np.uint8)
        cropped[dst] = labels[src]
        lost = int(np.count_nonzero(labels)) - int(np.count_nonzero(cropped))
        if lost:
            stats.tumour_lost[case] = lost
        arrays[f"y/{SEG_KEY}"][row] = cropped
        counts += np.bincount(cropped.ravel(), minlength=NUM_CLASSES)
        del volumes, labels, brain, cropped
    for a in arrays.values():
        a.flush()
    stats.label_voxels[split] = counts.tolist()
    arrays["ids"] = np.array(names, dtype=str)
    return arrays


def _hand_over(converted: dict[str, dict[str, np.ndarray]], scratch: Path) -> Iterator[SplitItem]:
    """Yield each split once; remove its scratch files when the next one is asked for, and the
    scratch folder at the end or when the iterator is garbage-collected unfinished."""

    def gen() -> Iterator[SplitItem]:
        try:
            while converted:
                split = next(iter(converted))
                arrays = converted.pop(split)
                yield split, arrays, {}
                del arrays
                shutil.rmtree(scratch / split, ignore_errors=True)
        finally:
            converted.clear()
            shutil.rmtree(scratch, ignore_errors=True)

    it = gen()
    weakref.finalize(it, shutil.rmtree, scratch, True)  # also when never started
    return it
