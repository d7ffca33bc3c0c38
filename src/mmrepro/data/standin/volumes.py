"""Stand-in BraTS 2021: one folder per case, ``BraTS2021_<5 digits>/BraTS2021_<5 digits>_{t1,t1ce,t2,flair,seg}.nii.gz``
(layout documented in :mod:`mmrepro.data.brats`).

Each case is a brain-shaped ellipsoid of smooth, whole-number intensities (zero outside the brain,
as the release's skull-stripped volumes), with one tumour inside it: an oedema shell (label 2)
around an enhancing ring (4) around a necrotic core (1), brighter in FLAIR/T2 and, where enhancing,
in T1ce. Every case holds all three tumour labels, so every region (ET, TC, WT) is present. Full
scale: the release's 1251 training cases of 240 x 240 x 155 voxels; tiny: three small cases (the
converter's crop pads them to its size).
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from mmrepro.data.brats import MODALITIES, RELEASE_SHAPE, SEG_KEY
from mmrepro.data.standin.plan import Scale, Written, choose_counts, folder_bytes
from mmrepro.progress import progress_disabled

REAL_CASES = 1251
TINY_CASES = 5                 # the converter's 70/10/20 split: 3 / 1 / 1, so a training batch holds several slices
                               # (deeplab2d's BatchNorm cannot train on a batch of one)
TINY_SHAPE = (40, 44, 36)
#: the brain's semi-axes as fractions of the volume's sides (a release brain is about 140 x 170 x 130 voxels)
BRAIN = (0.30, 0.36, 0.42)
BASE_INTENSITY = {"flair": 300, "t1ce": 500, "t1": 400, "t2": 600}
ASSUMPTIONS = [
    "intensities int16 and labels uint8 with an identity affine (the release's dtypes and orientation are not "
    "checked here; the converter reads any numeric NIfTI and does not reorient)",
    "one ellipsoidal tumour per case of random size near the brain centre: oedema, enhancing ring, necrotic core",
]


def case_name(i: int) -> str:
    return f"BraTS2021_{i:05d}"


# ---------------------------------------------------------------------------------------------
# Writing files


def write_case(root: Path, case: str, volumes: Mapping[str, np.ndarray], affine: np.ndarray | None = None) -> Path:
    """``root/<case>/<case>_<key>.nii.gz`` for every ``key`` of ``volumes`` (modalities and ``seg``)."""
    folder = Path(root) / case
    folder.mkdir(parents=True, exist_ok=True)
    for key, data in volumes.items():
        nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), folder / f"{case}_{key}.nii.gz")
    return folder


# ---------------------------------------------------------------------------------------------
# Building volumes


def _axes(shape: tuple[int, int, int], centre: np.ndarray, radii: np.ndarray) -> list[np.ndarray]:
    """Per axis the squared normalised offsets from ``centre``, shaped to broadcast over the volume."""
    out = []
    for axis, (n, c, r) in enumerate(zip(shape, centre, radii)):
        view = [1, 1, 1]
        view[axis] = n
        out.append((((np.arange(n, dtype=np.float32) - c) / r) ** 2).reshape(view))
    return out


def brats_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """One case: ``flair``, ``t1ce``, ``t1``, ``t2`` (int16) and ``seg`` (uint8, BraTS labels 0, 1, 2, 4)."""
    sides = np.asarray(shape, np.float32)
    centre = sides / 2 + rng.uniform(-0.03, 0.03, 3) * sides
    a, b, c = _axes(shape, centre, np.asarray(BRAIN, np.float32) * sides)
    brain = (a + b + c) <= 1.0
    t_centre = centre + rng.uniform(-0.12, 0.12, 3) * np.asarray(BRAIN) * sides
    # at least 5 voxels, so the core (inner 0.3 of the radius) holds voxels in a small tiny-scale volume too
    t_radius = np.maximum(rng.uniform(0.08, 0.14) * min(shape) * rng.uniform(0.85, 1.15, 3), 5.0)
    a, b, c = _axes(shape, t_centre, t_radius.astype(np.float32))
    r2 = a + b + c
    del a, b, c
    seg = np.zeros(shape, np.uint8)
    seg[r2 <= 1.0] = 2
    seg[r2 <= 0.5 ** 2] = 4
    seg[r2 <= 0.3 ** 2] = 1
    seg[~brain] = 0
    del r2
    tumour = {label: np.nonzero(seg == label) for label in (1, 2, 4)}   # a few percent of the voxels
    out: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        waves = []
        for axis in range(3):   # smooth variation: a low-frequency cosine along each axis
            view = [1, 1, 1]
            view[axis] = shape[axis]
            k = rng.uniform(1.0, 3.0) * 2 * np.pi / shape[axis]
            wave = rng.uniform(20, 80) * np.cos(k * np.arange(shape[axis]) + rng.uniform(0, 2 * np.pi))
            waves.append(wave.astype(np.float32).reshape(view))
        field = (waves[0] + waves[1]) + (waves[2] + np.float32(BASE_INTENSITY[m]))
        field[tumour[2]] += 150 if m in ("flair", "t2") else -60
        field[tumour[4]] += 300 if m == "t1ce" else 80
        field[tumour[1]] -= 120
        np.rint(field, out=field)
        np.maximum(field, 1, out=field)
        field *= brain
        out[m] = field.astype(np.int16)
    out[SEG_KEY] = seg
    return out


def _case_bytes(case: Mapping[str, np.ndarray]) -> int:
    """Bytes of the case's files as nibabel writes them (gzip level 1), without writing them."""
    return sum(len(gzip.compress(v.tobytes(), compresslevel=1)) + 352 for v in case.values())


def write_entry(rel: str, entries: list[Mapping[str, Any]], root: Path, scale: Scale,
                rng: np.random.Generator) -> Written:
    """Case folders under ``root / rel``."""
    began = time.perf_counter()
    shape = TINY_SHAPE if scale.tiny else RELEASE_SHAPE
    probe = brats_case(rng, shape)
    counts = choose_counts(scale, {"cases": REAL_CASES}, {"cases": TINY_CASES},
                           0 if scale.tiny else _case_bytes(probe))
    with tqdm(total=counts.written["cases"], desc=f"stand-in {rel}", unit="case", leave=False,
              disable=True if scale.tiny or not scale.progress else progress_disabled()) as bar:
        write_case(root / rel, case_name(0), probe)   # the probe is the first case
        bar.update(1)
        for i in range(1, counts.written["cases"]):
            write_case(root / rel, case_name(i), brats_case(rng, shape))
            bar.update(1)
    shapes = {"volume": list(shape), "files": [*MODALITIES, SEG_KEY], "labels": [0, 1, 2, 4]}
    return Written(rel, counts, shapes, list(ASSUMPTIONS), bytes=folder_bytes(root / rel),
                   seconds=time.perf_counter() - began)
