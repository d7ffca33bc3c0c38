"""Stand-in IEMOCAP in MMIN's HDF5 feature folder, the layout CGGM and MPLMM read
(``A/comparE.h5``, ``A/comparE_mean_std.h5``, ``V/denseface.h5``, ``L/bert_large.h5``,
``target/<fold>/{trn,val,tst}_{label,int2name}.npy``; documented in :mod:`mmrepro.data.iemocap_h5`).

Utterances are named as IEMOCAP's (``Ses01F_impro01_M003``), one frame count per utterance and
modality between 1 and the caps CGGM pads to, widths CGGM declares. Full scale writes the 5531
utterances of the 4-class corpus with its exact class totals (so the converter infers the class
names as it would on the real folder). Not known here, and said in the manifest: the sessions'
sizes (taken equal), which speaker of the held-out session validates (taken: F in odd folds),
the class order of the one-hot rows (taken: ``EMOTIONS``), the frame-count distribution (uniform).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm.auto import tqdm

from mmrepro.data.iemocap_h5 import CGGM_DIMS, CGGM_LENGTHS, FOLDERS, IEMOCAP_4CLASS_TOTALS, SET_NAMES
from mmrepro.data.mmsa import EMOTIONS, MODALITIES, SPLITS
from mmrepro.data.standin.plan import Counts, Scale, Written, allocate, choose_counts, folder_bytes
from mmrepro.progress import progress_disabled

#: the feature files CGGM's defaults name (A_type comparE, V_type denseface, L_type bert_large)
KINDS = {"text": "bert_large", "audio": "comparE", "vision": "denseface"}
SESSIONS = 5
TINY_UTTERANCES = 20   # four per session: a fold trains on 16, validates on 2 and tests on 2
#: mean frames at half the caps, float32
BYTES_PER_UTTERANCE = 4 * sum(t * d for t, d in zip(CGGM_LENGTHS, CGGM_DIMS)) // 2
#: converter parameters a stand-in states: the real folder's class totals let the converter infer the
#: class names, a tiny stand-in's cannot (the one-hot rows are written in ``EMOTIONS`` order)
STATED_PARAMS = {"class_names": list(EMOTIONS)}
ASSUMPTIONS = [
    "session sizes not known here: the corpus is spread evenly over the five sessions, the held-out one halved "
    "into val and tst",
    "which speaker of the held-out session validates is not known: F in odd folds, M in even ones",
    "class order of the one-hot label rows not confirmed: neutral, happy, sad, angry",
    "frame counts uniform between 1 and CGGM's caps (the real distribution is not known here)",
]


# ---------------------------------------------------------------------------------------------
# Writing files


def write_mmin_root(root: Path, features: Mapping[str, Iterable[tuple[str, np.ndarray]]],
                    targets: Mapping[int, Mapping[str, tuple[np.ndarray, list[str]]]],
                    stats: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None,
                    kinds: Mapping[str, str] = KINDS) -> Path:
    """Write an MMIN feature folder at ``root``.

    ``features[m]``: ``(utterance name, (T, D) frames)`` pairs of modality ``m`` (an iterable, so a
    generator can stream them). ``targets[fold][split]``: one-hot label rows ``(N, 4)`` and the
    utterance names, saved as ``target/<fold>/<set>_label.npy`` and ``<set>_int2name.npy`` (one
    bytes name per row, a 2-D array as CGGM indexes it). ``stats[fold]``: the audio ``mean`` and
    ``std`` ``(D,)`` of ``A/<audio kind>_mean_std.h5`` group ``<fold>``.
    """
    root = Path(root)
    for m, pairs in features.items():
        folder = root / FOLDERS[m]
        folder.mkdir(parents=True, exist_ok=True)
        with h5py.File(folder / f"{kinds[m]}.h5", "w") as h5:
            for name, frames in pairs:
                h5[name] = frames
    if stats:
        (root / FOLDERS["audio"]).mkdir(parents=True, exist_ok=True)
        with h5py.File(root / FOLDERS["audio"] / f"{kinds['audio']}_mean_std.h5", "w") as h5:
            for fold, (mean, std) in stats.items():
                group = h5.create_group(str(fold))
                group["mean"], group["std"] = mean, std
    for fold, splits in targets.items():
        folder = root / "target" / str(fold)
        folder.mkdir(parents=True, exist_ok=True)
        for split, (labels, names) in splits.items():
            np.save(folder / f"{SET_NAMES[split]}_label.npy", np.asarray(labels, np.float32))
            np.save(folder / f"{SET_NAMES[split]}_int2name.npy", np.array([[n.encode()] for n in names]))
    return root


# ---------------------------------------------------------------------------------------------
# Building arrays


def interleave(counts: list[int]) -> np.ndarray:
    """Class indices with ``counts[c]`` of class ``c``, spread evenly along the sequence (so every
    contiguous or strided part of it keeps about the overall balance)."""
    keys = np.concatenate([(np.arange(n) + 0.5) / n for n in counts]) if sum(counts) else np.zeros(0)
    classes = np.repeat(np.arange(len(counts)), counts)
    return classes[np.argsort(keys, kind="stable")]


def utterances(scale: Scale) -> tuple[list[tuple[str, int]], Counts]:
    """``(name, class)`` of every utterance written (exact 4-class totals at full scale) and the counts.

    Utterance ``i`` belongs to session ``i % 5 + 1`` and speaker F or M by ``(i // 5) % 2``, so every
    session and speaker gets an evenly interleaved share of the classes.
    """
    totals = [IEMOCAP_4CLASS_TOTALS[e] for e in EMOTIONS]
    counts = choose_counts(scale, {"all": sum(totals)}, {"all": TINY_UTTERANCES}, BYTES_PER_UTTERANCE)
    classes = interleave(allocate(counts.written["all"], totals, minimum=1))
    out = []
    for i, c in enumerate(classes):
        session, speaker = i % SESSIONS + 1, "FM"[(i // SESSIONS) % 2]
        dialog = f"Ses0{session}{'MF'[i % 2]}_{'impro' if i % 3 else 'script'}{i % 7 + 1:02d}"
        out.append((f"{dialog}_{speaker}{i:04d}", int(c)))
    return out, counts


def fold_splits(utts: list[tuple[str, int]], fold: int) -> dict[str, list[tuple[str, int]]]:
    """Leave-one-session-out fold ``fold``: session ``ceil(fold / 2)`` held out, one speaker validating."""
    session, val_speaker = (fold + 1) // 2, "F" if fold % 2 else "M"
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for name, c in utts:
        if int(name[3:5]) != session:
            out["train"].append((name, c))
        else:
            out["valid" if name.rsplit("_", 1)[1][0] == val_speaker else "test"].append((name, c))
    return out


def _frames(rng: np.random.Generator, names: list[str], cap: int, width: int, mean: np.ndarray | None,
            std: np.ndarray | None, bar) -> Iterable[tuple[str, np.ndarray]]:
    for name in names:
        t = int(rng.integers(1, cap + 1))
        x = rng.standard_normal((t, width), dtype=np.float32)
        if mean is not None:
            x = x * std.astype(np.float32) + mean.astype(np.float32)
        bar.update(1)
        yield name, x


def write_entry(rel: str, entries: list[Mapping[str, Any]], root: Path, scale: Scale,
                rng: np.random.Generator) -> Written:
    """The MMIN folder at ``root / rel`` with the folds the entries name (``params.fold``, default 1)."""
    began = time.perf_counter()
    folds = sorted({int(e.get("params", {}).get("fold", 1)) for e in entries})
    utts, counts = utterances(scale)
    names = [n for n, _ in utts]
    width = dict(zip(MODALITIES, CGGM_DIMS))
    cap = dict(zip(MODALITIES, CGGM_LENGTHS))
    mean = rng.normal(0.0, 2.0, width["audio"])
    std = rng.uniform(0.5, 2.0, width["audio"])
    eye = np.eye(len(EMOTIONS), dtype=np.float32)
    targets, written = {}, {}
    for fold in folds:
        parts = fold_splits(utts, fold)
        targets[fold] = {s: (eye[[c for _, c in items]], [n for n, _ in items]) for s, items in parts.items()}
        written[f"fold {fold}"] = {s: len(items) for s, items in parts.items()}
    with tqdm(total=len(names) * len(MODALITIES), desc=f"stand-in {rel}", unit="utterance", leave=False,
              disable=True if scale.tiny or not scale.progress else progress_disabled()) as bar:
        features = {m: _frames(rng, names, cap[m], width[m], mean if m == "audio" else None,
                               std if m == "audio" else None, bar) for m in MODALITIES}
        write_mmin_root(root / rel, features, targets, {fold: (mean, std) for fold in folds})
    shapes = {m: {"cap": cap[m], "width": width[m], "file": f"{FOLDERS[m]}/{KINDS[m]}.h5"} for m in MODALITIES}
    shapes["folds"] = written
    return Written(rel, counts, shapes, list(ASSUMPTIONS), bytes=folder_bytes(root / rel),
                   seconds=time.perf_counter() - began)
