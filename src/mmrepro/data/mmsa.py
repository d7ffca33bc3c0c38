"""Converters for the public multimodal-sentiment feature pickles: MMSA (MOSI, MOSEI, CH-SIMS) and
MulT (MOSI, MOSEI, IEMOCAP).

Both return ``(schema, splits, provenance)`` ready for :func:`mmrepro.data.store.write_store`:
``splits`` yields ``(split, arrays, {})`` for ``train``, ``valid`` and ``test`` (no oracle: real
data has no known ceiling). Arrays follow the store conventions of :mod:`mmrepro.data.synth`:
``x/<modality>`` float32 ``(N, T, D)``, ``len/<modality>`` int64 ``(N,)`` (valid tokens first,
padding after), ``y/<task>`` float32 (regression) or int64 (classes), ``ids`` unicode ``(N,)``.
Modalities are always ``text``, ``audio``, ``vision``; lengths and dims are read from the train
split, and every other split must match them (the store's validator names the split and key).

What was read to confirm the formats (public code, read only; nothing copied)
-----------------------------------------------------------------------------
MMSA feature pickles (``thuiar/MMSA``: ``src/MMSA/data_loader.py`` at ``177bc04``,
``src/MMSA/config/config_regression.json``, ``src/MMSA/models/multiTask/SELF_MM.py``):

* The file is one pickled dict ``{"train", "valid", "test"}``; each split is a dict of parallel
  arrays. MMSA reads ``text`` (BERT features ``(N, T, 768)``) or, for models that run BERT
  themselves, ``text_bert`` (``(N, 3, T)``: token ids, attention mask, segment ids); ``audio`` and
  ``vision`` ``(N, T, D)``; ``raw_text``; ``id`` (strings ``"<video>$_$<clip>"``);
  ``regression_labels``; for unaligned data ``audio_lengths`` and ``vision_lengths``. Other keys
  (``raw_text``, ``annotations``, the deprecated ``classification_labels``) are ignored here and
  listed in the provenance.
* Modality order everywhere in MMSA is (text, audio, vision): ``get_seq_len`` returns
  ``(text, audio, vision)`` and the config's unaligned MOSI/MOSEI ``seq_lens`` is
  ``[50, 500, 375]``, so **audio has 500 steps and vision 375**; ``feature_dims`` are
  ``[768, 5, 20]`` (MOSI), ``[768, 74, 35]`` (MOSEI), and SIMS is ``[39, 400, 55]`` steps with
  ``[768, 33, 709]`` dims.
* Lengths: MMSA's models pack audio/vision with ``pack_padded_sequence(batch_first=True)``, so
  valid frames come first. The text length is the sum of the attention mask ``text_bert[:, 1, :]``.
  For aligned data MMSA ignores ``audio_lengths``/``vision_lengths`` and uses the text length for
  all three; this converter does the same when ``aligned`` is true (by default: all three
  sequence lengths equal) and ``text_bert`` is present. Without ``text_bert`` the text length
  is the full padded length. A stored length longer than the padded array is clipped to it and
  counted in the provenance.
* SIMS unimodal labels: MMSA reads ``"regression" + "_labels_" + m`` for m in T, A, V, i.e. keys
  ``regression_labels_T``, ``regression_labels_A``, ``regression_labels_V`` (one MMSA revision
  spells the prefix ``"regression_labels" + "_labels_"``, which names no key in the released
  files; we follow the working spelling). When the train split has all three they become the
  regression tasks ``sentiment_text``, ``sentiment_audio``, ``sentiment_vision``.
* MMSA zeroes ``audio == -inf`` (and NaN after averaging) silently. Here ``nan_policy="error"``
  refuses non-finite features and ``"zero"`` replaces them with 0 and records the count per split
  and key in the provenance (policy applied to all three feature arrays).
* Labels: MOSI/MOSEI sentiment in [-3, 3], SIMS in [-1, 1] (``label_range``). MMSA trains a
  regression and derives Acc-2/5/7 from the predictions at metric time (see
  :mod:`mmrepro.metrics`); no classification view is stored, because MMSA's own class labels are
  deprecated and a stored class view would have to pick one of the has-0/non-0 binarisations.

MulT pickles (``yaohungt/Multimodal-Transformer``: ``src/dataset.py``, ``src/eval_metrics.py``,
``main.py``):

* Files ``<data>_data.pkl`` (aligned) and ``<data>_data_noalign.pkl`` with ``<data>`` in
  ``mosi``, ``mosei_senti``, ``iemocap``. One dict of splits, each with ``text`` (GloVe 300-d),
  ``audio``, ``vision`` ``(N, T, D)``, ``labels`` and optionally ``id``. Dims and lengths are
  whatever the arrays hold (MulT reads them from the arrays); no lengths are stored, the arrays are
  padded, so every length here is the full padded length (the provenance says so).
* MulT zeroes ``audio == -inf`` silently; here ``nan_policy`` decides, as above.
* ``id`` is absent in some files; where present it is ``(N, 3)`` (MulT decodes the MOSI entries
  from bytes). Ids are the fields joined with ``"$_$"``; when that is not unique in a split (or
  there is no usable ``id``) the ids fall back to ``"<split>_<row>"``, and the provenance records
  which was used and why.
* Sentiment labels are ``(N, 1, 1)``, regression in [-3, 3].
* IEMOCAP labels are ``(N, 4, 2)``: per emotion (neutral, happy, sad, angry) a one-hot
  (absent, present). MulT trains and reports four binary problems (``argmax`` over the last axis,
  accuracy and weighted F1 per emotion). Both views are stored: ``y/neutral``, ``y/happy``,
  ``y/sad``, ``y/angry`` (2 classes, 1 = present) and ``y/emotion`` (4 classes, order as above),
  the argmax over emotions of the "present" column, as third-party code built on these files does.
  A sample with no emotion present, or several, has no single 4-class label: with
  ``emotion_ambiguous="argmax"`` it gets numpy's argmax (the first present emotion in the order
  above; neutral when none is present) and the counts and example ids are recorded; with
  ``"error"`` conversion stops. Each (absent, present) pair must be a proper one-hot.

Loading: ``pickle.load`` runs code from the file, so only convert files you trust; the SHA-256 of
the file is always recorded, and enforced when given or when the path ends with one of the
published MMSA file names (:data:`PUBLISHED_SHA256`). Every split is converted when the converter
is called (so the provenance is complete before :func:`write_store` copies it); each array is
converted in place of the loaded one (``np.asarray`` to float32, in-place zeroing), and the loaded
split is dropped, so one copy of the data is held; the returned iterator hands each split over
and drops its reference.
"""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mmrepro.data import LOADER_MODALITIES
from mmrepro.data.schema import DataValidationError, DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.data.store import sha256_file

