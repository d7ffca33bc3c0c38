"""Stand-in UPMC Food-101: ``images/{train,test}/<class>/<file>.jpg``, ``texts/{train,test}_titles.csv``
(records ``image file, text, class``, no header), and the two local HuggingFace encoder folders the
converter reads (layout documented in :mod:`mmrepro.data.food101`).

Images are smooth random colour fields (JPEG), titles random words; 101 classes with the real
train/test counts (67,988 / 22,716) spread evenly over the classes (the per-class counts are not
known here). The encoders are BERT and ViT built from a ``transformers`` config with random weights
and saved with ``save_pretrained``, with a tokenizer (a vocabulary of the titles' words) and an
image processor saved beside them; nothing comes from the hub. Full scale uses the architectures
of ``bert-base-uncased`` and ``vit-base-patch16-224`` (768 wide, 12 layers; 197 ViT tokens), tiny
scale 32-wide one-layer models that keep the token layout (CLS + an 8 x 8 patch grid).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mmrepro.data.food101 import CSV_FILES, RAW_SPLITS
from mmrepro.data.standin.plan import Scale, Written, allocate, choose_counts, folder_bytes
from mmrepro.progress import progress_disabled

CLASSES = 101
REAL = {"train": 67_988, "test": 22_716}
TINY_PER_CLASS = {"train": 6, "test": 2}   # 6: the converter's 10 % validation carve keeps one per class
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS = ("recipe easy best homemade quick healthy classic simple fresh baked grilled roasted fried spicy sweet "
         "sauce cheese chicken beef pork fish rice noodles soup salad cake pie bread cream chocolate lemon garlic "
         "tomato potato egg butter honey vanilla dinner lunch breakfast dessert kitchen blog food how to make with "
         "and the of for a in my our ! - |").split()
#: full scale: the architectures CGGM uses (google-bert/bert-base-uncased, google/vit-base-patch16-224)
FULL_TEXT = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "max_position_embeddings": 512, "vocab_size": 30522}
FULL_IMAGE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
              "image_size": 224, "patch_size": 16}
TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}
TINY_IMAGE = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
              "image_size": 32, "patch_size": 4}
IMAGE_SIDES = {"tiny": (24, 48), "full": (256, 512)}   # random height and width in this range
ASSUMPTIONS = [
    "per-class counts not known here: the real train and test counts spread evenly over 101 classes",
    "class names class_000 .. class_100 (the converter indexes sorted folder names)",
    "images are smooth random colour fields of random size; titles 4 to 16 random words",
    "encoders: random weights in the named architectures (tokenizer vocabulary: the titles' words, padded to "
    "the architecture's size); features are random, their shapes real",
]


# ---------------------------------------------------------------------------------------------
# Writing files


def write_jpeg(path: Path, pixels: np.ndarray, quality: int = 90) -> Path:
    """An RGB ``(H, W, 3)`` uint8 image as JPEG at ``path`` (folders made)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=quality)
    return path


def write_titles(root: Path, rows: Mapping[str, Sequence[Sequence[str]]], header: Sequence[str] | None = None) -> None:
    """``texts/<split>_titles.csv`` per split: records ``(image file, text, class)``, an optional header."""
    for split, records in rows.items():
        file = Path(root) / CSV_FILES[split]
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if header is not None:
                w.writerow(header)
            w.writerows(records)


def save_text_encoder(folder: Path, words: Sequence[str], **config: Any) -> Path:
    """A BERT model with random weights (``BertConfig(**config)``) and a WordPiece tokenizer whose
    vocabulary is the special tokens, ``words`` and ``[unused<i>]`` fillers up to ``vocab_size``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = [*SPECIAL_TOKENS, *dict.fromkeys(words)]
    size = int(config.pop("vocab_size", len(vocab)))
    vocab += [f"[unused{i}]" for i in range(size - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertModel(BertConfig(vocab_size=len(vocab), **config)).save_pretrained(folder)
    BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def save_image_encoder(folder: Path, **config: Any) -> Path:
    """A ViT model with random weights (``ViTConfig(**config)``) and its image processor at that size."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = Path(folder)
    ViTModel(ViTConfig(**config)).save_pretrained(folder)
    side = int(config.get("image_size", ViTConfig().image_size))
    ViTImageProcessor(size={"height": side, "width": side}).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Building content


