"""One training step of the paper presets: our fused attention vs the official per-head arithmetic.

For each preset (``--presets``), at CMU-MOSI sizes (text 50x768, audio 375x5, vision 500x20, all
sequences full length) and the official model sizes (casp_late: d 40, 5 layers, 8 heads;
cggm_msa: d 40, 5 layers, 5 heads, 3 fusion layers; mplmm_mult: d 30, 5 layers, 5 heads, causal),
two models with the same weights and the same configuration are timed over one training step
(forward, L1 loss, backward, gradient clip 0.8, Adam):

- ``ours``: the preset as built by ``build_model`` (``scaled_dot_product_attention``; no mask
  tensor for full-length sequences; the kernel's own causal mask where T_q = T_k);
- ``official``: the same module tree with every attention replaced by the arithmetic the
  official MulT/fairseq code performs, restated here from its description: time-first tensors,
  ``q`` scaled by ``head_dim ** -0.5`` before the product, per-(batch x head) ``bmm`` of ``q`` and
  ``k``, an additive ``-inf`` future mask built on the CPU and copied to the device at every
  layer call (when causal), a float32 softmax cast back, dropout on the weights, ``bmm`` with
  ``v``, output projection. Everything else (projections, positions, feed-forward, head) is the
  same code in both, so the ratio isolates the attention.

Before timing, both are run in eval mode on one batch and their maximum absolute difference
is reported (``max_abs_diff``: equal up to rounding when the arithmetic is the same function).
Timing: ``--warmup`` steps each, then ``--rounds`` interleaved rounds (``ours`` then
``official``, ``--steps`` steps each, synchronised on CUDA); ``ms_median`` is the median step
time over rounds; ``ratio`` = ours / official (below 1: ours faster). On CUDA, ``gpu_ms`` is the
GPU kernel time of one step (``torch.profiler``, mean of 2 steps) and ``gpu_ratio`` its ratio:
at these small widths the wall time of a step is mostly per-operator host overhead that both
share, so ``gpu_ms`` far below ``ms_median`` means the step is host-bound and ``gpu_ratio`` is
what the attention kernels themselves save. ``--amp`` runs the forward under bf16 autocast
(CUDA only). CPU runs use ``--threads`` threads (default 1): on a shared machine, say so beside
the numbers.

Writes ``<out>/backbone_step.csv`` and ``.md`` (``benchmarks/results/`` is git-ignored) and
prints the Markdown. GPU: ``python benchmarks/backbone_step.py --device cuda --amp`` (about a
minute on a recent GPU). Quick CPU look: ``python benchmarks/backbone_step.py --batch 8 --rounds 3``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import mmrepro  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmrepro.data.loader import Batch  # noqa: E402
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec  # noqa: E402
from mmrepro.models import build_model  # noqa: E402
from mmrepro.models.transformer import MultiheadAttention  # noqa: E402

REG = TaskSpec("score", "regression", value_range=(-3.0, 3.0))
MOSI = DatasetSchema(name="mosi", modalities=(ModalitySpec("text", length=50, dim=768),
                                              ModalitySpec("audio", length=375, dim=5),
                                              ModalitySpec("vision", length=500, dim=20)),
                     tasks=(REG,), splits=("train",))
#: The official model sizes (CASP's, CGGM's run/mosi_run.py, MPLMM's main.py).
SIZES = {
    "casp_late": dict(d_model=40, layers=5, heads=8, fusion_layers=1),
    "casp_early": dict(d_model=40, layers=5, heads=8, fusion_layers=1),
    "cggm_msa": dict(d_model=40, layers=5, heads=5, fusion_layers=3),
    "mplmm_mult": dict(d_model=30, layers=5, heads=5, fusion_layers=1),
}
COLUMNS = ["preset", "device", "amp", "threads", "batch", "impl", "ms_median", "ms_min", "ratio", "gpu_ms", "gpu_ratio",
           "max_abs_diff", "params"]


class OfficialArithmetic(nn.Module):
    """The official attention arithmetic on the parameters of one of our attention modules."""

    def __init__(self, attn: MultiheadAttention):
        super().__init__()
        self.attn = attn

    def forward(self, query, key=None, value=None, mask=None, causal=False):
        a = self.attn
        heads, d = a.num_heads, query.shape[-1]
        hd = d // heads
        x = query.transpose(0, 1)  # time-first, as the official code keeps its tensors
        w, b = a.in_proj_weight, a.in_proj_bias
        if key is None:
            q, k, v = F.linear(x, w, b).chunk(3, dim=-1)
        else:
            k_in = key.transpose(0, 1)
            v_in = k_in if value is None or value is key else value.transpose(0, 1)
            q = F.linear(x, w[:d], b[:d])
            k = F.linear(k_in, w[d: 2 * d], b[d: 2 * d])
            v = F.linear(v_in, w[2 * d:], b[2 * d:])
        q = q * hd ** -0.5
        tq, bsz = q.shape[0], q.shape[1]
        q = q.contiguous().view(tq, bsz * heads, hd).transpose(0, 1)
        k = k.contiguous().view(-1, bsz * heads, hd).transpose(0, 1)
        v = v.contiguous().view(-1, bsz * heads, hd).transpose(0, 1)
        weights = torch.bmm(q, k.transpose(1, 2))
        if causal or mask is not None:  # the benchmark's sequences are full: any mask is MulT's future mask
            tk = k.shape[1]
            future = torch.triu(torch.full((tq, tk), float("-inf")), 1 + abs(tk - tq)).to(weights.device)
            weights = weights + future.unsqueeze(0)
        weights = F.softmax(weights.float(), dim=-1).type_as(weights)
        weights = F.dropout(weights, a.dropout, self.training)
        out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(tq, bsz, d)
        return a.out_proj(out).transpose(0, 1)


def official_variant(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (same weights) whose attentions compute as the official code does."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        if isinstance(getattr(module, "self_attn", None), MultiheadAttention):
            module.self_attn = OfficialArithmetic(module.self_attn)
    return twin


def make_batch(batch: int, device: str, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = {m.name: torch.randn(batch, m.length, m.dim, generator=g) for m in MOSI.modalities}
    lengths = {m.name: torch.full((batch,), m.length) for m in MOSI.modalities}
    return Batch(x=x, lengths=lengths, present=torch.ones(batch, 3, dtype=torch.bool),
                 y=torch.randn(batch, generator=g), index=torch.arange(batch)).to(device)


def train_step_fn(model: nn.Module, batch: Batch, device: str, amp: bool):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            pred = model(batch).pred
        loss = F.l1_loss(pred.float(), batch.y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.8)
        optimizer.step()
    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gpu_ms(step, steps: int = 2) -> float:
    """GPU kernel time of one step, from the profiler's device-time totals."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1000 / steps