SPLITS = ("train", "valid", "test")
MODALITIES = LOADER_MODALITIES["mmsa"]
NAN_POLICIES = ("error", "zero")
TEXT_VIEWS = ("bert", "bert_inputs")
EMOTIONS = ("neutral", "happy", "sad", "angry")
MMSA_UNIMODAL = {"T": "text", "A": "audio", "V": "vision"}
ID_SEPARATOR = "$_$"

#: Published SHA-256 of the MMSA feature files (datasets.md), keyed by their path in the release.
PUBLISHED_SHA256 = {
    "MOSI/Processed/unaligned_50.pkl": "78e0f8b5ef8ff71558e7307848fc1fa929ecb078203f565ab22b9daab2e02524",
    "MOSI/Processed/aligned_50.pkl": "d3994fd25681f9c7ad6e9c6596a6fe9b4beb85ff7d478ba978b124139002e5f9",
    "MOSEI/Processed/unaligned_50.pkl": "ad8b23d50557045e7d47959ce6c5b955d8d983f2979c7d9b7b9226f6dd6fec1f",
    "MOSEI/Processed/aligned_50.pkl": "45eccfb748a87c80ecab9bfac29582e7b1466bf6605ff29d3b338a75120bf791",
    "SIMS/Processed/unaligned_39.pkl": "c9e20c13ec0454d98bb9c1e520e490c75146bfa2dfeeea78d84de047dbdd442f",
}

