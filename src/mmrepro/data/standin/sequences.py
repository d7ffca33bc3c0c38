"""Stand-in feature pickles in the MMSA layout (MOSI, MOSEI, CH-SIMS, CASP's corpora) and the MulT
layout (MOSI, MOSEI, IEMOCAP): random features of each release's real widths, lengths and counts.

What each release holds (keys, shapes, label conventions) is documented where it is read,
:mod:`mmrepro.data.mmsa`; the numbers below come from ``datasets.md`` (MMSA's config) and are
marked where they are not confirmed. Padding is consistent: frames past a sample's length are
zero, ``text_bert``'s mask has exactly ``length`` leading ones, and aligned files give audio and
vision the text length, as MMSA reads them. Regression labels lie on the release's label grid in
its range; IEMOCAP's one-hot (absent, present) pairs have exactly one emotion present per sample,
drawn with the 4-class IEMOCAP class balance.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mmrepro.data.iemocap_h5 import IEMOCAP_4CLASS_TOTALS
from mmrepro.data.mmsa import EMOTIONS, ID_SEPARATOR, MODALITIES, PUBLISHED_WIDTHS, SPLITS
from mmrepro.data.standin.plan import Counts, Scale, Written, allocate, choose_counts
from mmrepro.progress import progress_disabled

TINY = {"train": 12, "valid": 6, "test": 6}
_CHUNK = 256  # samples built per step (bounds the temporary arrays; drives the progress bar)


@dataclass(frozen=True)
class Release:
    """One pickle as published: per-split sample counts, (text, audio, vision) widths and lengths,
    the label range and grid step (classification: ``emotion`` labels instead), and what is unsure."""

    counts: Mapping[str, int]
    widths: tuple[int, int, int]
    lengths: tuple[int, int, int]
    label_range: tuple[float, float] = (-3.0, 3.0)
    label_step: float = 0.2
    emotion: bool = False
    unimodal_labels: bool = False
    assumptions: tuple[str, ...] = ()


MOSI = {"train": 1284, "valid": 229, "test": 686}
MOSEI = {"train": 16326, "valid": 1871, "test": 4659}
SIMS = {"train": 1368, "valid": 456, "test": 457}
_LABELS = "label distribution of the real splits not known here: uniform over the label grid"
#: CASP's re-extracted features are not published (paper.yaml's *_casp entries): one extractor set for
#: all three corpora, BERT text (casp.md); audio and vision widths assumed to be CH-SIMS's MMSA-FET set.
CASP_WIDTHS = (768, 33, 709)
_CASP = (f"CASP's features are unpublished: widths {CASP_WIDTHS} assumed (BERT text per casp.md; audio and vision "
         "as CH-SIMS's MMSA-FET extractors), lengths and counts those of the corpus's MMSA release",)

#: MMSA releases by their path in the release (datasets.md; widths from mmrepro.data.mmsa.PUBLISHED_WIDTHS).
MMSA_RELEASES: dict[str, Release] = {
    "MOSI/Processed/unaligned_50.pkl": Release(MOSI, PUBLISHED_WIDTHS["MOSI/Processed/unaligned_50.pkl"],
                                               (50, 500, 375), assumptions=(_LABELS,)),
    "MOSI/Processed/aligned_50.pkl": Release(MOSI, PUBLISHED_WIDTHS["MOSI/Processed/aligned_50.pkl"],
                                             (50, 50, 50), assumptions=(_LABELS,)),
    "MOSEI/Processed/unaligned_50.pkl": Release(MOSEI, PUBLISHED_WIDTHS["MOSEI/Processed/unaligned_50.pkl"],
                                                (50, 500, 375), label_step=1 / 3, assumptions=(_LABELS,)),
    "MOSEI/Processed/aligned_50.pkl": Release(MOSEI, PUBLISHED_WIDTHS["MOSEI/Processed/aligned_50.pkl"],
                                              (50, 50, 50), label_step=1 / 3, assumptions=(_LABELS,)),
    "SIMS/Processed/unaligned_39.pkl": Release(SIMS, PUBLISHED_WIDTHS["SIMS/Processed/unaligned_39.pkl"],
                                               (39, 400, 55), (-1.0, 1.0), unimodal_labels=True,
                                               assumptions=(_LABELS,)),
    "CASP/MOSI/unaligned.pkl": Release(MOSI, CASP_WIDTHS, (50, 500, 375), assumptions=(*_CASP, _LABELS)),
    "CASP/MOSEI/unaligned.pkl": Release(MOSEI, CASP_WIDTHS, (50, 500, 375), label_step=1 / 3,
                                        assumptions=(*_CASP, _LABELS)),
    "CASP/SIMS/unaligned.pkl": Release(SIMS, CASP_WIDTHS, (39, 400, 55), (-1.0, 1.0), assumptions=(*_CASP, _LABELS)),
}
#: MulT releases by file name (datasets.md: GloVe 300-d text; aligned to words, 50 steps, IEMOCAP 20).
MULT_RELEASES: dict[str, Release] = {
    "mosi_data.pkl": Release(MOSI, (300, 5, 20), (50, 50, 50),
                             assumptions=("counts taken as MMSA's MOSI split", _LABELS)),
    "mosei_senti_data.pkl": Release(MOSEI, (300, 74, 35), (50, 50, 50), label_step=1 / 3,
                                    assumptions=("counts taken as MMSA's MOSEI split", _LABELS)),
    "iemocap_data.pkl": Release({"train": 2717, "valid": 798, "test": 938}, (300, 74, 35), (20, 20, 20), emotion=True,
                                assumptions=("split counts 2717 / 798 / 938 not confirmed from code (third-party "
                                             "readers); one emotion present per sample, with the 4-class IEMOCAP "
                                             "balance (the file's own balance is not known here)",)),
}


def release_of(rel: str, table: Mapping[str, Release], fmt: str) -> Release:
    """The release a config path names (its path ends with the release's path)."""
    posix = Path(rel).as_posix()
    for key, release in table.items():
        if posix == key or posix.endswith("/" + key):
            return release
    raise ValueError(f"no real {fmt} release is known at path {rel!r}: stand-ins know the layouts {sorted(table)}")


# ---------------------------------------------------------------------------------------------
# Building arrays


def _lengths(rng: np.random.Generator, n: int, cap: int, low: int = 1) -> np.ndarray:
    return rng.integers(min(low, cap), cap + 1, size=n).astype(np.int64)


def _features(rng: np.random.Generator, n: int, t: int, d: int, lengths: np.ndarray, bar) -> np.ndarray:
    """``(n, t, d)`` float32 normals, zero past each sample's length (built in chunks)."""
    out = np.empty((n, t, d), np.float32)
    steps = np.arange(t)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        block = rng.standard_normal((stop - start, t, d), dtype=np.float32)
        block[steps[None, :] >= lengths[start:stop, None]] = 0.0
        out[start:stop] = block
        bar.update(stop - start)
    return out


def _regression_labels(rng: np.random.Generator, n: int, release: Release) -> np.ndarray:
    lo, hi = release.label_range
    grid = np.round(np.arange(lo, hi + release.label_step / 2, release.label_step), 4)
    return rng.choice(grid, size=n).astype(np.float32)


def emotion_rows(rng: np.random.Generator, n: int, minimum: int = 1) -> np.ndarray:
    """``n`` class indices over :data:`~mmrepro.data.mmsa.EMOTIONS` with the 4-class IEMOCAP balance, shuffled."""
    parts = allocate(n, [IEMOCAP_4CLASS_TOTALS[e] for e in EMOTIONS], minimum=min(minimum, n // len(EMOTIONS)))
    return rng.permutation(np.repeat(np.arange(len(EMOTIONS)), parts))


def mmsa_split(release: Release, split: str, n: int, rng: np.random.Generator, bar) -> dict[str, Any]:
    """One split of an MMSA pickle with ``n`` samples (the keys and types of the published files)."""
    (t_text, t_audio, t_vision), (d_text, d_audio, d_vision) = release.lengths, release.widths
    aligned = len(set(release.lengths)) == 1
    text_len = _lengths(rng, n, t_text, low=3)
    audio_len = text_len.copy() if aligned else _lengths(rng, n, t_audio)
    vision_len = text_len.copy() if aligned else _lengths(rng, n, t_vision)
    mask = (np.arange(t_text)[None, :] < text_len[:, None]).astype(np.float32)
    tokens = rng.integers(1000, 30000, size=(n, t_text)).astype(np.float32)
    tokens[:, 0] = 101.0  # [CLS]
    tokens[np.arange(n), text_len - 1] = 102.0  # [SEP]
    tokens *= mask
    labels = _regression_labels(rng, n, release)
    d: dict[str, Any] = {
        "raw_text": [f"stand-in utterance {split} {i}" for i in range(n)],
        "audio": _features(rng, n, t_audio, d_audio, audio_len, bar),
        "vision": _features(rng, n, t_vision, d_vision, vision_len, bar),
        "id": [f"standin{split}{i // 4}{ID_SEPARATOR}{i % 4 + 1}" for i in range(n)],
        "text": _features(rng, n, t_text, d_text, text_len, bar),
        "text_bert": np.stack([tokens, mask, np.zeros_like(mask)], axis=1),
        "audio_lengths": audio_len,
        "vision_lengths": vision_len,
        "annotations": np.where(labels > 0, "Positive", np.where(labels < 0, "Negative", "Neutral")).tolist(),
        "classification_labels": np.sign(labels).astype(np.float32) + 1.0,
        "regression_labels": labels,
    }
    if release.unimodal_labels:
        for m in "TAV":
            d[f"regression_labels_{m}"] = _regression_labels(rng, n, release)
    return d


def mult_split(release: Release, split: str, n: int, rng: np.random.Generator, bar) -> dict[str, Any]:
    """One split of a MulT pickle with ``n`` samples (padded arrays, no lengths; bytes ids)."""
    full = {m: np.full(n, t, np.int64) for m, t in zip(MODALITIES, release.lengths)}
    d: dict[str, Any] = {m: _features(rng, n, t, w, full[m], bar)
                         for m, t, w in zip(MODALITIES, release.lengths, release.widths)}
    if release.emotion:
        present = np.eye(len(EMOTIONS), dtype=np.float32)[emotion_rows(rng, n)]
        d["labels"] = np.stack([1.0 - present, present], axis=2)
    else:
        d["labels"] = _regression_labels(rng, n, release).reshape(n, 1, 1)
    d["id"] = np.array([[f"standin{split}{i}".encode(), str(i).encode(), str(i + 1).encode()] for i in range(n)])
    return d


# ---------------------------------------------------------------------------------------------
# Writing files


def write_pickle(data: Any, path: Path, protocol: int = 4) -> Path:
    """Pickle ``data`` to ``path`` (folders made), via a temporary file renamed into place when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")   # opened as any new file: the umask's permissions
    try:
        with open(tmp, "wb") as f:
            pickle.dump(data, f, protocol=protocol)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _bytes_per_sample(release: Release) -> int:
    return 4 * sum(t * d for t, d in zip(release.lengths, release.widths)) + 4 * 3 * release.lengths[0]


def _write(rel: str, root: Path, scale: Scale, rng: np.random.Generator, release: Release, build) -> Written:
    began = time.perf_counter()
    counts: Counts = choose_counts(scale, release.counts, TINY, _bytes_per_sample(release))
    total = sum(counts.written.values()) * len(MODALITIES)
    with tqdm(total=total, desc=f"stand-in {rel}", unit="sample", leave=False,
              disable=True if scale.tiny or not scale.progress else progress_disabled()) as bar:
        data = {split: build(release, split, counts.written[split], rng, bar) for split in SPLITS}
    path = write_pickle(data, root / rel)
    shapes = {m: {"length": t, "width": w} for m, t, w in zip(MODALITIES, release.lengths, release.widths)}
    return Written(rel, counts, shapes, list(release.assumptions), bytes=path.stat().st_size,
                   seconds=time.perf_counter() - began)


def write_mmsa(rel: str, entries: list[Mapping[str, Any]], root: Path, scale: Scale, rng: np.random.Generator) -> Written:
    """An MMSA pickle at ``root / rel`` for the release that path names."""
    return _write(rel, root, scale, rng, release_of(rel, MMSA_RELEASES, "MMSA"), mmsa_split)


def write_mult(rel: str, entries: list[Mapping[str, Any]], root: Path, scale: Scale, rng: np.random.Generator) -> Written:
    """A MulT pickle at ``root / rel`` for the release that file name names."""
    return _write(rel, root, scale, rng, release_of(rel, MULT_RELEASES, "MulT"), mult_split)
