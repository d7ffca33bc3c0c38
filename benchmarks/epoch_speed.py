"""Time per training epoch, and the share of it spent loading data, for each model at the papers' sizes.

Cases (random inputs of the real datasets' shapes, written to a real feature store so batches come
through the pipeline's memory-mapped loader):

- ``mosi``: text 50x768, audio 375x5, vision 500x20, regression (CMU-MOSI, MMSA unaligned);
- ``iemocap``: text 22x1024, audio 350x130, vision 50x342, 4 classes (IEMOCAP, MMIN layout);
- ``food101``: text 50x768, image 50x768 (ViT CLS + 7x7 patches), 101 classes (UPMC Food-101 features);
- ``brats``: four MRI sequences of ``--brats-size``^3 voxels (the papers' crop: 128), 4 classes per voxel.

Models: ``late``, ``concat``, ``mult`` on the sequence cases (d 40, 5 layers, 5 heads: the papers'
MOSI size; ``--d-model`` etc. change it), ``unet3d`` on BraTS. One epoch is the real training loop
(:func:`mmrepro.train.fit`, one epoch, joint training); ``load_s`` is a pass over the same loader
that only reads batches and moves them to the device, and ``load_share`` = load_s / epoch_s (the
loop reads synchronously, so loading adds to the epoch). On CUDA each case also runs with bf16
autocast (``train.precision``) and with and without pinned, asynchronous copies
(``train.pin_memory``). Times are medians of ``--repeats`` epochs after one warm-up epoch.

Writes ``<out>/epoch_speed_<device>.csv`` and ``.md`` (``benchmarks/results/`` is git-ignored). Examples:
``python benchmarks/epoch_speed.py --threads 2`` (CPU, small sample counts);
``python benchmarks/epoch_speed.py --device cuda --samples 1024 --brats-cases 16``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from results_table import markdown, write_results

from mmrepro import reproducibility
from mmrepro.data.loader import SplitLoader
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.data.store import FeatureStore, write_store
from mmrepro.methods.hooks import JointTraining
from mmrepro.models import build_model
from mmrepro.train import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]
SEQUENCE_CASES = {
    "mosi": ({"text": (50, 768), "audio": (375, 5), "vision": (500, 20)}, TaskSpec("y", "regression", (-3.0, 3.0))),
    "iemocap": ({"text": (22, 1024), "audio": (350, 130), "vision": (50, 342)},
                TaskSpec("y", "classification", num_classes=4)),
    "food101": ({"text": (50, 768), "image": (50, 768)}, TaskSpec("y", "classification", num_classes=101)),
}
COLUMNS = ["device", "case", "model", "precision", "pinned", "samples", "batch", "epoch_s", "load_s", "load_share",
           "samples_per_s", "params"]


def random_store(root: Path, case: str, n: int, brats_size: int) -> Path:
    """A feature store of random inputs with the case's shapes (train split only is read)."""
    rng = np.random.default_rng(0)
    if case == "brats":
        mods = [ModalitySpec(m, shape=(1, brats_size, brats_size, brats_size)) for m in ("t1", "t1ce", "t2", "flair")]
        task = TaskSpec("y", "segmentation", num_classes=4, shape=(brats_size,) * 3)
    else:
        shapes, task = SEQUENCE_CASES[case]
        mods = [ModalitySpec(m, length=t, dim=d) for m, (t, d) in shapes.items()]
    schema = DatasetSchema(case, tuple(mods), (task,), ("train",))
    arrays: dict[str, np.ndarray] = {"ids": np.array([f"s{i}" for i in range(n)])}
    for m in mods:
        arrays[f"x/{m.name}"] = rng.standard_normal((n, *m.sample_shape), dtype=np.float32).astype(np.float16
                                                                                                   if case == "brats"
                                                                                                   else np.float32)
        if m.is_sequence:
            arrays[f"len/{m.name}"] = np.full(n, m.length, dtype=np.int64)
    if task.type == "regression":
        arrays["y/y"] = rng.uniform(-3, 3, n).astype(np.float32)
    else:
        arrays["y/y"] = rng.integers(0, task.num_classes, (n, *task.sample_shape)).astype(
            np.uint8 if case == "brats" else np.int64)
    return write_store(root / case, schema, [("train", arrays, {})], provenance={"source": f"random:{case}"})