#: Feature widths (text, audio, vision) of the published MMSA files (MMSA's config_regression.json),
#: so a cross-dataset pair of them is checked before they are downloaded: no two corpora share them.
PUBLISHED_WIDTHS = {
    "MOSI/Processed/unaligned_50.pkl": (768, 5, 20),
    "MOSI/Processed/aligned_50.pkl": (768, 5, 20),
    "MOSEI/Processed/unaligned_50.pkl": (768, 74, 35),
    "MOSEI/Processed/aligned_50.pkl": (768, 74, 35),
    "SIMS/Processed/unaligned_39.pkl": (768, 33, 709),
}

SplitItem = tuple[str, dict[str, np.ndarray], dict[str, Any]]
Converted = tuple[DatasetSchema, Iterator[SplitItem], dict[str, Any]]

_CHUNK_ELEMENTS = 1 << 24  # scan features for NaN/inf in blocks of about this many values


# ---------------------------------------------------------------------------------------------
# Public converters


def convert_mmsa(path: Path | str, *, name: str, text: str = "bert", nan_policy: str = "error",
                 label_range: tuple[float, float] = (-3.0, 3.0), aligned: bool | None = None,
                 label_scale: float = 1.0, sha256: str | None = None) -> Converted:
    """Convert an MMSA feature pickle (MOSI/MOSEI ``*_50.pkl``, SIMS ``unaligned_39.pkl``).

    ``text="bert"`` stores the BERT features ``text`` ``(N, T, 768)``; ``"bert_inputs"`` stores
    ``text_bert`` as ``(N, T, 3)`` float32 (token id, mask, segment id per token) for models that
    run BERT themselves. ``label_range`` is (-3, 3) for MOSI/MOSEI and (-1, 1) for SIMS.
    ``aligned`` (None: detected as "all three sequence lengths equal") makes audio and vision take
    the text-mask length, as MMSA's aligned models do; otherwise ``audio_lengths`` and
    ``vision_lengths`` are used. ``label_scale`` multiplies every label and ``label_range`` (CASP puts
    SIMS on MOSI's scale for cross-dataset pairs: ``label_range: [-1, 1]``, ``label_scale: 3``).
    ``sha256`` is enforced when given (published files: automatically).
    """
    if text not in TEXT_VIEWS:
        raise ValueError(f"text must be one of {TEXT_VIEWS}, got {text!r}")
    _check_policy(nan_policy)
    if not label_scale > 0:
        raise ValueError(f"label_scale must be positive, got {label_scale}")
    lo, hi = (float(v) * label_scale for v in label_range)
    path = Path(path)
    file = str(path)
    raw, provenance = _load(path, name=name, fmt="mmsa", sha256=sha256)
    provenance.update(converter="mmrepro.data.mmsa.convert_mmsa",
                      params={"text": text, "nan_policy": nan_policy, "label_range": [lo, hi], "aligned": aligned,
                              "label_scale": label_scale})
    unimodal: list[str] = []
    converted: dict[str, dict[str, np.ndarray]] = {}
    for split in SPLITS:
        d = raw.pop(split)
        if split == "train":
            found = [m for m in MMSA_UNIMODAL if f"regression_labels_{m}" in d]
            if found and len(found) != len(MMSA_UNIMODAL):
                raise DataValidationError(
                    f"unimodal labels must come as all of regression_labels_T/_A/_V, found only "
                    f"{['regression_labels_' + m for m in found]}", file=file, split=split,
                    key=f"regression_labels_{next(m for m in MMSA_UNIMODAL if m not in found)}")
            unimodal = found
        converted[split] = _mmsa_split(d, split, file=file, text=text, nan_policy=nan_policy,
                                       unimodal=unimodal, aligned=aligned, provenance=provenance)
        for key in converted[split]:
            if key.startswith("y/"):
                converted[split][key] *= np.float32(label_scale)
        del d
    provenance["ignored_top_level_keys"] = sorted(map(str, raw))
    del raw
    tasks = [TaskSpec("sentiment", "regression", value_range=(lo, hi))]
    tasks += [TaskSpec(f"sentiment_{MMSA_UNIMODAL[m]}", "regression", value_range=(lo, hi)) for m in unimodal]
    schema = _schema(name, converted["train"], tasks, source_format="mmsa", text_view=text)
    return schema, _hand_over(converted), provenance


