"""Batches in the data contract, read straight from a store split's memory-mapped arrays.

A :class:`Batch` holds, per modality, features ``(B, T_m, D_m)`` and lengths ``(B,)``, the
``present`` mask ``(B, M)``, the labels ``y`` of one task and the rows ``index`` into the split.
An array modality (image or volume, schema ``shape``) comes as float32 ``(B, *shape)``, channel
axis first as stored (a single-channel volume: ``(B, 1, D, H, W)``), and has no entry in
``lengths``, which holds only the sequence modalities read. Labels: float32 ``(B,)``
(regression), int64 ``(B,)`` (classification), int64 ``(B, *shape)`` (segmentation).
Each batch copies only its own rows out of the memory map, so an epoch never copies a whole
split, and the shuffle order depends only on ``(seed, epoch)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from mmrepro.data.schema import DatasetSchema


@dataclass
class Batch:
    x: dict[str, torch.Tensor]
    lengths: dict[str, torch.Tensor]
    present: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor

    def to(self, device: torch.device | str, pin: bool = False) -> "Batch":
        """The batch on ``device``; ``pin`` (CUDA only) copies through page-locked memory, asynchronously,
        so the host can prepare the next batch while the copy and the GPU's work run."""
        pin = pin and torch.device(device).type == "cuda"

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None else (t.pin_memory() if pin else t).to(device, non_blocking=pin)

        return replace(self, x={k: move(v) for k, v in self.x.items()},
                       lengths={k: move(v) for k, v in self.lengths.items()},
                       present=move(self.present), y=move(self.y), index=move(self.index))

    def __len__(self) -> int:
        return len(self.index)


class SplitLoader:
    """Iterates over one split in batches; ``present`` and ``transform`` come from the data setting.

    ``present`` (one column per dataset modality) defaults to the store's own mask or all-present;
    a callable ``present(epoch)`` gives a fresh mask per epoch (missing patterns redrawn each epoch).
    """

    def __init__(self, arrays: dict[str, np.ndarray], schema: DatasetSchema, task: str, *,
                 batch_size: int, shuffle: bool, seed: int,
                 present: np.ndarray | Callable[[int], np.ndarray] | None = None,
                 transform=None, modalities: list[str] | None = None):
        self.arrays, self.schema = arrays, schema
        self.task = schema.task(task)
        self.modalities = modalities or schema.modality_names
        self.sequences = [m for m in self.modalities if schema.modality(m).is_sequence]  # those with lengths
        self.n = len(arrays["ids"])
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        if present is None:
            present = np.asarray(arrays["present"]) if "present" in arrays else np.ones((self.n, len(schema.modalities)), bool)
        # ``present`` has one column per dataset modality; keep those of the modalities read here
        self._columns = [schema.modality_names.index(m) for m in self.modalities]
        self._present_for = present if callable(present) else None
        self.transform = transform
        self.epoch = 0
        self.present = (present if self._present_for is None else self._present_for(0))[:, self._columns]

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        if self._present_for is not None:
            self.present = self._present_for(self.epoch)[:, self._columns]
        self.epoch += 1
        for start in range(0, self.n, self.batch_size):
            yield self.batch(np.sort(order[start:start + self.batch_size]))

    def batch(self, rows: np.ndarray) -> Batch:
        y_dtype = torch.float32 if self.task.type == "regression" else torch.long
        b = Batch(
            x={m: torch.from_numpy(np.asarray(self.arrays[f"x/{m}"][rows], dtype=np.float32)) for m in self.modalities},
            lengths={m: torch.from_numpy(np.asarray(self.arrays[f"len/{m}"][rows], dtype=np.int64))
                     for m in self.sequences},
            present=torch.from_numpy(self.present[rows]),
            y=torch.as_tensor(np.asarray(self.arrays[self.task.label_key][rows]), dtype=y_dtype),
            index=torch.from_numpy(rows.astype(np.int64)),
        )
        return self.transform(b) if self.transform is not None else b
