"""MPLMM's training step against the frozen backbone alone: time and peak memory, MOSI sizes.

Why: the released MPLMM code loops over the samples of a batch in Python; ours groups samples by
missing pattern, and the issue's goal is a step at most 1.5x the frozen backbone's. Both models
are the ``mplmm_mult`` MulT (d 30, 5 layers, 5 heads: ``config/paper.yaml``) frozen, with
re-initialised input projections and output layer; the "backbone" row is ``mplmm_none`` (no
prompts: missing inputs are zeros), the "mplmm" row adds the three prompt families (l = 16).
One step = forward, L1 loss, backward, Adam step, on a batch of ``--batch`` (64) samples whose
missing patterns follow the training protocol at rate 0.7 (a fixed seed). Inputs are MOSI's
MulT features: aligned (50 steps each; text 300, audio 5, vision 20 wide) and unaligned (text 50,
audio 375, vision 500 steps).

Time: median and min over ``--repeats`` steps after ``--warmup``, wall clock (CUDA synchronised).
Peak memory (CUDA only): ``torch.cuda.max_memory_allocated`` during the timed steps minus what was
allocated before them. Writes ``<out>/mplmm_step.csv`` and ``.md`` and prints the Markdown.
Example: ``python benchmarks/mplmm_step.py --device cuda`` (well under 3 minutes on a GPU).
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mmrepro.data.loader import Batch
from mmrepro.data.missing import present_mask
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.methods import TRANSFORMS, build
from mmrepro.methods.transforms import count_parameters
from mmrepro.models import build_model

DIMS = {"text": 300, "audio": 5, "vision": 20}
LENGTHS = {"aligned": {"text": 50, "audio": 50, "vision": 50}, "unaligned": {"text": 50, "audio": 375, "vision": 500}}
TASK = TaskSpec("score", "regression", value_range=(-3.0, 3.0))
ROWS = {"backbone": "mplmm_none", "mplmm": "mplmm"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--layouts", nargs="+", choices=list(LENGTHS), default=list(LENGTHS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return p.parse_args(argv)


def make_batch(layout: str, b: int, device: str) -> Batch:
    g = torch.Generator().manual_seed(0)
    names = list(DIMS)
    present = torch.from_numpy(present_mask(b, len(names), 0.7, seed=0, split="bench"))
    x = {m: torch.randn(b, LENGTHS[layout][m], DIMS[m], generator=g) for m in names}
    lengths = {m: torch.full((b,), LENGTHS[layout][m]) for m in names}
    return Batch(x=x, lengths=lengths, present=present, y=torch.randn(b, generator=g), index=torch.arange(b)).to(device)


def measure(layout: str, method: str, args: argparse.Namespace) -> dict:
    schema = DatasetSchema(name="mosi", modalities=tuple(ModalitySpec(m, length=LENGTHS[layout][m], dim=d)
                                                         for m, d in DIMS.items()), tasks=(TASK,), splits=("train",))
    torch.manual_seed(0)
    model = build_model(schema, TASK, backbone="mplmm_mult", d_model=30, layers=5, heads=5, kernel=1, dropout=0.0,
                        fusion_layers=1)
    model = build(TRANSFORMS, method).apply(model).to(args.device).train()
    trainable, total = count_parameters(model)
    batch = make_batch(layout, args.batch, args.device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    cuda = args.device == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.l1_loss(model(batch).pred, batch.y).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else float("nan")
    return {"layout": layout, "row": method, "trainable": trainable, "total": total,
            "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "peak_mib": peak}


def _mib(x: float) -> str:
    return "" if np.isnan(x) else f"{x:.1f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(layout, method, args) for layout in args.layouts for method in ROWS.values()]
    for r in rows:  # each row's step against the frozen backbone's of its layout
        base = next(b for b in rows if b["layout"] == r["layout"] and b["row"] == ROWS["backbone"])
        r["x_backbone"] = r["median_ms"] / base["median_ms"]
    args.out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (args.out / "mplmm_step.csv").write_text(buf.getvalue())
    header = (f"MPLMM step vs frozen backbone, batch {args.batch}, device {args.device}"
              f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, torch {torch.__version__}\n\n"
              "| layout | row | trainable | total | median ms | min ms | x backbone | peak MiB |\n|---|---|---|---|---|---|---|---|\n")
    md = header + "".join(f"| {r['layout']} | {r['row']} | {r['trainable']:,} | {r['total']:,} | {r['median_ms']:.1f} | "
                          f"{r['min_ms']:.1f} | {r['x_backbone']:.2f} | {_mib(r['peak_mib'])} |\n" for r in rows)
    (args.out / "mplmm_step.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