def mmsa_widths(path: Path | str, text: str = "bert") -> dict[str, int]:
    """The feature width of each modality of an MMSA pickle, as :func:`convert_mmsa` would store them
    (the published files' from :data:`PUBLISHED_WIDTHS`, any other file's read from its train split)."""
    path = Path(path)
    posix = path.as_posix()
    known = next((w for rel, w in PUBLISHED_WIDTHS.items() if posix == rel or posix.endswith("/" + rel)), None)
    if known is None:
        with open(path, "rb") as f:
            train = pickle.load(f)["train"]
        known = (3 if text == "bert_inputs" else np.shape(train["text"])[-1],
                 np.shape(train["audio"])[-1], np.shape(train["vision"])[-1])
    elif text == "bert_inputs":
        known = (3, *known[1:])
    return dict(zip(MODALITIES, map(int, known)))


def convert_mult(path: Path | str, *, name: str, task: str = "sentiment", nan_policy: str = "error",
                 label_range: tuple[float, float] = (-3.0, 3.0), emotion_ambiguous: str = "argmax",
                 sha256: str | None = None) -> Converted:
    """Convert a MulT pickle (``mosi_data.pkl``, ``mosei_senti_data.pkl``, ``iemocap_data.pkl`` or a
    ``*_data_noalign.pkl``).

    ``task="sentiment"``: labels ``(N, 1, 1)`` -> regression ``y/sentiment`` in ``label_range``.
    ``task="emotion"`` (IEMOCAP): labels ``(N, 4, 2)`` -> ``y/emotion`` (4 classes) and the binary
    ``y/neutral``, ``y/happy``, ``y/sad``, ``y/angry``; ``emotion_ambiguous`` ("argmax" or
    "error") decides what happens to samples with no or several emotions present.
    """
    if task not in ("sentiment", "emotion"):
        raise ValueError(f"task must be 'sentiment' or 'emotion', got {task!r}")
    if emotion_ambiguous not in ("argmax", "error"):
        raise ValueError(f"emotion_ambiguous must be 'argmax' or 'error', got {emotion_ambiguous!r}")
    _check_policy(nan_policy)
    lo, hi = (float(v) for v in label_range)
    path = Path(path)
    file = str(path)
    raw, provenance = _load(path, name=name, fmt="mult", sha256=sha256)
    provenance.update(converter="mmrepro.data.mmsa.convert_mult",
                      params={"task": task, "nan_policy": nan_policy, "label_range": [lo, hi],
                              "emotion_ambiguous": emotion_ambiguous},
                      lengths={split: {m: "full padded length (MulT pickles store no lengths)" for m in MODALITIES}
                               for split in SPLITS})
    converted: dict[str, dict[str, np.ndarray]] = {}
    for split in SPLITS:
        d = raw.pop(split)
        converted[split] = _mult_split(d, split, file=file, task=task, nan_policy=nan_policy,
                                       emotion_ambiguous=emotion_ambiguous, provenance=provenance)
        del d
    provenance["ignored_top_level_keys"] = sorted(map(str, raw))
    del raw
    if task == "sentiment":
        tasks = [TaskSpec("sentiment", "regression", value_range=(lo, hi))]
    else:
        tasks = [TaskSpec("emotion", "classification", num_classes=len(EMOTIONS))]
        tasks += [TaskSpec(e, "classification", num_classes=2) for e in EMOTIONS]
    extra = {"emotions": list(EMOTIONS)} if task == "emotion" else {}
    schema = _schema(name, converted["train"], tasks, source_format="mult", **extra)
    return schema, _hand_over(converted), provenance


# ---------------------------------------------------------------------------------------------
# One split of each format