def time_case(store_path: Path, model_name: str, cfg: TrainConfig, repeats: int, model_args: dict) -> dict:
    store = FeatureStore(store_path)
    task = store.schema.tasks[0]
    loader = SplitLoader(store.open_split("train"), store.schema, task.name, batch_size=cfg.batch_size,
                         shuffle=True, seed=0)
    model = build_model(store.schema, task, backbone=model_name, **model_args)
    device = cfg.torch_device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    epochs = []
    for _ in range(repeats + 1):  # the first is a warm-up (allocator, kernels, page cache)
        sync()
        start = time.perf_counter()
        fit(model, loader, loader_subset(loader), JointTraining(), cfg)
        sync()
        epochs.append(time.perf_counter() - start)
    loads = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for batch in loader:
            batch.to(device, pin=cfg.pin_memory)
        sync()
        loads.append(time.perf_counter() - start)
    epoch, load = statistics.median(epochs[1:]), statistics.median(loads)
    return {"epoch_s": round(epoch, 3), "load_s": round(load, 3), "load_share": round(load / epoch, 3),
            "samples_per_s": round(loader.n / epoch, 1), "params": sum(p.numel() for p in model.parameters())}


def loader_subset(loader: SplitLoader) -> SplitLoader:
    """A one-batch validation loader, so an epoch's time is dominated by training as in a real run."""
    arrays = {k: v[: loader.batch_size] for k, v in loader.arrays.items()}
    return SplitLoader(arrays, loader.schema, loader.task.name, batch_size=loader.batch_size, shuffle=False, seed=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cases", nargs="+", default=["mosi", "iemocap", "food101", "brats"],
                   choices=[*SEQUENCE_CASES, "brats"])
    p.add_argument("--models", nargs="+", default=["late", "concat", "mult"],
                   help="sequence models to time (BraTS always uses unet3d)")
    p.add_argument("--samples", type=int, default=128, help="training samples per sequence case")
    p.add_argument("--batch", type=int, default=32, help="batch size (sequence cases)")
    p.add_argument("--brats-size", type=int, default=64, help="BraTS crop edge in voxels (the papers: 128)")
    p.add_argument("--brats-cases", type=int, default=4, help="training volumes (BraTS batch: 2)")
    p.add_argument("--d-model", type=int, default=40)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--heads", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="timed epochs per case (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    reproducibility.configure(0, args.threads)
    torch.use_deterministic_algorithms(False)  # speed, as a user's GPU run would (determinism is for CPU runs)
    variants = [("fp32", False)] if args.device == "cpu" else [("fp32", False), ("fp32", True), ("bf16", True)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            n = args.brats_cases if case == "brats" else args.samples
            store = random_store(Path(tmp), case, n, args.brats_size)
            models = ["unet3d"] if case == "brats" else args.models
            batch = 2 if case == "brats" else args.batch
            model_args = dict(d_model=16 if case == "brats" else args.d_model, layers=1 if case == "brats" else args.layers,
                              heads=args.heads, kernel=1, dropout=0.1, fusion_layers=3)
            for model_name in models:
                for precision, pinned in variants:
                    cfg = TrainConfig(epochs=1, batch_size=batch, lr=1e-3, patience=1, device=args.device,
                                      precision=precision, pin_memory=pinned)
                    result = time_case(store, model_name, cfg, args.repeats, model_args)
                    row = {"device": args.device, "case": case, "model": model_name, "precision": precision,
                           "pinned": pinned, "samples": n, "batch": batch, **result}
                    rows.append(row)
                    print(markdown([row], COLUMNS).splitlines()[-1], flush=True)
    gpu = f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    machine = f"{platform.machine()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, threads {args.threads}"
    print(write_results(rows, COLUMNS, args.out, f"epoch_speed_{args.device}", f"Epoch speed ({machine})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
