"""Batches in the data contract, read straight from a store split's memory-mapped arrays.

A :class:`Batch` holds, per modality, features ``(B, T_m, D_m)`` and lengths ``(B,)``, the
``present`` mask ``(B, M)``, the labels ``y`` of one task and the rows ``index`` into the split.
An array modality (image or volume, schema ``shape``) comes as float32 ``(B, *shape)``, channel
axis first as stored (a single-channel volume: ``(B, 1, D, H, W)``), and has no entry in
``lengths``, which holds only the sequence modalities read. Labels: float32 ``(B,)``
(regression), int64 ``(B,)`` (classification), int64 ``(B, *shape)`` (segmentation).
Each batch copies only its own rows out of the memory map, so an epoch never copies a whole
split, and the shuffle order depends only on ``(seed, epoch)``.

:class:`SliceSampling` (a loader option, for volume stores trained with a 2-D model) turns each
case of a batch into one 2-D slice drawn afresh every epoch, as CGGM's BraTS data set does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

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


@dataclass(frozen=True)
class SliceSampling:
    """One 2-D slice per case and epoch from volume stores, as CGGM's ``datasets/BratsDataset.py``.

    The code (``zrguo/CGGM`` at ``d7890a8``; read, not copied) takes per case and epoch a slice
    index along the last spatial axis at random until the label slice holds tumour, so the slice
    is uniform among the tumour-bearing ones (``tumour``; a case without any tumour here draws
    among all its slices, where the code would loop forever). Training then (``augment``) turns
    the slice by 0, 1 or 2 quarter turns and flips one of its two axes (each chosen uniformly),
    and with probability ``noise_p`` adds Gaussian noise whose standard deviation is drawn
    uniformly in ``[0, noise_std]`` to every modality (one draw per slice). The code's in-plane
    centre crop to 160x160 is the store's crop here (convert with ``crop=(160, 160, 128)``).
    Draws come from ``numpy.random.default_rng([seed, epoch, first row of the batch])``: an epoch's
    slices depend only on the seed and the epoch, also after a resume.
    ``volumes_per_batch``: cases per batch of the whole-volume loaders (valid, test), each
    cut into all its slices by the 2-D model; it bounds evaluation memory.
    """

    tumour: bool = True
    augment: bool = True
    noise_p: float = 0.1
    noise_std: float = 0.1
    volumes_per_batch: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise_p <= 1.0 or self.noise_std < 0 or self.volumes_per_batch < 1:
            raise ValueError(f"slices: noise_p must lie in [0, 1], noise_std be >= 0 and volumes_per_batch >= 1; "
                             f"got {self}")

    def indices(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One slice index per case of ``labels`` ``(B, ..., D)``."""
        out = np.empty(len(labels), np.int64)
        for i, lab in enumerate(labels):
            depth = lab.shape[-1]
            pool = np.flatnonzero(lab.reshape(-1, depth).any(0)) if self.tumour else np.arange(depth)
            out[i] = rng.choice(pool if len(pool) else np.arange(depth))
        return out

    def augmented(self, x: dict[str, np.ndarray], y: np.ndarray,
                  rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Quarter turns, a flip and noise per slice; ``x[m]`` ``(B, C, H, W)``, ``y`` ``(B, H, W)``."""
        x = {m: v.copy() for m, v in x.items()}
        y = y.copy()
        for i in range(len(y)):
            turns, axis = rng.integers(0, 3), rng.integers(0, 2)
            y[i] = np.flip(np.rot90(y[i], turns), axis)
            for v in x.values():
                v[i] = np.flip(np.rot90(v[i], turns, axes=(1, 2)), axis + 1)
            if rng.uniform() < self.noise_p:
                std = rng.uniform(0.0, self.noise_std)
                for v in x.values():
                    v[i] += rng.normal(0.0, std, size=v[i].shape).astype(v.dtype)
        return x, y


class SplitLoader:
    """Iterates over one split in batches; ``present`` and ``transform`` come from the data setting.

    ``present`` (one column per dataset modality) defaults to the store's own mask or all-present;
    a callable ``present(epoch)`` gives a fresh mask per epoch (missing patterns redrawn each epoch).
    ``slices`` (volume stores): batches of one 2-D slice per case, see :class:`SliceSampling`.
    """

    def __init__(self, arrays: dict[str, np.ndarray], schema: DatasetSchema, task: str, *,
                 batch_size: int, shuffle: bool, seed: int,
                 present: np.ndarray | Callable[[int], np.ndarray] | None = None,
                 transform=None, modalities: list[str] | None = None, slices: SliceSampling | None = None):
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
        self.slices = slices
        if slices is not None:
            shapes = {len(schema.modality(m).shape) for m in self.modalities}
            if self.task.type != "segmentation" or shapes != {4}:
                raise ValueError("slices: slice sampling needs a segmentation task and volume modalities (C, H, W, D)")
            if slices.augment and self.task.shape[0] != self.task.shape[1]:
                raise ValueError(f"slices: quarter turns need square slices, the volumes are {self.task.shape}")
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
        epoch = self.epoch
        self.epoch += 1
        for start in range(0, self.n, self.batch_size):
            rng = None if self.slices is None else np.random.default_rng([self.seed, epoch, start])
            yield self.batch(np.sort(order[start:start + self.batch_size]), rng)

    def batch(self, rows: np.ndarray, rng: np.random.Generator | None = None) -> Batch:
        """The batch of ``rows``; with ``slices``, one slice per row drawn with ``rng`` (default: seeded by the rows)."""
        y_dtype = torch.float32 if self.task.type == "regression" else torch.long
        if self.slices is None:
            x = {m: np.asarray(self.arrays[f"x/{m}"][rows], dtype=np.float32) for m in self.modalities}
            y: Any = np.asarray(self.arrays[self.task.label_key][rows])
        else:
            x, y = self._slices(rows, rng if rng is not None else np.random.default_rng([self.seed, *rows.tolist()]))
        b = Batch(
            x={m: torch.from_numpy(v) for m, v in x.items()},
            lengths={m: torch.from_numpy(np.asarray(self.arrays[f"len/{m}"][rows], dtype=np.int64))
                     for m in self.sequences},
            present=torch.from_numpy(self.present[rows]),
            y=torch.as_tensor(y, dtype=y_dtype),
            index=torch.from_numpy(rows.astype(np.int64)),
        )
        return self.transform(b) if self.transform is not None else b

    def _slices(self, rows: np.ndarray, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """One slice per row: only the label volumes and the chosen slices are read from the memory map."""
        labels = np.asarray(self.arrays[self.task.label_key][rows])
        k = self.slices.indices(labels, rng)
        y = np.stack([lab[..., kk] for lab, kk in zip(labels, k)])
        x = {m: np.stack([np.asarray(self.arrays[f"x/{m}"][r, ..., kk], dtype=np.float32) for r, kk in zip(rows, k)])
             for m in self.modalities}
        return self.slices.augmented(x, y, rng) if self.slices.augment else (x, y)