def _mmsa_split(d: dict[str, Any], split: str, *, file: str, text: str, nan_policy: str,
                unimodal: list[str], aligned: bool | None, provenance: dict[str, Any]) -> dict[str, np.ndarray]:
    keys = "text or text_bert, audio, vision, id, regression_labels"
    ids = _ids(_take(d, "id", file, split, keys), file=file, split=split)
    if len(set(ids.tolist())) != len(ids):
        dup = [k for k, c in Counter(ids.tolist()).items() if c > 1]
        raise DataValidationError(f"{len(ids) - len(set(ids.tolist()))} duplicate sample id(s), e.g. {dup[:3]} "
                                  "(expected unique ids)", file=file, split=split, key="id")
    n = len(ids)
    out: dict[str, np.ndarray] = {}
    text_len = None  # from the BERT attention mask, when the file has text_bert
    lengths_source: dict[str, str] = {}
    if "text_bert" in d:
        inputs = _floats(d.pop("text_bert"), file=file, split=split, key="text_bert", n=n,
                         provenance=provenance, what="(N, 3, T) BERT inputs")
        if inputs.shape[1] != 3:
            raise DataValidationError(f"expected shape ({n}, 3, T) (token ids, mask, segment ids), found "
                                      f"{inputs.shape}", file=file, split=split, key="text_bert")
        t_bert = inputs.shape[2]
        text_len = _lengths(np.rint(inputs[:, 1, :].sum(axis=1)), n=n, limit=t_bert, file=file,
                            split=split, key="text_bert", provenance=provenance)
        lengths_source["text"] = "sum of the text_bert attention mask"
        if text == "bert_inputs":
            out["x/text"] = inputs.transpose(0, 2, 1)
        del inputs
    elif text == "bert_inputs":
        raise DataValidationError(f"missing key (text='bert_inputs' needs the (N, 3, T) BERT inputs); "
                                  f"found keys {sorted(map(str, d))}", file=file, split=split, key="text_bert")
    if text == "bert":
        out["x/text"] = _floats(_take(d, "text", file, split, keys), file=file, split=split, key="text", n=n,
                                provenance=provenance, what="(N, T, 768) BERT features")
        if text_len is not None and out["x/text"].shape[1] != t_bert:
            raise DataValidationError(f"text has {out['x/text'].shape[1]} steps but text_bert has {t_bert}; "
                                      "expected the same padded length", file=file, split=split, key="text")
    d.pop("text", None)  # unused under text="bert_inputs"
    for m in ("audio", "vision"):
        out[f"x/{m}"] = _floats(_take(d, m, file, split, keys), file=file, split=split, key=m, n=n,
                                provenance=provenance, what="(N, T, D) features")
    t_text = out["x/text"].shape[1]
    if text_len is None:
        text_len = np.full(n, t_text, dtype=np.int64)
        lengths_source["text"] = "full padded length (no text_bert mask)"
        has_mask = False
    else:
        has_mask = True
    out["len/text"] = text_len
    if aligned is None:
        aligned = out["x/audio"].shape[1] == out["x/vision"].shape[1] == t_text
    provenance.setdefault("aligned", {})[split] = bool(aligned)
    for m in ("audio", "vision"):
        key, t = f"{m}_lengths", out[f"x/{m}"].shape[1]
        if aligned and has_mask:
            out[f"len/{m}"] = text_len.copy()
            lengths_source[m] = "text length (aligned data: MMSA uses the text mask for all modalities)"
            if key in d:
                d.pop(key)
                lengths_source[m] += f"; {key} ignored"
        elif key in d:
            out[f"len/{m}"] = _lengths(d.pop(key), n=n, limit=t, file=file, split=split, key=key,
                                       provenance=provenance)
            lengths_source[m] = key
        else:
            out[f"len/{m}"] = np.full(n, t, dtype=np.int64)
            lengths_source[m] = f"full padded length (no {key})"
    provenance.setdefault("lengths", {})[split] = lengths_source
    for key in ("text", "audio", "vision"):
        out[f"x/{key}"] = _scrub(out[f"x/{key}"], nan_policy, file=file, split=split,
                                 key="text_bert" if key == "text" and text == "bert_inputs" else key,
                                 provenance=provenance)
    out["y/sentiment"] = _labels(_take(d, "regression_labels", file, split, keys), n=n, file=file,
                                 split=split, key="regression_labels")
    for m in unimodal:
        key = f"regression_labels_{m}"
        out[f"y/sentiment_{MMSA_UNIMODAL[m]}"] = _labels(
            _take(d, key, file, split, "regression_labels_T/_A/_V (the train split has them)"),
            n=n, file=file, split=split, key=key)
    out["ids"] = ids
    provenance.setdefault("ids", {})[split] = "MMSA id strings"
    provenance.setdefault("ignored_keys", {})[split] = sorted(map(str, d))
    return out


