"""Converter for IEMOCAP in the MMIN feature layout (per-utterance HDF5 files plus per-fold
target arrays), the layout that the official CGGM and MPLMM code read.

:func:`convert_iemocap_h5` returns ``(schema, splits, provenance)`` for
:func:`mmrepro.data.store.write_store`, like the converters in :mod:`mmrepro.data.mmsa`:
``splits`` yields ``(split, arrays, {})`` for ``train``, ``valid`` and ``test`` (from MMIN's
``trn``, ``val``, ``tst``). Arrays: ``x/text``, ``x/audio``, ``x/vision`` float32 ``(N, T_cap, D)``
padded with zeros after the valid frames, ``len/<modality>`` int64 ``(N,)``, ``y/emotion`` int64
``(N,)`` in ``[0, 4)`` and per emotion ``c`` the one-vs-rest ``y/<c>`` in ``{0, 1}`` (task ``c``),
``ids`` unicode ``(N,)`` (the utterance names, e.g. ``Ses01F_impro01_F000``).

What was read to confirm the layout (public code, read only; nothing copied)
----------------------------------------------------------------------------
``zrguo/CGGM`` at ``d7890a8``: ``datasets/IEMODataset.py``, ``datasets/dataloader.py``,
``run/iemo_run.py``, ``README.md``. ``zrguo/MPLMM`` (same first author): ``src/iemodata.py``,
``src/utils.py``, ``main.py``. ``AIM3-RUC/MMIN`` (the source of the layout):
``data/multimodal_dataset.py``, ``data/config/IEMOCAP_config.json``, ``scripts/CAP_utt_fusion.sh``.
``AIM3-RUC/MEmoBert``: ``preprocess/iemocap/anote.md``, ``preprocess/iemocap/make_ref_json.py``
(same target files, read by the MMIN authors' group).

Confirmed:

* Files under the data root: ``A/<A_type>.h5``, ``V/<V_type>.h5``, ``L/<L_type>.h5``, each with
  one top-level dataset per utterance name holding that utterance's ``(T, D)`` frames (read whole
  with ``[()]``), and ``target/<cvNo>/{trn,val,tst}_label.npy`` and ``..._int2name.npy``. MMIN's
  config names the same ``target`` directory under the feature root and ``total_cv: 10``.
* Defaults (CGGM ``datasets/dataloader.py`` class ``opt``, identical in MPLMM ``src/utils.py``
  and MMIN's ``__main__`` test): ``cvNo = 1``, ``A_type = "comparE"``, ``V_type = "denseface"``,
  ``L_type = "bert_large"``, ``norm_method = "trn"``, ``in_mem = False``. So CGGM normalises
  audio with the **per-fold training statistics**, not per utterance; ``audio_norm`` defaults to
  ``"trn"`` here. MMIN's IEMOCAP script also passes ``--norm_method=trn`` with
  ``input_dim_a=130``, ``input_dim_v=342``, ``input_dim_l=1024``.
* ``trn``: with ``A_type == "comparE"`` the loader opens ``A/comparE_mean_std.h5`` and reads the
  datasets ``mean`` and ``std`` of group ``str(cvNo)``, and computes ``(x - mean) / std`` per
  frame (broadcast over time; no guard for ``std == 0``). ``utt``: mean and ``torch.std``
  (unbiased, n-1) over the utterance's frames, ``std == 0`` set to 1. Only audio is normalised;
  text and vision are used as stored. Another ``A_type`` than ``comparE``/``comparE_raw`` gets no
  normalisation at all in CGGM (``comparE_raw`` computes statistics over every utterance in the
  file, all folds and test included; not supported here).
* Labels: ``np.argmax(label, axis=1)`` on the loaded ``*_label.npy`` (one-hot rows);
  ``output_dim = 4``, ``CrossEntropyLoss``. Utterance names: ``int2name[i][0].decode()``, so
  each row of ``*_int2name.npy`` is an array whose first element is a ``bytes`` name (a 2-D
  ``S`` array; a 1-D array of names would break that code, and is accepted here and recorded).
* Shapes: CGGM and MPLMM declare ``get_dim() = [1024, 130, 342]`` and
  ``get_seq_len() = [22, 350, 50]`` for (text, audio, vision) and build every batch as
  ``[L, A, V]``. The collate pads audio with zeros to exactly 350 frames (an utterance longer
  than 350 would make it fail) and text and vision with ``pad_sequence`` to the batch maximum.
  Here every modality is padded to its cap in ``lengths`` (default ``(22, 350, 50)``) after
  normalisation, valid frames first; an utterance longer than its cap is an error by default, or
  kept to its first ``cap`` frames with ``overlong="truncate"`` (audio is normalised over the
  whole utterance before it is cut), counted per split and modality in the provenance.
* MPLMM reads IEMOCAP exactly the same way (same files, defaults, normalisation, argmax, names,
  declared dims and lengths); it only adds a random missing-modality code per sample.
* Folds (MEmoBert's note on the same targets): 10 folds, each leaving out one session; fold
  ``2k-1`` validates on one speaker of session ``k`` and tests on the other, fold ``2k`` swaps
  them. CGGM and MPLMM only ever use ``cvNo = 1``.
* CGGM hyperparameters for IEMOCAP (``run/iemo_run.py`` defaults): batch 64, lr 1e-3, cls_lr
  5e-4, Adam, 30 epochs, decay ``when`` 10, clip 0.8, ``rou`` 1.3, ``lamda`` 0.2, seed 666,
  4 layers, 2 classifier layers, 5 heads, ``proj_dim`` 40, dropouts attn 0.15, relu 0.15,
  embed 0.2, res 0.15, out 0.2, modulation ``cggm``.

Not confirmed (say so wherever it matters):

* **The order of the four classes** in the one-hot labels. MMIN's stored repository has no
  ``preprocess/`` code, CGGM and MPLMM never name the classes, and third-party readers of these
  files disagree in comments. What is known: the 4-class IEMOCAP set merges ``exc`` into ``hap``
  and has 5531 utterances, 1103 angry, 1636 happy (+excited), 1708 neutral, 1084 sad (two
  independent sources agree; 5531 matches the feature count in third-party readers of these
  files). Every fold's ``trn`` + ``val`` + ``tst`` covers all utterances, so with
  ``class_names=None`` the names are **inferred from the class totals** when they are exactly
  these four distinct counts, and otherwise left as ``class_0`` .. ``class_3``; the provenance
  says which. Pass ``class_names`` to state them.
* The exact frame counts of the released features (whether every text/vision utterance fits 22
  and 50 frames); the converter reports lengths and refuses or counts overlong ones.
* The shape of ``mean``/``std`` in ``comparE_mean_std.h5`` (CGGM adds a leading axis, so ``(D,)``
  is assumed; ``(1, D)`` is accepted too).

Checks before anything is written (a :class:`DataValidationError` naming file, split and key):
missing feature/target/statistics files; an HDF5 file that cannot be opened (truncated, corrupt);
a name from ``int2name`` missing from a feature file (key = the name); a feature that is not a 2-D
numeric array or whose dim differs from the other utterances; an overlong utterance (unless
truncating); label rows that are not one-hot over 4 classes; label and ``int2name`` lengths that
differ; duplicate names within a split or shared between splits; bad statistics (wrong dim,
non-finite, ``std == 0``). Feature values are read only while a split is filled, so NaN/inf
(``nan_policy="error"`` refuses, naming the file, split and utterance; ``"zero"`` replaces them
with 0 before normalisation and counts them) surface while :func:`write_store` consumes that
split, which then removes its partial store.

Deviation from CGGM: under ``audio_norm="utt"`` an utterance of a single frame has an undefined
unbiased std (``torch.std`` gives NaN, so CGGM would feed NaN); here its std is taken as 1, the
frame becomes 0 after mean subtraction, and the count is recorded.

Memory: the structural pass reads only HDF5 metadata and the target arrays; each split's arrays
are preallocated and filled utterance by utterance only when the store asks for that split, and
dropped once handed over, so at most one split (about one copy of its arrays) is held. The
provenance's per-split counters are created up front and filled while the splits are written
(:func:`write_store` copies the provenance dict shallowly, so they reach the manifest).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mmrepro.data.mmsa import MODALITIES, NAN_POLICIES, SPLITS, Converted, SplitItem
from mmrepro.data.schema import DataValidationError, DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.data.store import sha256_file

#: store split -> MMIN set name
SET_NAMES = {"train": "trn", "valid": "val", "test": "tst"}
#: store modality -> MMIN feature folder
FOLDERS = {"text": "L", "audio": "A", "vision": "V"}
AUDIO_NORMS = ("trn", "utt", "none")
OVERLONG_POLICIES = ("error", "truncate")
NUM_CLASSES = 4
#: What CGGM/MPLMM declare for (text, audio, vision): ``get_seq_len`` and ``get_dim``.
CGGM_LENGTHS = (22, 350, 50)
CGGM_DIMS = (1024, 130, 342)
#: 4-class IEMOCAP totals (exc merged into hap), used only to infer the class order.
IEMOCAP_4CLASS_TOTALS = {"angry": 1103, "happy": 1636, "neutral": 1708, "sad": 1084}


def convert_iemocap_h5(path: Path | str, *, name: str, fold: int = 1, audio: str = "comparE",
                       vision: str = "denseface", text: str = "bert_large", audio_norm: str = "trn",
                       lengths: tuple[int, int, int] = CGGM_LENGTHS, overlong: str = "error",
                       nan_policy: str = "error", class_names: tuple[str, ...] | list[str] | None = None,
                       allow_pickle: bool = False, hash_files: bool = True) -> Converted:
    """Convert the IEMOCAP feature root at ``path`` (``A/``, ``V/``, ``L/``, ``target/``) for one fold.

    ``audio``/``vision``/``text`` name the feature files (``A/<audio>.h5`` ...). ``audio_norm``:
    ``"trn"`` (CGGM's default) uses ``A/<audio>_mean_std.h5`` group ``str(fold)``; ``"utt"`` the
    utterance's own mean and unbiased std; ``"none"`` leaves audio as stored. ``lengths`` are the
    padded lengths of (text, audio, vision); ``overlong`` is ``"error"`` or ``"truncate"``.
    ``class_names`` (4 names, index order) or None to infer them from the IEMOCAP class totals.
    ``allow_pickle`` lets ``np.load`` read object arrays (only for files you trust).
    ``hash_files`` records the SHA-256 of every input file in the provenance.
    """
    if audio_norm not in AUDIO_NORMS:
        raise ValueError(f"audio_norm must be one of {AUDIO_NORMS}, got {audio_norm!r}")
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or fold < 1:
        raise ValueError(f"fold must be a positive integer (MMIN's cvNo, 1..10), got {fold!r}")
    caps = tuple(int(v) for v in lengths)
    if len(caps) != len(MODALITIES) or any(v <= 0 or v != w for v, w in zip(caps, lengths)):
        raise ValueError(f"lengths must be three positive integers (text, audio, vision), got {lengths!r}")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != NUM_CLASSES or len(set(class_names)) != NUM_CLASSES:
            raise ValueError(f"class_names must be {NUM_CLASSES} distinct names, got {class_names!r}")
    root = Path(path)
    if not root.is_dir():
        raise DataValidationError("data root not found (expected a directory with A/, V/, L/ and target/)",
                                  file=str(root))
    kinds = {"text": text, "audio": audio, "vision": vision}
    cap = dict(zip(MODALITIES, caps))
    files = {m: root / FOLDERS[m] / f"{kinds[m]}.h5" for m in MODALITIES}
    for m in MODALITIES:
        if not files[m].is_file():
            raise DataValidationError(f"{m} feature file not found (expected one HDF5 dataset per utterance)",
                                      file=str(files[m]))
    target_dir = root / "target" / str(int(fold))
    if not target_dir.is_dir():
        raise DataValidationError(f"fold directory not found (expected target/<fold> for fold {fold})",
                                  file=str(target_dir))

    provenance: dict[str, Any] = {
        "dataset": name, "source": str(root), "format": "mmin_h5",
        "converter": "mmrepro.data.iemocap_h5.convert_iemocap_h5",
        "params": {"fold": int(fold), "audio": audio, "vision": vision, "text": text, "audio_norm": audio_norm,
                   "lengths": list(caps), "overlong": overlong, "nan_policy": nan_policy,
                   "class_names": class_names, "allow_pickle": allow_pickle},
        "files": {}, "splits": {s: SET_NAMES[s] for s in SPLITS},
        "truncated": {s: {} for s in SPLITS}, "nonfinite": {s: {} for s in SPLITS},
        "utt_norm_single_frame": {s: 0 for s in SPLITS}, "zero_length": {s: {} for s in SPLITS},
        "max_length": {s: {} for s in SPLITS},
    }

    # --- targets: labels and names of each split -------------------------------------------
    labels: dict[str, np.ndarray] = {}
    names: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        set_name = SET_NAMES[split]
        label_file = target_dir / f"{set_name}_label.npy"
        name_file = target_dir / f"{set_name}_int2name.npy"
        labels[split] = _labels(_load_npy(label_file, split, allow_pickle), file=str(label_file), split=split)
        names[split], how = _names(_load_npy(name_file, split, allow_pickle), file=str(name_file), split=split)
        provenance.setdefault("int2name_format", {})[split] = how
        if len(names[split]) != len(labels[split]):
            raise DataValidationError(f"{len(names[split])} names but {len(labels[split])} label rows in "
                                      f"{label_file.name}; expected one name per label row",
                                      file=str(name_file), split=split, key="int2name")
        dup = [k for k, c in Counter(names[split]).items() if c > 1]
        if dup:
            raise DataValidationError(f"{len(names[split]) - len(set(names[split]))} duplicate utterance name(s), "
                                      f"e.g. {dup[:3]}; expected unique names", file=str(name_file), split=split,
                                      key=dup[0])
        for k in names[split]:
            if k in seen:
                raise DataValidationError(f"utterance also in split {seen[k]!r}; expected disjoint splits "
                                          "within a fold", file=str(name_file), split=split, key=k)
            seen[k] = split
        provenance["files"][f"target/{fold}/{label_file.name}"] = _file_info(label_file, hash_files)
        provenance["files"][f"target/{fold}/{name_file.name}"] = _file_info(name_file, hash_files)

    # --- features: structure only (names present, 2-D numeric, dims agree, lengths) ---------
    dims: dict[str, int] = {}
    seq_len: dict[str, dict[str, np.ndarray]] = {s: {} for s in SPLITS}
    for m in MODALITIES:
        f = str(files[m])
        with _open_h5(files[m]) as h5:
            for split in SPLITS:
                t = np.empty(len(names[split]), dtype=np.int64)
                for i, key in enumerate(names[split]):
                    shape = _feature_shape(h5, key, file=f, split=split, modality=m)
                    if m not in dims:
                        dims[m] = shape[1]
                    elif shape[1] != dims[m]:
                        raise DataValidationError(f"{m} feature dim {shape[1]} differs from the other utterances' "
                                                  f"{dims[m]}; expected (T, {dims[m]})", file=f, split=split, key=key)
                    t[i] = shape[0]
                over = np.flatnonzero(t > cap[m])
                if len(over) and overlong == "error":
                    k = names[split][over[0]]
                    raise DataValidationError(
                        f"{len(over)} {m} utterance(s) longer than the padded length {cap[m]} (this one has "
                        f"{t[over[0]]} frames); raise lengths or pass overlong='truncate'", file=f, split=split, key=k)
                if len(over):
                    provenance["truncated"][split][m] = {
                        "count": int(len(over)), "cap": cap[m], "max_found": int(t.max()),
                        "examples": [names[split][j] for j in over[:5]]}
                zero = int(np.count_nonzero(t == 0))
                if zero:
                    provenance["zero_length"][split][m] = zero
                provenance["max_length"][split][m] = int(t.max()) if len(t) else 0
                seq_len[split][m] = t
            provenance["files"][f"{FOLDERS[m]}/{files[m].name}"] = {
                **_file_info(files[m], hash_files), "utterances_in_file": len(h5.keys()),
                "utterances_used": sum(len(names[s]) for s in SPLITS)}
        if m not in dims:
            raise DataValidationError(f"no utterances in any split; cannot tell the {m} feature dim",
                                      file=str(target_dir))

    # --- audio statistics -----------------------------------------------------------------
    stats = None
    if audio_norm == "trn":
        stats_file = root / FOLDERS["audio"] / f"{audio}_mean_std.h5"
        stats = _train_stats(stats_file, fold=int(fold), dim=dims["audio"])
        provenance["files"][f"{FOLDERS['audio']}/{stats_file.name}"] = _file_info(stats_file, hash_files)

    # --- classes ----------------------------------------------------------------------------
    totals = sum(np.bincount(labels[s], minlength=NUM_CLASSES) for s in SPLITS)
    inferred = _infer_class_names(totals)
    if class_names is not None:
        classes, source = class_names, "given (class_names)"
    elif inferred is not None:
        classes, source = inferred, "inferred from the 4-class IEMOCAP totals over trn+val+tst"
    else:
        classes = [f"class_{i}" for i in range(NUM_CLASSES)]
        source = ("unknown: the class totals over trn+val+tst are not the 4-class IEMOCAP totals "
                  f"{IEMOCAP_4CLASS_TOTALS}; pass class_names")
    provenance["classes"] = {
        "names": list(classes), "source": source, "inferred": inferred, "totals": [int(v) for v in totals],
        "per_split": {s: [int(v) for v in np.bincount(labels[s], minlength=NUM_CLASSES)] for s in SPLITS},
    }
    provenance["dims"] = {m: dims[m] for m in MODALITIES}
    provenance["matches_cggm_shapes"] = {
        "dims": tuple(dims[m] for m in MODALITIES) == CGGM_DIMS, "lengths": caps == CGGM_LENGTHS}

    schema = DatasetSchema(
        name=name,
        modalities=tuple(ModalitySpec(m, cap[m], dims[m]) for m in MODALITIES),
        # the 4-way classifier (the official code's) and, per emotion, its one-vs-rest binary task (the
        # MPLMM paper's four binary IEMOCAP tasks, as MulT reports them; named as in the MulT layout)
        tasks=(TaskSpec("emotion", "classification", num_classes=NUM_CLASSES),
               *(TaskSpec(c, "classification", num_classes=2) for c in classes)),
        splits=SPLITS,
        extra={"source_format": "mmin_h5", "emotions": list(classes), "class_names_source": source,
               "fold": int(fold), "features": dict(kinds), "audio_norm": audio_norm},
    )
    plan = _Plan(files=files, names=names, labels=labels, classes=list(classes), seq_len=seq_len, dims=dims, cap=cap,
                 audio_norm=audio_norm, stats=stats, nan_policy=nan_policy, provenance=provenance)
    return schema, _fill_splits(plan), provenance


# ---------------------------------------------------------------------------------------------
# Filling the splits (lazily, one at a time)


class _Plan:
    def __init__(self, **kw: Any):
        self.__dict__.update(kw)


def _fill_splits(plan: _Plan) -> Iterator[SplitItem]:
    for split in SPLITS:
        arrays = _fill(plan, split)
        yield split, arrays, {}
        del arrays


def _fill(plan: _Plan, split: str) -> dict[str, np.ndarray]:
    names = plan.names[split]
    n = len(names)
    out: dict[str, np.ndarray] = {}
    prov = plan.provenance
    for m in MODALITIES:
        f = str(plan.files[m])
        x = np.zeros((n, plan.cap[m], plan.dims[m]), dtype=np.float32)
        t_all = plan.seq_len[split][m]
        nonfinite = {"replaced_with_zero": 0, "utterances": 0, "examples": []}
        with _open_h5(plan.files[m]) as h5:
            for i, key in enumerate(names):
                a = _read(h5, key, file=f, split=split)
                bad = ~np.isfinite(a)
                k = int(np.count_nonzero(bad))
                if k:
                    if plan.nan_policy == "error":
                        raise DataValidationError(
                            f"{k} non-finite {m} value(s) (NaN/inf) in this utterance; expected finite features "
                            "(nan_policy='zero' replaces them with 0 and records the count)",
                            file=f, split=split, key=key)
                    a[bad] = 0.0
                    nonfinite["replaced_with_zero"] += k
                    nonfinite["utterances"] += 1
                    if len(nonfinite["examples"]) < 5:
                        nonfinite["examples"].append(key)
                if m == "audio" and len(a):
                    a = _normalise(a, plan, split)
                t = min(len(a), plan.cap[m])  # == the length found in the structural pass
                x[i, :t] = a[:t]
                del a
        if nonfinite["replaced_with_zero"]:
            prov["nonfinite"][split][m] = nonfinite
        out[f"x/{m}"] = x
        out[f"len/{m}"] = np.minimum(t_all, plan.cap[m]).astype(np.int64)
    out["y/emotion"] = plan.labels[split]
    for k, c in enumerate(plan.classes):  # one-vs-rest: 1 where the utterance's emotion is c
        out[f"y/{c}"] = (plan.labels[split] == k).astype(np.int64)
    out["ids"] = np.array(names, dtype=str) if n else np.array([], dtype="<U1")
    return out


def _normalise(a: np.ndarray, plan: _Plan, split: str) -> np.ndarray:
    if plan.audio_norm == "trn":
        mean, std = plan.stats
        return (a - mean) / std
    if plan.audio_norm == "utt":
        mean = a.mean(axis=0)
        if len(a) == 1:  # unbiased std undefined (torch.std -> NaN in CGGM); take 1, record it
            plan.provenance["utt_norm_single_frame"][split] += 1
            return a - mean
        std = a.std(axis=0, ddof=1)
        std[std == 0.0] = 1.0
        return (a - mean) / std
    return a


# ---------------------------------------------------------------------------------------------
# Reading and checking the inputs


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataValidationError(f"cannot open as HDF5 ({e}); the file is truncated, corrupt or not HDF5",
                                  file=str(path)) from e


def _feature_shape(h5: Any, key: str, *, file: str, split: str, modality: str) -> tuple[int, int]:
    try:
        ds = h5.get(key)
    except (OSError, KeyError, ValueError) as e:
        raise DataValidationError(f"cannot read entry ({e}); the file may be corrupt", file=file, split=split,
                                  key=key) from e
    if ds is None:
        raise DataValidationError(f"utterance missing from the {modality} feature file (named in int2name)",
                                  file=file, split=split, key=key)
    if not isinstance(ds, h5py.Dataset):
        raise DataValidationError(f"expected a (T, D) dataset, found a {type(ds).__name__}", file=file,
                                  split=split, key=key)
    if ds.dtype.kind not in "fiu":
        raise DataValidationError(f"expected numeric features, found dtype {ds.dtype}", file=file, split=split,
                                  key=key)
    if len(ds.shape) != 2 or ds.shape[1] == 0:
        raise DataValidationError(f"expected frame-level features (T, D) with D > 0, found shape {ds.shape}",
                                  file=file, split=split, key=key)
    return int(ds.shape[0]), int(ds.shape[1])


def _read(h5: Any, key: str, *, file: str, split: str) -> np.ndarray:
    try:
        return np.array(h5[key][()], dtype=np.float64)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DataValidationError(f"cannot read utterance features ({e}); the file may be corrupt", file=file,
                                  split=split, key=key) from e


def _load_npy(path: Path, split: str, allow_pickle: bool) -> np.ndarray:
    if not path.is_file():
        raise DataValidationError("target file not found", file=str(path), split=split)
    try:
        return np.load(path, allow_pickle=allow_pickle)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataValidationError("the array holds Python objects and needs pickle to load; pass "
                                      "allow_pickle=True only for a file you trust", file=str(path), split=split) from e
        raise DataValidationError(f"cannot load ({e}); truncated or not a .npy file", file=str(path), split=split) from e
    except (OSError, EOFError) as e:
        raise DataValidationError(f"cannot load ({e}); truncated or not a .npy file", file=str(path), split=split) from e


def _labels(a: np.ndarray, *, file: str, split: str) -> np.ndarray:
    if a.ndim != 2 or a.shape[1] != NUM_CLASSES:
        raise DataValidationError(f"expected one-hot labels of shape (N, {NUM_CLASSES}), found {a.shape}",
                                  file=file, split=split, key="label")
    if a.dtype.kind not in "fiub":
        raise DataValidationError(f"expected numeric one-hot labels, found dtype {a.dtype}", file=file,
                                  split=split, key="label")
    lab = a.astype(np.float64)
    ok = np.isin(lab, (0.0, 1.0)).all(axis=1) & (lab.sum(axis=1) == 1.0)
    bad = np.flatnonzero(~ok)
    if len(bad):
        raise DataValidationError(f"{len(bad)} label row(s) are not one-hot (rows {bad[:5].tolist()}, first "
                                  f"{lab[bad[0]].tolist()})", file=file, split=split, key="label")
    return np.argmax(lab, axis=1).astype(np.int64)


def _names(a: np.ndarray, *, file: str, split: str) -> tuple[list[str], str]:
    """Utterance names from int2name: rows whose first element is the name (CGGM), or a 1-D array."""
    if a.ndim == 2 and a.shape[1] >= 1:
        col, how = a[:, 0], f"rows of {a.shape[1]} element(s), name first ({a.dtype}; as CGGM reads it)"
    elif a.ndim == 1:
        col, how = a, f"1-D array of names ({a.dtype}; CGGM's int2name[i][0] would not read this)"
    else:
        raise DataValidationError(f"expected (N, 1) rows of names or (N,) names, found shape {a.shape}",
                                  file=file, split=split, key="int2name")
    out = []
    for i, v in enumerate(col.tolist()):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataValidationError(f"row {i}: name is not UTF-8 ({e})", file=file, split=split,
                                          key="int2name") from e
        if not isinstance(v, str) or not v:
            raise DataValidationError(f"row {i}: expected a non-empty name (bytes or str), found {v!r}",
                                      file=file, split=split, key="int2name")
        out.append(v)
    return out, how


def _train_stats(path: Path, *, fold: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataValidationError("audio statistics file not found (audio_norm='trn' needs the per-fold mean and "
                                  "std; audio_norm='utt' or 'none' does not)", file=str(path))
    with _open_h5(path) as h5:
        group = h5.get(str(fold))
        if group is None:
            raise DataValidationError(f"no group for fold {fold}; found {sorted(h5.keys())[:12]}", file=str(path),
                                      key=str(fold))
        out = []
        for what in ("mean", "std"):
            key = f"{fold}/{what}"
            ds = group.get(what) if hasattr(group, "get") else None
            if ds is None:
                raise DataValidationError(f"missing dataset (expected {fold}/mean and {fold}/std)", file=str(path),
                                          key=key)
            try:
                v = np.array(ds[()], dtype=np.float64)
            except (OSError, ValueError, TypeError) as e:
                raise DataValidationError(f"cannot read ({e})", file=str(path), key=key) from e
            if v.shape not in ((dim,), (1, dim)):
                raise DataValidationError(f"expected shape ({dim},) matching the audio feature dim, found {v.shape}",
                                          file=str(path), key=key)
            v = v.reshape(dim)
            if not np.isfinite(v).all():
                raise DataValidationError(f"{int(np.count_nonzero(~np.isfinite(v)))} non-finite value(s)",
                                          file=str(path), key=key)
            out.append(v)
    zero = np.flatnonzero(out[1] == 0.0)
    if len(zero):
        raise DataValidationError(f"std is 0 in {len(zero)} dim(s) (e.g. {zero[:5].tolist()}); dividing would give "
                                  "inf", file=str(path), key=f"{fold}/std")
    return out[0], out[1]


def _infer_class_names(totals: np.ndarray) -> list[str] | None:
    """Class names in index order when the totals are exactly the 4-class IEMOCAP totals, else None."""
    by_count = {v: k for k, v in IEMOCAP_4CLASS_TOTALS.items()}
    counts = [int(v) for v in totals]
    if len(counts) != NUM_CLASSES or sorted(counts) != sorted(by_count):
        return None
    return [by_count[c] for c in counts]


def _file_info(path: Path, hash_files: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"bytes": path.stat().st_size}
    if hash_files:
        info["sha256"] = sha256_file(path)
    return info