def random_image(rng: np.random.Generator, sides: tuple[int, int]) -> np.ndarray:
    """A smooth random colour field ``(H, W, 3)`` uint8: a 4 x 4 grid of colours, bilinearly enlarged."""
    from PIL import Image

    h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
    grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BILINEAR))


def random_title(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(4, 17))))


def _bytes_per_pair(rng: np.random.Generator, sides: tuple[int, int], probes: int = 16) -> float:
    """Mean JPEG size of a few images drawn as the stand-in draws them (for the byte budget)."""
    from PIL import Image

    total = 0
    for _ in range(probes):
        buf = io.BytesIO()
        Image.fromarray(random_image(rng, sides)).save(buf, format="JPEG", quality=90)
        total += buf.tell() + 100   # + the CSV record
    return total / probes


def encoder_folder(entry: Mapping[str, Any], param: str, default: str) -> str:
    """Where the stand-in puts an encoder: ``encoders/<the configured folder's name>``."""
    configured = entry.get("params", {}).get(param)
    return f"encoders/{Path(configured).name if configured else default}"


def write_entry(rel: str, entries: list[Mapping[str, Any]], root: Path, scale: Scale,
                rng: np.random.Generator) -> Written:
    """The raw tree at ``root / rel`` and the encoder folders under ``root / encoders``."""
    began = time.perf_counter()
    sides = IMAGE_SIDES[scale.name]
    tiny = {s: n * CLASSES for s, n in TINY_PER_CLASS.items()}
    counts = choose_counts(scale, REAL, tiny, _bytes_per_pair(rng, sides))
    classes = [f"class_{i:03d}" for i in range(CLASSES)]
    rows: dict[str, list[list[str]]] = {}
    with tqdm(total=sum(counts.written.values()), desc=f"stand-in {rel}", unit="image", leave=False,
              disable=True if scale.tiny or not scale.progress else progress_disabled()) as bar:
        for split in RAW_SPLITS:
            rows[split] = []
            for cls, n in zip(classes, allocate(counts.written[split], [1] * CLASSES)):
                for i in range(n):
                    file = f"{cls}_{i}.jpg"
                    write_jpeg(root / rel / "images" / split / cls / file, random_image(rng, sides))
                    rows[split].append([file, random_title(rng), cls])
                    bar.update(1)
    write_titles(root / rel, rows)
    entry = entries[0]
    folders = {"text_encoder": encoder_folder(entry, "text_encoder", "bert-base-uncased"),
               "image_encoder": encoder_folder(entry, "image_encoder", "vit-base-patch16-224")}
    text_cfg, image_cfg = (TINY_TEXT, TINY_IMAGE) if scale.tiny else (FULL_TEXT, FULL_IMAGE)
    save_text_encoder(root / folders["text_encoder"], WORDS, **text_cfg)
    save_image_encoder(root / folders["image_encoder"], **image_cfg)
    grid = image_cfg["image_size"] // image_cfg["patch_size"]
    shapes = {"classes": CLASSES, "image_sides": list(sides),
              "text": {"width": text_cfg["hidden_size"], "max_positions": text_cfg["max_position_embeddings"]},
              "image": {"width": image_cfg["hidden_size"], "tokens": 1 + grid * grid}}
    return Written(rel, counts, shapes, list(ASSUMPTIONS), extra_paths=folders,
                   bytes=folder_bytes(root / rel) + sum(folder_bytes(root / f) for f in folders.values()),
                   seconds=time.perf_counter() - began)