def _mult_split(d: dict[str, Any], split: str, *, file: str, task: str, nan_policy: str,
                emotion_ambiguous: str, provenance: dict[str, Any]) -> dict[str, np.ndarray]:
    keys = "text, audio, vision, labels (id optional)"
    labels = np.asarray(_take(d, "labels", file, split, keys))
    n = labels.shape[0] if labels.ndim else 0
    out: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        x = _floats(_take(d, m, file, split, keys), file=file, split=split, key=m, n=n,
                    provenance=provenance, what="(N, T, D) features")
        out[f"x/{m}"] = _scrub(x, nan_policy, file=file, split=split, key=m, provenance=provenance)
        out[f"len/{m}"] = np.full(n, x.shape[1], dtype=np.int64)
        del x
    if task == "sentiment":
        if labels.ndim == 3 and labels.shape[1:] == (len(EMOTIONS), 2):
            raise DataValidationError(f"labels have the IEMOCAP shape {labels.shape}; use task='emotion'",
                                      file=file, split=split, key="labels")
        out["y/sentiment"] = _labels(labels, n=n, file=file, split=split, key="labels")
    else:
        out.update(_emotion_views(labels, split, file=file, policy=emotion_ambiguous, provenance=provenance))
    del labels
    ids, how = _mult_ids(d.pop("id", None), n, split, file=file)
    out["ids"] = ids
    provenance.setdefault("ids", {})[split] = how
    provenance.setdefault("ignored_keys", {})[split] = sorted(map(str, d))
    return out