def bench(preset: str, args) -> list[dict]:
    torch.manual_seed(0)
    ours = build_model(MOSI, REG, backbone=preset, kernel=1, dropout=0.0, **SIZES[preset]).to(args.device)
    official = official_variant(ours)
    batch = make_batch(args.batch, args.device)
    ours.eval(), official.eval()
    with torch.no_grad():
        diff = (ours(batch).pred - official(batch).pred).abs().max().item()
    ours.train(), official.train()
    steps = {"ours": train_step_fn(ours, batch, args.device, args.amp),
             "official": train_step_fn(official, batch, args.device, args.amp)}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    sync(args.device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            sync(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(args.device)
            times[name].append(1000 * (time.perf_counter() - start) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    gpu = {k: gpu_ms(step) for k, step in steps.items()} if args.device == "cuda" else {}
    params = sum(p.numel() for p in ours.parameters())
    threads = torch.get_num_threads() if args.device == "cpu" else ""
    return [{"preset": preset, "device": args.device, "amp": args.amp, "threads": threads, "batch": args.batch,
             "impl": k, "ms_median": round(med[k], 2), "ms_min": round(min(times[k]), 2),
             "ratio": round(med["ours"] / med["official"], 3) if k == "ours" else "",
             "gpu_ms": round(gpu[k], 2) if gpu else "",
             "gpu_ratio": round(gpu["ours"] / gpu["official"], 3) if gpu and k == "ours" else "",
             "max_abs_diff": f"{diff:.2e}", "params": params} for k in steps]


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s) (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the forward (cuda only)")
    p.add_argument("--presets", nargs="+", default=["casp_late", "cggm_msa", "mplmm_mult"], choices=list(SIZES))
    p.add_argument("--batch", type=int, default=24, help="batch size (the papers use 24-64)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=3, help="steps per implementation per round")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (cpu only)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--note", default="", help="a line for the Markdown, e.g. the machine's load")
    args = p.parse_args(argv)
    if args.amp and args.device != "cuda":
        p.error("--amp is bf16 autocast on CUDA: use it with --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    rows = [row for preset in args.presets for row in bench(preset, args)]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "backbone_step.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    md = io.StringIO()
    md.write(f"# Training step: preset (fused SDPA) vs official per-head attention\n\nMachine: {machine(args.device)}; "
             f"amp: {'bf16' if args.amp else 'off'}; batch {args.batch}; MOSI sizes; median of {args.rounds} "
             f"interleaved rounds of {args.steps} steps.\n")
    if args.note:
        md.write(f"\n{args.note}\n")
    md.write("\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
    for row in rows:
        md.write("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |\n")
    (args.out / "backbone_step.md").write_text(md.getvalue())
    print(md.getvalue())


if __name__ == "__main__":
    main()
