"""Converter for UPMC Food-101 (image + text, 101 classes): raw pairs -> token features in the store.

:func:`convert_food101` returns ``(schema, splits, provenance)`` ready for
:func:`mmrepro.data.store.write_store`, like the converters of :mod:`mmrepro.data.mmsa`. The image
and text encoders are HuggingFace-format folders on the local disk (``image_encoder``,
``text_encoder``); nothing is ever fetched from the hub.

Raw layout read here
--------------------
::

    <root>/images/{train,test}/<class>/<file>.jpg
    <root>/texts/train_titles.csv
    <root>/texts/test_titles.csv

Each CSV record is ``(image file name, text, class name)``. Parsing uses the ``csv`` module
(quoted fields with commas or line breaks are fine); UTF-8 (a BOM is skipped), falling back to
Latin-1 for a file that is not UTF-8 (recorded). Copies of the data circulate with and without a
header line: a first record is taken as a header when its first field does not name an image file
(``.jpg``/``.jpeg``/``.png``) and its third field is not a class; whether one was found is recorded.
The image of a record is ``images/<split>/<class>/<file>``. The class list is the sorted names of
the folders under ``images/train`` (``classes`` overrides it); the class index is the position in
that list. A sample id is its image path relative to ``images/``, e.g.
``train/apple_pie/apple_pie_0.jpg``, so ids of the carved validation split start with ``train/``.

What was read to confirm the formats (public code, read only; nothing copied)
-----------------------------------------------------------------------------
The official CGGM code (GitHub ``zrguo/CGGM`` at ``d7890a8``: ``datasets/FOODDataset.py``,
``datasets/dataloader.py``, ``src/foodtrain.py``, ``models/foodmodel.py``, ``run/food_run.py``,
``README.md``):

* **It does not read the CSVs.** Its dataset class reads ``train.json`` / ``test.json`` (and knows a
  ``dev.json``) from the data root: a list of records with ``id``, ``text_tokens`` (a list of words,
  joined with spaces before BERT tokenisation), ``img_path`` (relative to the root) and ``label`` (a
  class name). These files come from a preprocessing step that is not in the repository; the
  record layout is the one of the MMBT Food-101 formatting script (``facebookresearch/mmbt``
  ``scripts/food_101.py``, read: it lower-cases the text, replaces punctuation by spaces, and
  carves a stratified 5000-sample ``dev`` split off train, unseeded, from the older ``texts_txt``
  release). So the exact text cleaning and whether CGGM's ``train.json`` excluded a dev split
  **could not be confirmed**; here the raw CSV text goes to the tokenizer unchanged (an uncased
  BERT tokenizer lower-cases and splits punctuation itself).
* **Validation split: CGGM validates on the test split.** Its loader builds the ``valid`` loader
  from ``mode='test'``, and the script reports the best validation accuracy over epochs, i.e. the
  best test accuracy. This converter instead carves a seeded, class-stratified validation split
  off train (``valid_fraction``, ``seed``; the chosen ids are recorded) and keeps test untouched,
  as the study protocol requires (test metrics at the best-validation checkpoint).
* Class index: a fixed alphabetical list of the 101 UPMC class names; that list equals Python's
  ``sorted`` order of the class folder names, which is what is used here.
* Text: ``BertTokenizer`` of ``bert-base-uncased``, special tokens added, padded to and truncated
  at **50 tokens** (``TEXT_MAX_LENGTH``), so ``text_length`` defaults to 50. BERT
  (``google-bert/bert-base-uncased``, per the README) is called with token ids, attention mask
  and segment ids; its ``last_hidden_state`` ``(B, 50, 768)`` is the text input of the fusion
  model, padding positions included (the model uses no mask). Here the lengths are the
  attention-mask sums, so a consumer can choose.
* Image: ``ViTModel`` from ``google/vit-base-patch16-224`` (README); images opened with PIL,
  converted to RGB, and at evaluation resized to **224 x 224** (bilinear) and turned into a tensor
  in [0, 1] - **no mean/std normalisation**. Training adds random flips, colour jitter, random
  grayscale and a Gaussian blur (kernel 21) on the fly. The fusion model gets the full ViT
  ``last_hidden_state`` ``(B, 197, 768)`` (CLS + 14 x 14 patches).
* Both encoders run frozen (``no_grad``) inside the training loop, so CGGM recomputes features
  every epoch; the training-time augmentation therefore changes the image features per epoch.
  Features stored once cannot reproduce that: this converter encodes every split with the
  evaluation transform (recorded as a deviation). ``image_transform="cggm"`` (default) is that
  evaluation transform (PIL bilinear resize to the processor's size, scale to [0, 1], no
  normalisation); ``"processor"`` uses the folder's image processor as configured instead (for
  ViT: the same resize followed by normalisation to [-1, 1], what the checkpoint was trained with).

Third-party readers of the CSVs (public code, read only) name the columns (image file, text,
class) and pass no header; one of them also drops a first row named like a header, which is why
header detection is done here. The published counts are 67,988 train and 22,716 test pairs
(90,704); those numbers were not re-checked against code.

Features
--------
* ``x/text`` ``(N, text_length, D_text)``: the text encoder's last hidden states; ``len/text`` =
  attention-mask sums (padding after the valid tokens). Texts longer than ``text_length`` tokens
  are truncated, as in CGGM; the count per split is recorded.
* ``x/image`` ``(N, K, D_image)``: the image encoder's token outputs reduced to ``image_tokens`` =
  K tokens: the leading non-patch tokens (ViT: CLS) kept as they are, followed by the patch grid
  average-pooled (adaptive average pooling) to ``g x g`` in row-major order, where
  ``K = prefix + g**2``. ``image_tokens=None`` keeps every token (ViT-B/16 at 224: 197, as CGGM).
  A 4-D output ``(B, C, H, W)`` (ResNet-style) is read as an ``H x W`` grid of ``C``-dim tokens
  with no prefix. ``len/image`` = K for every sample.
* ``y/label`` int64 class index; ``ids`` as above.
* Modality order is ``image``, ``text`` (CGGM's order: the fusion model takes ``(v, t)`` and its
  unimodal classifiers are indexed vision 0, text 1).

Storage (``dtype="float16"``, 2 bytes per value; the loader casts to float32). With BERT-base and
ViT-B (768-d) and the defaults (50 text tokens, ``image_tokens=50`` = CLS + 7 x 7 pooled patches)
one pair takes (50 + 50) x 768 x 2 = 153,600 bytes, so the 90,704 pairs take about **13.9 GB**
(13.0 GiB). Keeping all 197 image tokens: (50 + 197) x 768 x 2 = 379,392 bytes a pair, about
**34.4 GB**. ``float32`` doubles either. :func:`estimate_store_bytes` computes it; the estimate is
recorded, and the free space of the scratch folder is checked against it before encoding.

Procedure and guarantees
------------------------
1. Parameters and encoder folders are checked (missing param, folder or file ->
   :class:`EncoderFolderError`, a :class:`DataValidationError` naming the parameter, the folder,
   the files expected and how to prepare such a folder with ``save_pretrained``). Models are
   loaded with ``local_files_only=True``; one blank image is passed through the image encoder to
   learn its token grid, so a bad ``image_tokens`` fails here.
2. Both CSVs and every image are validated before anything is encoded: missing CSV, malformed
   record, unknown class, empty text (``empty_text="error"``), duplicate id, missing image file and
   an image PIL cannot fully decode (``verify_images=True``: ``verify()`` then a full ``load()``
   with truncated images refused) all raise :class:`DataValidationError` naming the file, the split
   and the CSV row; the message counts every problem found and lists the first few.
3. Each split is encoded in batches (``batch_size``) under ``torch.inference_mode`` with a tqdm
   bar, into ``numpy.lib.format.open_memmap`` arrays in a scratch folder (a fresh
   ``.food101-scratch-*`` folder inside ``scratch``, default: beside the raw root), so no split is
   held in RAM. After a split is written its arrays are reopened read-only and the scratch
   folder is deleted as soon as every split is done (the open memory maps keep the data readable
   until :func:`write_store` has copied it; POSIX semantics). On any failure the scratch folder
   is removed before the error propagates, so nothing half-written remains.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import hashlib
import json
import math
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmrepro.data import LOADER_MODALITIES
from mmrepro.data.schema import DataValidationError, DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.data.store import remove_stale, sha256_file, work_folder
from mmrepro.progress import progress_disabled

SPLITS = ("train", "valid", "test")
RAW_SPLITS = ("train", "test")
MODALITIES = LOADER_MODALITIES["food101"]
TASK = "label"
IMAGE_TRANSFORMS = ("cggm", "processor")
DTYPES = {"float16": np.float16, "float32": np.float32}
EMPTY_TEXT = ("error", "keep")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CSV_FILES = {"train": "texts/train_titles.csv", "test": "texts/test_titles.csv"}
#: Published number of UPMC Food-101 pairs (train + test), for the storage estimate.
UPMC_PAIRS = 90_704

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model")
PROCESSOR_FILES = ("preprocessor_config.json",)

SplitItem = tuple[str, dict[str, np.ndarray], dict[str, Any]]
Converted = tuple[DatasetSchema, Iterator[SplitItem], dict[str, Any]]

_MAX_LISTED = 5  # problems spelled out in one validation error


class EncoderFolderError(DataValidationError):
    """A local encoder folder is not given, missing, or lacks files (``key`` = the parameter)."""


@dataclass(frozen=True)
class _Record:
    id: str          # image path relative to images/
    image: Path
    text: str
    cls: str
    row: int         # 1-based record number in the CSV (the header, if any, is record 1)


# ---------------------------------------------------------------------------------------------
# Public API


def estimate_store_bytes(n_pairs: int = UPMC_PAIRS, *, text_length: int = 50, image_tokens: int = 50,
                         text_dim: int = 768, image_dim: int = 768, dtype: str = "float16") -> int:
    """Bytes of the feature arrays of ``n_pairs`` pairs (lengths, labels and ids are negligible)."""
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    return int(n_pairs) * (int(text_length) * int(text_dim) + int(image_tokens) * int(image_dim)) * itemsize


def convert_food101(path: Path | str, *, name: str, text_encoder: str | Path | None = None,
                    image_encoder: str | Path | None = None, text_length: int = 50,
                    image_tokens: int | None = 50, image_transform: str = "cggm",
                    valid_fraction: float = 0.1, seed: int = 0, dtype: str = "float16",
                    batch_size: int = 64, scratch: str | Path | None = None, device: str = "auto",
                    classes: Sequence[str] | None = None, empty_text: str = "error",
                    verify_images: bool = True, workers: int = 1, progress: bool = True) -> Converted:
    """Convert a raw UPMC Food-101 tree at ``path`` into ``image``/``text`` token features.

    ``text_encoder`` / ``image_encoder``: local HuggingFace folders (e.g. saved
    ``bert-base-uncased`` and ``vit-base-patch16-224``). ``text_length``: tokens kept per text
    (CGGM: 50). ``image_tokens``: tokens kept per image (prefix + g*g pooled patches; None: all).
    ``image_transform``: ``"cggm"`` (resize, [0, 1], no normalisation) or ``"processor"``.
    ``valid_fraction`` of each class of train goes to ``valid``, chosen with ``seed``.
    ``dtype``: ``"float16"`` or ``"float32"`` storage. ``scratch``: folder for the temporary
    memory maps (default: the raw root's parent). ``device``: ``"auto"``, ``"cpu"``, ``"cuda"``...
    ``classes``: the class list (default: sorted folder names of ``images/train``).
    ``empty_text``: ``"error"`` or ``"keep"`` (encoded as special tokens only, counted).
    ``verify_images``: fully decode every image before encoding. ``workers``: threads that decode
    images. ``progress``: tqdm bars (shown when stderr is a terminal).
    """
    root = Path(path)
    params = {"text_encoder": None if text_encoder is None else str(text_encoder),
              "image_encoder": None if image_encoder is None else str(image_encoder),
              "text_length": text_length, "image_tokens": image_tokens, "image_transform": image_transform,
              "valid_fraction": valid_fraction, "seed": seed, "dtype": dtype, "batch_size": batch_size,
              "scratch": None if scratch is None else str(scratch), "device": device,
              "classes": None if classes is None else list(classes), "empty_text": empty_text,
              "verify_images": verify_images, "workers": workers}
    _check_params(text_length=text_length, image_tokens=image_tokens, image_transform=image_transform,
                  valid_fraction=valid_fraction, dtype=dtype, batch_size=batch_size, empty_text=empty_text,
                  workers=workers)
    text_dir = _check_folder("text_encoder", text_encoder, kind="text",
                             needed={"config": ("config.json",), "weights": WEIGHT_FILES,
                                     "tokenizer": TOKENIZER_FILES})
    image_dir = _check_folder("image_encoder", image_encoder, kind="image",
                              needed={"config": ("config.json",), "weights": WEIGHT_FILES,
                                      "image processor": PROCESSOR_FILES})
    if not root.is_dir():
        raise DataValidationError("raw Food-101 root not found (expected a folder holding images/ and texts/)",
                                  file=str(root))

    # 1. encoders (loaded, probed; no data touched yet)
    enc = _Encoders.load(text_dir, image_dir, device=device, image_transform=image_transform)
    enc.check_text_length(text_length)
    prefix, grid, image_dim = enc.probe_image()
    keep_tokens, pooled_side = _image_token_plan(image_tokens, prefix, grid)

    # 2. raw data, validated in full before any encoding
    class_list, class_source = _class_list(root, classes)
    provenance: dict[str, Any] = {
        "dataset": name, "source": str(root), "format": "upmc_food101",
        "converter": "mmrepro.data.food101.convert_food101", "params": params,
        "classes": class_list, "class_source": class_source, "csv": {}, "counts": {},
    }
    records: dict[str, list[_Record]] = {}
    for split in RAW_SPLITS:
        records[split] = _read_split(root, split, class_list, empty_text=empty_text, provenance=provenance)
    _check_images([r for split in RAW_SPLITS for r in records[split]], verify=verify_images, workers=workers,
                  progress=progress)
    train, valid = _carve_valid(records.pop("train"), valid_fraction=valid_fraction, seed=seed)
    split_records = {"train": train, "valid": valid, "test": records.pop("test")}
    provenance["counts"] = {s: len(v) for s, v in split_records.items()}
    provenance["valid_split"] = {
        "method": "stratified by class: per class (sorted), numpy default_rng(seed).permutation of its train "
                  "rows in CSV order; the first round(n_class * valid_fraction) go to valid",
        "seed": int(seed), "valid_fraction": float(valid_fraction), "carved_from": "train",
        "ids": [r.id for r in valid],
        "ids_sha256": hashlib.sha256("\n".join(sorted(r.id for r in valid)).encode()).hexdigest(),
        "cggm_official": "CGGM validates on the test split (its valid loader reads mode='test'); not reproduced",
    }

    # 3. encoding into scratch memory maps
    n_total = sum(len(v) for v in split_records.values())
    n_image_tokens = keep_tokens
    need = estimate_store_bytes(n_total, text_length=text_length, image_tokens=n_image_tokens,
                                text_dim=enc.text_dim, image_dim=image_dim, dtype=dtype)
    provenance["storage"] = {
        "bytes_per_pair": need // max(n_total, 1), "feature_bytes": need,
        "upmc_full_estimate_bytes": estimate_store_bytes(text_length=text_length, image_tokens=n_image_tokens,
                                                         text_dim=enc.text_dim, image_dim=image_dim, dtype=dtype),
        "dtype": dtype,
    }
    provenance["encoders"] = enc.describe()
    provenance["features"] = {
        "text": f"last_hidden_state of the text encoder, {text_length} tokens (special tokens added, padded "
                "to max_length, truncated); lengths = attention-mask sums",
        "image": (f"token outputs of the image encoder: {prefix} leading token(s) kept, then the {grid}x{grid} "
                  f"patch grid " + (f"average-pooled to {pooled_side}x{pooled_side} (row-major)"
                                    if pooled_side != grid else "kept whole")
                  + f"; {n_image_tokens} tokens, all valid"),
        "image_transform": enc.transform_description(),
        "deviations_from_cggm": [
            "features are computed once with the evaluation transform; CGGM recomputes them every epoch "
            "and applies flip / colour jitter / grayscale / Gaussian blur to training images",
            "validation is carved from train; CGGM validates on test",
            "raw CSV text is tokenized as is; CGGM tokenizes pre-tokenized text from JSON files whose cleaning "
            "is not public",
        ] + ([] if image_tokens is None or pooled_side == grid else
             [f"image tokens reduced from {prefix + grid * grid} to {n_image_tokens} by average pooling"]),
    }
    parent = Path(scratch) if scratch is not None else root.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise OSError(f"scratch folder {parent} has {free / 1e9:.2f} GB free; the features need about "
                      f"{need / 1e9:.2f} GB there (and as much again for the store). Set the 'scratch' param "
                      "to a folder with more space, or lower image_tokens / use dtype='float16'")
    remove_stale(parent, f"food101-scratch-{name}")
    scratch_dir = work_folder(parent, f"food101-scratch-{name}")
    converted: dict[str, dict[str, np.ndarray]] = {}
    try:
        truncated: dict[str, int] = {}
        for split in SPLITS:
            converted[split] = _encode_split(
                split, split_records[split], enc, class_list, scratch_dir=scratch_dir, text_length=text_length,
                prefix=prefix, grid=grid, pooled_side=pooled_side, np_dtype=DTYPES[dtype], batch_size=batch_size,
                workers=workers, progress=progress, truncated=truncated)
        provenance["text_truncated"] = truncated
    except BaseException:
        converted.clear()
        shutil.rmtree(scratch_dir, ignore_errors=True)
        raise
    _remove_scratch(scratch_dir)
    provenance["scratch"] = str(scratch_dir)
    schema = DatasetSchema(
        name=name,
        modalities=(ModalitySpec("image", n_image_tokens, image_dim), ModalitySpec("text", text_length, enc.text_dim)),
        tasks=(TaskSpec(TASK, "classification", num_classes=len(class_list)),),
        splits=SPLITS,
        extra={"source_format": "upmc_food101", "classes": class_list, "feature_dtype": dtype,
               "image_tokens": {"prefix": prefix, "grid": grid, "pooled_grid": pooled_side}},
    )
    return schema, _hand_over(converted), provenance


# ---------------------------------------------------------------------------------------------
# Parameters and encoder folders


def _check_params(*, text_length: int, image_tokens: int | None, image_transform: str, valid_fraction: float,
                  dtype: str, batch_size: int, empty_text: str, workers: int) -> None:
    if not isinstance(text_length, int) or isinstance(text_length, bool) or text_length < 2:
        raise ValueError(f"text_length must be an integer >= 2 (room for [CLS] and [SEP]), got {text_length!r}")
    if image_tokens is not None and (not isinstance(image_tokens, int) or isinstance(image_tokens, bool)
                                     or image_tokens < 1):
        raise ValueError(f"image_tokens must be a positive integer or None (all tokens), got {image_tokens!r}")
    if image_transform not in IMAGE_TRANSFORMS:
        raise ValueError(f"image_transform must be one of {IMAGE_TRANSFORMS}, got {image_transform!r}")
    if not 0.0 < float(valid_fraction) < 1.0:
        raise ValueError(f"valid_fraction must lie strictly between 0 and 1, got {valid_fraction!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if empty_text not in EMPTY_TEXT:
        raise ValueError(f"empty_text must be one of {EMPTY_TEXT}, got {empty_text!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")


_HINTS = {
    "text": ("on a machine with internet: python -c \"from transformers import AutoModel, AutoTokenizer; "
             "n='google-bert/bert-base-uncased'; AutoModel.from_pretrained(n).save_pretrained('DIR'); "
             "AutoTokenizer.from_pretrained(n).save_pretrained('DIR')\", then copy DIR here"),
    "image": ("on a machine with internet: python -c \"from transformers import AutoModel, AutoImageProcessor; "
              "n='google/vit-base-patch16-224'; AutoModel.from_pretrained(n).save_pretrained('DIR'); "
              "AutoImageProcessor.from_pretrained(n).save_pretrained('DIR')\", then copy DIR here"),
}


def _expected(needed: dict[str, tuple[str, ...]]) -> str:
    return "; ".join(f"{what}: {' or '.join(files)}" for what, files in needed.items())


def _check_folder(param: str, folder: str | Path | None, *, kind: str,
                  needed: dict[str, tuple[str, ...]]) -> Path:
    """The folder of ``param`` with every needed file group present, or an :class:`EncoderFolderError`."""
    hint = f"Prepare one {_HINTS[kind]}."
    if folder is None or str(folder) == "":
        raise EncoderFolderError(f"no {kind} encoder given: set the '{param}' param to a local HuggingFace model "
                                 f"folder holding {_expected(needed)}. Weights are never downloaded. {hint}",
                                 key=param)
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise EncoderFolderError(f"{kind} encoder folder not found (expected a local HuggingFace model folder "
                                 f"holding {_expected(needed)}). {hint}", file=str(p), key=param)
    missing = {what: files for what, files in needed.items() if not any((p / f).is_file() for f in files)}
    if missing:
        present = sorted(x.name for x in p.iterdir())[:20]
        raise EncoderFolderError(f"{kind} encoder folder lacks {_expected(missing)} (it holds {present}). {hint}",
                                 file=str(p), key=param)
    return p


class _Encoders:
    """The two frozen encoders, their tokenizer / image processor, and the image transform."""

    def __init__(self, **kw: Any):
        self.__dict__.update(kw)

    @classmethod
    def load(cls, text_dir: Path, image_dir: Path, *, device: str, image_transform: str) -> "_Encoders":
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kw = {"local_files_only": True, "trust_remote_code": False}

        def load_one(param: str, folder: Path, kind: str, fn, what: str):
            try:
                return fn(str(folder), **kw)
            except Exception as e:  # noqa: BLE001 - any loading failure means the folder is unusable
                raise EncoderFolderError(f"cannot load the {what} from the {kind} encoder folder "
                                         f"({type(e).__name__}: {e}). Prepare one {_HINTS[kind]}.",
                                         file=str(folder), key=param) from e

        tokenizer = load_one("text_encoder", text_dir, "text", AutoTokenizer.from_pretrained, "tokenizer")
        text_model = load_one("text_encoder", text_dir, "text", AutoModel.from_pretrained, "model")
        processor = load_one("image_encoder", image_dir, "image", AutoImageProcessor.from_pretrained,
                             "image processor")
        image_model = load_one("image_encoder", image_dir, "image", AutoModel.from_pretrained, "model")
        text_model.eval().to(device)
        image_model.eval().to(device)
        proc_cfg = json.loads((image_dir / "preprocessor_config.json").read_text())
        enc = cls(tokenizer=tokenizer, text_model=text_model, processor=processor, image_model=image_model,
                  device=torch.device(device), text_dir=text_dir, image_dir=image_dir,
                  image_transform=image_transform, image_size=_image_size(proc_cfg, image_model.config, image_dir))
        enc.text_dim = int(getattr(text_model.config, "hidden_size", 0)) or enc._probe_text_dim()
        return enc

    # -- text
    def check_text_length(self, text_length: int) -> None:
        limit = getattr(self.text_model.config, "max_position_embeddings", None)
        if limit is not None and text_length > int(limit):
            raise ValueError(f"text_length={text_length} exceeds the text encoder's max_position_embeddings "
                             f"({limit}) in {self.text_dir}")

    def _probe_text_dim(self) -> int:
        return int(self.encode_text(["a"], 4)[0].shape[-1])

    def tokenize(self, texts: list[str], text_length: int):
        return self.tokenizer(texts, add_special_tokens=True, padding="max_length", max_length=text_length,
                              truncation=True, return_tensors="pt")

    def full_lengths(self, texts: list[str]) -> list[int]:
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]

    def encode_text(self, texts: list[str], text_length: int):
        import torch

        batch = self.tokenize(texts, text_length)
        with torch.inference_mode():
            out = self.text_model(**{k: v.to(self.device) for k, v in batch.items()})
        hidden = _last_hidden(out, "text_encoder", self.text_dir)
        return hidden, batch["attention_mask"].sum(dim=1)

    # -- image
    def pixels(self, images: list) -> Any:
        import torch

        if self.image_transform == "processor":
            return self.processor(images=images, return_tensors="pt")["pixel_values"]
        h, w = self.image_size
        arrays = [np.asarray(im.convert("RGB").resize((w, h), _bilinear()), dtype=np.float32) / np.float32(255.0)
                  for im in images]
        return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())

    def encode_images(self, images: list):
        import torch

        pv = self.pixels(images).to(self.device)
        with torch.inference_mode():
            out = self.image_model(pixel_values=pv)
        return _last_hidden(out, "image_encoder", self.image_dir, image=True)

    def probe_image(self) -> tuple[int, int, int]:
        """(prefix tokens, grid side, dim) of the image encoder's output, from one blank image."""
        from PIL import Image

        h, w = self.image_size
        hidden = self.encode_images([Image.new("RGB", (w, h))])
        if hidden.dim() == 4:
            if hidden.shape[2] != hidden.shape[3]:
                raise ValueError(f"image encoder in {self.image_dir} gives a {hidden.shape[2]}x{hidden.shape[3]} "
                                 "feature map; only square grids are supported")
            return 0, int(hidden.shape[2]), int(hidden.shape[1])
        n, dim = int(hidden.shape[1]), int(hidden.shape[2])
        cfg = self.image_model.config
        grid = None
        size, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
        if isinstance(size, int) and isinstance(patch, int) and patch > 0 and (size // patch) ** 2 <= n:
            grid = size // patch
        if grid is None:
            grid = math.isqrt(n)
        return n - grid * grid, grid, dim

    def transform_description(self) -> str:
        h, w = self.image_size
        if self.image_transform == "cggm":
            return (f"cggm: PIL convert('RGB'), bilinear resize to {h}x{w}, scale to [0, 1], no normalisation "
                    "(CGGM's evaluation transform)")
        return f"processor: {type(self.processor).__name__} from {self.image_dir} as configured"

    def describe(self) -> dict[str, Any]:
        def one(folder: Path, model: Any, extra: dict[str, Any]) -> dict[str, Any]:
            weights = [f for f in WEIGHT_FILES if (folder / f).is_file()]
            return {"folder": str(folder.resolve()), "model_class": type(model).__name__,
                    "model_type": getattr(model.config, "model_type", None),
                    "name_or_path": getattr(model.config, "_name_or_path", None),
                    "config_sha256": sha256_file(folder / "config.json"),
                    "weights": {f: sha256_file(folder / f) for f in weights}, **extra}
        return {"text": one(self.text_dir, self.text_model, {"tokenizer_class": type(self.tokenizer).__name__,
                                                             "hidden_size": self.text_dim}),
                "image": one(self.image_dir, self.image_model,
                             {"processor_class": type(self.processor).__name__, "image_size": list(self.image_size),
                              "transform": self.image_transform}),
                "device": str(self.device)}


def _bilinear():
    from PIL import Image

    return Image.Resampling.BILINEAR


def _image_size(proc_cfg: dict[str, Any], model_cfg: Any, folder: Path) -> tuple[int, int]:
    """(height, width) the image is resized to: the processor config's size, else the model's image_size."""
    size = proc_cfg.get("size")
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    if isinstance(size, int):
        return size, size
    s = getattr(model_cfg, "image_size", None)
    if isinstance(s, int):
        return s, s
    if isinstance(s, (list, tuple)) and len(s) == 2:
        return int(s[0]), int(s[1])
    raise EncoderFolderError("cannot tell the input image size (no size in preprocessor_config.json, no "
                             "image_size in config.json)", file=str(folder), key="image_encoder")


def _last_hidden(out: Any, param: str, folder: Path, image: bool = False):
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise EncoderFolderError("the model gives no last_hidden_state (expected a base encoder such as BertModel "
                                 "or ViTModel)", file=str(folder), key=param)
    if hidden.dim() != 3 and not (image and hidden.dim() == 4):
        raise EncoderFolderError(f"last_hidden_state has shape {tuple(hidden.shape)}; expected (B, T, D)"
                                 + (" or (B, C, H, W)" if image else ""), file=str(folder), key=param)
    return hidden


def _image_token_plan(image_tokens: int | None, prefix: int, grid: int) -> tuple[int, int]:
    """(tokens kept, pooled grid side) for ``image_tokens`` given the encoder's prefix and grid."""
    full = prefix + grid * grid
    if image_tokens is None or image_tokens == full:
        return full, grid
    side = math.isqrt(max(image_tokens - prefix, 0))
    if image_tokens - prefix < 1 or side * side != image_tokens - prefix or side > grid:
        valid = [prefix + g * g for g in range(1, grid + 1)]
        raise ValueError(f"image_tokens={image_tokens} does not fit the image encoder ({prefix} leading token(s) "
                         f"+ a {grid}x{grid} patch grid): it must be {prefix} + g*g with 1 <= g <= {grid}, i.e. "
                         f"one of {valid}, or None for all {full}")
    return image_tokens, side


# ---------------------------------------------------------------------------------------------
# Raw data


def _class_list(root: Path, classes: Sequence[str] | None) -> tuple[list[str], str]:
    if classes is not None:
        out = [str(c) for c in classes]
        if not out or len(set(out)) != len(out):
            raise ValueError("classes must be a non-empty list of distinct names")
        return out, "the 'classes' param (index = position in it)"
    folder = root / "images" / "train"
    if not folder.is_dir():
        raise DataValidationError("image folder not found (expected images/train/<class>/<file>.jpg)",
                                  file=str(folder), split="train")
    out = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not out:
        raise DataValidationError("no class folders found (expected images/train/<class>/)", file=str(folder),
                                  split="train")
    return out, "sorted folder names of images/train (index = position; CGGM's list is in the same order)"


def _read_csv(file: Path, split: str) -> tuple[list[list[str]], str]:
    if not file.is_file():
        raise DataValidationError(f"CSV not found (expected {CSV_FILES[split]} with records (image file, text, class))",
                                  file=str(file), split=split)
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            with open(file, newline="", encoding=encoding) as f:
                return list(csv.reader(f)), encoding
        except UnicodeDecodeError:
            continue
        except csv.Error as e:
            raise DataValidationError(f"malformed CSV ({e})", file=str(file), split=split) from e
    raise AssertionError("latin-1 decodes every byte")  # pragma: no cover


class _Problems:
    """Collects validation problems; raises one error naming the first and counting the rest."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str, str]] = []

    def add(self, message: str, *, file: str, split: str, key: str) -> None:
        self.items.append((message, file, split, key))

    def raise_if_any(self, what: str) -> None:
        if not self.items:
            return
        message, file, split, key = self.items[0]
        if len(self.items) > 1:
            listed = "; ".join(f"[{s} {k}] {m}" for m, _, s, k in self.items[1:_MAX_LISTED])
            more = len(self.items) - _MAX_LISTED
            message += (f" ({len(self.items)} {what} problems in all; next: {listed}"
                        + (f"; and {more} more" if more > 0 else "") + ")")
        raise DataValidationError(message, file=file, split=split, key=key)


def _is_header(rec: list[str], class_set: set[str]) -> bool:
    return (len(rec) >= 3 and not rec[0].strip().lower().endswith(IMAGE_SUFFIXES)
            and rec[2].strip() not in class_set)


def _read_split(root: Path, split: str, class_list: list[str], *, empty_text: str,
                provenance: dict[str, Any]) -> list[_Record]:
    file = root / CSV_FILES[split]
    rows, encoding = _read_csv(file, split)
    class_set = set(class_list)
    header = rows[0] if rows and _is_header(rows[0], class_set) else None
    start = 1 if header is not None else 0
    problems = _Problems()
    records: list[_Record] = []
    seen: dict[str, int] = {}
    empty = 0
    for i in range(start, len(rows)):
        rec, rownum = rows[i], i + 1
        if not rec or all(not f.strip() for f in rec):
            continue  # blank line
        if len(rec) != 3:
            problems.add(f"expected 3 fields (image file, text, class), found {len(rec)}: {rec[:4]}",
                         file=str(file), split=split, key=f"row {rownum}")
            continue
        image, text, cls = rec[0].strip(), rec[1], rec[2].strip()
        key = f"row {rownum} ({image})"
        if cls not in class_set:
            shown = class_list[:5] + (["..."] if len(class_list) > 5 else [])
            problems.add(f"unknown class {cls!r} (expected one of the {len(class_list)} classes {shown})",
                         file=str(file), split=split, key=key)
            continue
        if not image:
            problems.add("empty image file name", file=str(file), split=split, key=f"row {rownum}")
            continue
        rel = Path(image) if ("/" in image or "\\" in image) else Path(cls) / image
        sid = (Path(split) / rel).as_posix()
        if sid in seen:
            problems.add(f"duplicate id {sid!r} (also row {seen[sid]})", file=str(file), split=split, key=key)
            continue
        seen[sid] = rownum
        if not text.strip():
            if empty_text == "error":
                problems.add("empty text (expected a title; empty_text='keep' encodes it as special tokens only)",
                             file=str(file), split=split, key=key)
                continue
            empty += 1
        records.append(_Record(id=sid, image=root / "images" / split / rel, text=text, cls=cls, row=rownum))
    if not records and not problems.items:
        problems.add("no records (expected rows of (image file, text, class))", file=str(file), split=split,
                     key="row 1")
    problems.raise_if_any("CSV")
    provenance["csv"][split] = {"file": str(file), "sha256": sha256_file(file), "encoding": encoding,
                                "header": header, "records": len(records), "empty_text_kept": empty,
                                "columns": ["image file", "text", "class"]}
    return records


@contextlib.contextmanager
def _strict_truncation():
    """Make PIL refuse truncated images (some libraries switch LOAD_TRUNCATED_IMAGES on globally)."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _image_problem(rec: _Record, verify: bool) -> str | None:
    from PIL import Image

    if not rec.image.is_file():
        return "image file not found"
    if not verify:
        return None if rec.image.stat().st_size > 0 else "image file is empty"
    try:
        with Image.open(rec.image) as im:
            im.verify()
        with Image.open(rec.image) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return f"unreadable image ({type(e).__name__}: {e})"
    return None


def _check_images(records: list[_Record], *, verify: bool, workers: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    problems = _Problems()
    with _strict_truncation(), ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda r: _image_problem(r, verify), records)
        for rec, problem in tqdm(zip(records, results), total=len(records), desc="food101 check images",
                                 disable=progress_disabled() if progress else True, leave=False):
            if problem:
                split = rec.id.split("/", 1)[0]
                problems.add(problem, file=str(rec.image), split=split,
                             key=f"row {rec.row} of {CSV_FILES[split]} ({rec.id})")
    problems.raise_if_any("image")


def _carve_valid(records: list[_Record], *, valid_fraction: float, seed: int) -> tuple[list[_Record], list[_Record]]:
    """Class-stratified seeded split of train; both parts keep CSV order."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_class.setdefault(r.cls, []).append(i)
    chosen: set[int] = set()
    for cls in sorted(by_class):
        rows = by_class[cls]
        k = int(round(len(rows) * float(valid_fraction)))
        chosen.update(rows[j] for j in rng.permutation(len(rows))[:k])
    train = [r for i, r in enumerate(records) if i not in chosen]
    valid = [r for i, r in enumerate(records) if i in chosen]
    if not valid:
        raise DataValidationError(f"valid_fraction={valid_fraction} selects no training sample (classes have "
                                  f"{min(map(len, by_class.values()))}-{max(map(len, by_class.values()))} rows)",
                                  file=CSV_FILES["train"], split="valid")
    return train, valid


# ---------------------------------------------------------------------------------------------
# Encoding


def _open_image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _reduce_image(hidden, prefix: int, grid: int, pooled_side: int):
    """(B, T, D) or (B, C, H, W) -> (B, prefix + pooled_side**2, D): prefix kept, patch grid pooled."""
    import torch
    import torch.nn.functional as F

    if hidden.dim() == 4:
        head, fmap = hidden.new_zeros((hidden.shape[0], 0, hidden.shape[1])), hidden
    else:
        b, _, d = hidden.shape
        head = hidden[:, :prefix]
        fmap = hidden[:, prefix:].reshape(b, grid, grid, d).permute(0, 3, 1, 2)
    if pooled_side != grid:
        fmap = F.adaptive_avg_pool2d(fmap, pooled_side)
    patches = fmap.flatten(2).transpose(1, 2)
    return torch.cat([head, patches], dim=1)


def _encode_split(split: str, records: list[_Record], enc: _Encoders, class_list: list[str], *, scratch_dir: Path,
                  text_length: int, prefix: int, grid: int, pooled_side: int, np_dtype: Any, batch_size: int,
                  workers: int, progress: bool, truncated: dict[str, int]) -> dict[str, np.ndarray]:
    from numpy.lib.format import open_memmap
    from tqdm.auto import tqdm

    n = len(records)
    k_image = prefix + pooled_side * pooled_side
    files = {"x/text": scratch_dir / f"{split}.text.npy", "x/image": scratch_dir / f"{split}.image.npy"}
    x_text = open_memmap(files["x/text"], mode="w+", dtype=np_dtype, shape=(n, text_length, enc.text_dim))
    x_image = None
    len_text = np.zeros(n, dtype=np.int64)
    index = {c: i for i, c in enumerate(class_list)}
    n_trunc = 0
    with _strict_truncation(), ThreadPoolExecutor(max_workers=workers) as pool:
        for start in tqdm(range(0, n, batch_size), total=(n + batch_size - 1) // batch_size,
                          desc=f"food101 encode {split}", disable=progress_disabled() if progress else True, unit="batch"):
            batch = records[start:start + batch_size]
            stop = start + len(batch)
            texts = [r.text for r in batch]
            n_trunc += sum(1 for length in enc.full_lengths(texts) if length > text_length)
            hidden, lengths = enc.encode_text(texts, text_length)
            x_text[start:stop] = _to_numpy(hidden, np_dtype, split=split, key="x/text", ids=[r.id for r in batch])
            len_text[start:stop] = lengths.cpu().numpy()
            images = list(pool.map(lambda r: _open_image(r.image), batch))
            tokens = _reduce_image(enc.encode_images(images), prefix, grid, pooled_side)
            if x_image is None:
                x_image = open_memmap(files["x/image"], mode="w+", dtype=np_dtype,
                                      shape=(n, k_image, int(tokens.shape[-1])))
            x_image[start:stop] = _to_numpy(tokens, np_dtype, split=split, key="x/image", ids=[r.id for r in batch])
    if x_image is None:  # an empty split
        x_image = open_memmap(files["x/image"], mode="w+", dtype=np_dtype, shape=(0, k_image, 1))
    truncated[split] = n_trunc
    for a in (x_text, x_image):
        a.flush()
    del x_text, x_image
    out = {key: np.load(f, mmap_mode="r") for key, f in files.items()}
    out["len/text"] = len_text
    out["len/image"] = np.full(n, k_image, dtype=np.int64)
    out[f"y/{TASK}"] = np.array([index[r.cls] for r in records], dtype=np.int64)
    out["ids"] = np.array([r.id for r in records], dtype=str) if n else np.array([], dtype="<U1")
    return out


def _to_numpy(t, np_dtype: Any, *, split: str, key: str, ids: list[str]) -> np.ndarray:
    a = t.detach().float().cpu().numpy().astype(np_dtype)
    bad = ~np.isfinite(a)
    if bad.any():
        rows = sorted({ids[i] for i in np.flatnonzero(bad.reshape(len(a), -1).any(axis=1))})
        raise DataValidationError(f"{int(bad.sum())} non-finite value(s) after casting to {np.dtype(np_dtype)} "
                                  f"(samples {rows[:3]}); use dtype='float32' if float16 overflows",
                                  split=split, key=key)
    return a


def _remove_scratch(scratch_dir: Path) -> None:
    """Delete the scratch files now; the open read-only maps keep their data until dropped (POSIX).

    Where the OS refuses (files still mapped on Windows), deletion is retried at interpreter exit.
    """
    shutil.rmtree(scratch_dir, ignore_errors=True)
    if scratch_dir.exists():
        atexit.register(shutil.rmtree, scratch_dir, True)


def _hand_over(converted: dict[str, dict[str, np.ndarray]]) -> Iterator[SplitItem]:
    """Yield each split and drop this module's reference to it once the store has taken it."""
    for split in list(converted):
        arrays = converted.pop(split)
        yield split, arrays, {}
        del arrays


__all__ = ["convert_food101", "estimate_store_bytes", "EncoderFolderError", "UPMC_PAIRS"]