def _emotion_views(labels: np.ndarray, split: str, *, file: str, policy: str,
                   provenance: dict[str, Any]) -> dict[str, np.ndarray]:
    n = labels.shape[0] if labels.ndim else 0
    if labels.shape != (n, len(EMOTIONS), 2):
        raise DataValidationError(f"expected IEMOCAP labels of shape ({n}, {len(EMOTIONS)}, 2) "
                                  f"(emotion x (absent, present)), found {labels.shape}",
                                  file=file, split=split, key="labels")
    try:
        lab = np.asarray(labels, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataValidationError(f"labels are not numeric ({e})", file=file, split=split, key="labels") from e
    binary = np.isin(lab, (0.0, 1.0))
    bad = int(np.count_nonzero(~(binary.all(axis=2) & (lab.sum(axis=2) == 1.0))))
    if bad:
        raise DataValidationError(f"{bad} (absent, present) pair(s) are not one-hot (expected [1, 0] or [0, 1])",
                                  file=file, split=split, key="labels")
    present = lab[:, :, 1].astype(np.int64)  # == argmax over (absent, present), as MulT takes it
    out = {f"y/{e}": present[:, i].copy() for i, e in enumerate(EMOTIONS)}
    count = present.sum(axis=1)
    none, several = np.flatnonzero(count == 0), np.flatnonzero(count > 1)
    rows = np.arange(n)
    examples = {"none": [int(r) for r in rows[none][:5]], "several": [int(r) for r in rows[several][:5]]}
    if policy == "error" and (len(none) or len(several)):
        raise DataValidationError(f"{len(none)} sample(s) with no emotion present (rows {examples['none']}) and "
                                  f"{len(several)} with several (rows {examples['several']}); expected exactly one "
                                  "for the 4-class view (emotion_ambiguous='argmax' keeps them)",
                                  file=file, split=split, key="labels")
    out["y/emotion"] = np.argmax(present, axis=1).astype(np.int64)
    provenance.setdefault("emotion_4class", {})[split] = {
        "classes": list(EMOTIONS), "policy": policy,
        "no_emotion": int(len(none)), "several_emotions": int(len(several)), "example_rows": examples,
        "class_counts": [int(c) for c in np.bincount(out["y/emotion"], minlength=len(EMOTIONS))],
    }
    return out


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _check_policy(nan_policy: str) -> None:
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")


def _published_sha256(path: Path) -> str | None:
    posix = path.as_posix()
    for rel, digest in PUBLISHED_SHA256.items():
        if posix == rel or posix.endswith("/" + rel):
            return digest
    return None


def _load(path: Path, *, name: str, fmt: str, sha256: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the checksum, unpickle, check the split layout; return (raw dict, provenance)."""
    file = str(path)
    if not path.is_file():
        raise DataValidationError("file not found (expected a feature pickle)", file=file)
    expected = sha256 or _published_sha256(path)
    actual = sha256_file(path)
    if expected and actual != expected.lower():
        raise DataValidationError(f"SHA-256 mismatch: expected {expected}, found {actual} "
                                  "(incomplete download or a different release)", file=file)
    encoding = "ASCII (pickle default)"
    try:
        with open(path, "rb") as f:
            try:
                raw = pickle.load(f)
            except UnicodeDecodeError:  # Python 2 pickles of numpy arrays need latin1
                f.seek(0)
                raw = pickle.load(f, encoding="latin1")
                encoding = "latin1"
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - unpickling fails in many ways; all mean the same here
        raise DataValidationError(f"cannot unpickle ({type(e).__name__}: {e}); the file is truncated, corrupt "
                                  f"or not a pickle (expected a pickled dict of splits {list(SPLITS)})",
                                  file=file) from e
    if not isinstance(raw, dict):
        raise DataValidationError(f"expected a pickled dict of splits {list(SPLITS)}, found {type(raw).__name__}",
                                  file=file)
    for split in SPLITS:
        if split not in raw:
            raise DataValidationError(f"missing split (expected splits {list(SPLITS)}, found "
                                      f"{sorted(map(str, raw))})", file=file, split=split)
        if not isinstance(raw[split], dict):
            raise DataValidationError(f"expected a dict of arrays, found {type(raw[split]).__name__}",
                                      file=file, split=split)
    provenance: dict[str, Any] = {
        "dataset": name, "source": file, "format": fmt, "sha256": actual,
        "sha256_checked": bool(expected), "pickle_encoding": encoding,
        "nonfinite": {}, "lengths_clipped": {}, "cast_to_float32": {},
    }
    return raw, provenance


def _take(d: dict[str, Any], key: str, file: str, split: str, expected: str) -> Any:
    if key not in d:
        raise DataValidationError(f"missing key (expected {expected}); found keys {sorted(map(str, d))}",
                                  file=file, split=split, key=key)
    return d.pop(key)


def _floats(value: Any, *, file: str, split: str, key: str, n: int, provenance: dict[str, Any],
            what: str, ndim: int = 3) -> np.ndarray:
    """``value`` as float32 (no copy when it already is one), checked to be ``(n, ...)`` of ``ndim``."""
    source_dtype = getattr(value, "dtype", None)
    try:
        a = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise DataValidationError(f"expected a numeric array {what}, found {type(value).__name__} ({e})",
                                  file=file, split=split, key=key) from e
    del value
    if a.ndim != ndim or a.shape[0] != n:
        raise DataValidationError(f"expected {what} with N={n}, found shape {a.shape}", file=file, split=split,
                                  key=key)
    if source_dtype is not None and source_dtype != np.float32:
        provenance["cast_to_float32"].setdefault(split, {})[key] = str(source_dtype)
    return a


def _scrub(a: np.ndarray, policy: str, *, file: str, split: str, key: str,
           provenance: dict[str, Any]) -> np.ndarray:
    """Count NaN/+-inf in ``a``; raise under "error", zero them in place and record under "zero"."""
    step = max(1, _CHUNK_ELEMENTS // max(1, int(np.prod(a.shape[1:]))))
    nan = neginf = posinf = 0
    for i in range(0, a.shape[0], step):
        block = a[i:i + step]
        bad = ~np.isfinite(block)
        k = int(np.count_nonzero(bad))
        if not k:
            continue
        b_nan = int(np.count_nonzero(np.isnan(block)))
        b_neg = int(np.count_nonzero(np.isneginf(block)))
        nan, neginf, posinf = nan + b_nan, neginf + b_neg, posinf + k - b_nan - b_neg
        if policy == "zero":
            if not a.flags.writeable:
                a = a.copy()
                block = a[i:i + step]
            block[bad] = 0.0
    total = nan + neginf + posinf
    if total and policy == "error":
        raise DataValidationError(f"{total} non-finite value(s) ({nan} NaN, {neginf} -inf, {posinf} +inf) found; "
                                  "expected finite features (nan_policy='zero' replaces them with 0 and records "
                                  "the count)", file=file, split=split, key=key)
    if total:
        provenance["nonfinite"].setdefault(split, {})[key] = {
            "replaced_with_zero": total, "nan": nan, "neginf": neginf, "posinf": posinf}
    return a


def _lengths(value: Any, *, n: int, limit: int, file: str, split: str, key: str,
             provenance: dict[str, Any]) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DataValidationError(f"expected {n} numeric lengths ({e})", file=file, split=split, key=key) from e
    if a.shape != (n,):
        raise DataValidationError(f"expected {n} lengths, found {a.size}", file=file, split=split, key=key)
    if n and (not np.isfinite(a).all() or (a != np.round(a)).any() or a.min() < 0):
        raise DataValidationError(f"expected non-negative whole lengths, found values in [{a.min()}, {a.max()}]",
                                  file=file, split=split, key=key)
    out = a.astype(np.int64)
    over = int(np.count_nonzero(out > limit))
    if over:
        provenance["lengths_clipped"].setdefault(split, {})[key] = {"count": over, "padded_length": int(limit),
                                                                    "max_found": int(out.max())}
        np.minimum(out, limit, out=out)
    return out


def _labels(value: Any, *, n: int, file: str, split: str, key: str) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise DataValidationError(f"expected numeric labels ({e})", file=file, split=split, key=key) from e
    if a.size != n or (a.ndim and a.shape[0] != n):
        raise DataValidationError(f"expected {n} labels (shape ({n},), ({n}, 1) or ({n}, 1, 1)), found shape "
                                  f"{a.shape}", file=file, split=split, key=key)
    return a.reshape(n)


def _text(x: Any) -> str:
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError:
            return x.decode("latin1")
    return str(x)


def _ids(value: Any, *, file: str, split: str) -> np.ndarray:
    """MMSA ids: a list or 1-D array of str/bytes -> unicode array."""
    a = np.asarray(value, dtype=object)
    if a.ndim != 1:
        raise DataValidationError(f"expected a list of id strings, found shape {a.shape}",
                                  file=file, split=split, key="id")
    return np.array([_text(x) for x in a], dtype=str) if len(a) else np.array([], dtype="<U1")


def _mult_ids(value: Any, n: int, split: str, *, file: str) -> tuple[np.ndarray, str]:
    """MulT ids joined to strings, or ``<split>_<row>`` when absent, malformed or not unique."""
    fallback = np.array([f"{split}_{i}" for i in range(n)], dtype=str) if n else np.array([], dtype="<U1")
    if value is None:
        return fallback, f"'{split}_<row>' (the file has no id)"
    a = np.asarray(value, dtype=object)
    if a.ndim == 1 and len(a) == n:
        rows = [[x] for x in a]
    elif a.ndim == 2 and len(a) == n:
        rows = list(a)
    else:
        return fallback, f"'{split}_<row>' (id has shape {a.shape}, expected ({n},) or ({n}, k))"
    joined = [ID_SEPARATOR.join(_text(x) for x in row) for row in rows]
    dup = n - len(set(joined))
    if dup:
        return fallback, f"'{split}_<row>' ({dup} duplicate id(s) after joining the id fields)"
    width = a.shape[1] if a.ndim == 2 else 1
    how = f"id fields joined with '{ID_SEPARATOR}' ({width} field(s) per sample)" if width > 1 else "id strings"
    return (np.array(joined, dtype=str) if n else fallback), how


def _schema(name: str, train: dict[str, np.ndarray], tasks: list[TaskSpec], **extra: Any) -> DatasetSchema:
    mods = tuple(ModalitySpec(m, int(train[f"x/{m}"].shape[1]), int(train[f"x/{m}"].shape[2])) for m in MODALITIES)
    return DatasetSchema(name=name, modalities=mods, tasks=tuple(tasks), splits=SPLITS, extra=extra)


def _hand_over(converted: dict[str, dict[str, np.ndarray]]) -> Iterator[SplitItem]:
    """Yield each split and drop this module's reference to it once the store has taken it."""
    for split in list(converted):
        arrays = converted.pop(split)
        yield split, arrays, {}
        del arrays
