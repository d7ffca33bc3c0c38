"""One training step of each paper preset and each paper method: ours against the official arithmetic.

Cases (``--cases``), all at the papers' model sizes and their MOSI inputs:

- backbones ``casp_late``, ``casp_early`` (CASP's MMSA features: text 50x768, audio 375x5, vision
  500x20, batch ``--unaligned-batch``), ``cggm_msa``, ``mplmm_mult`` (MulT's aligned features:
  50 steps each, text 300, audio 5, vision 20, batch ``--aligned-batch``): forward, L1 loss,
  backward, gradient clip 0.8, Adam;
- methods: ``cggm`` (on ``cggm_msa``: the CGGM hook with its unimodal classifiers, its default
  MOSI settings), ``casp`` (on ``casp_late``: one step of CASP's contrastive adaptation, LayerNorms
  only, dropout on: two views, NT-Xent, clip 0.8), ``mplmm`` (on ``mplmm_mult``: frozen backbone,
  all three prompt families, missing rate 0.7), ``wander`` (on ``casp_late``: frozen backbone,
  Wander's defaults).

Dropouts are the presets' official ones (attention dropout on). Each case builds two models with
the same weights: ``ours`` as the project builds it, and ``official``, the same module tree with
every attention replaced by the arithmetic of the released code, restated here from its
description (time-first tensors, ``q`` scaled by ``head_dim ** -0.5``, per-(batch x head) ``bmm``
with ``k``, an additive ``-inf`` future mask built per call when causal, float32 softmax, dropout
on the weights with ``F.dropout``, ``bmm`` with ``v``, output projection) -- CGGM's classifiers
included, whose official form is the same MulT block -- and every other dropout of the presets drawn
by ``F.dropout`` as the released code does. Everything else is the same code, so the ratio
isolates attention and dropout. ``--compile`` adds ``compiled``: ours under ``torch.compile`` (its
compile time is the first compiled step's wall time less the eager median).

Timing: ``--warmup`` steps each, then ``--reps`` rounds, each running one step of every
implementation in turn (the order alternates between rounds), so a change of load on a shared
machine hits all alike. Per implementation: CPU time of the process and wall time of a step,
median and interquartile range; ``x official`` is the median over rounds of the per-round ratio
to the official step (CPU time; wall time in brackets). The load average is read before and
after each case. ``--threads`` torch threads (default 1). ``diff``: the largest difference of the
two models' eval-mode predictions (dropout off they compute the same function: rounding only).
On CUDA (``--device cuda``, ``--amp`` for a bf16 forward) wall time is what counts, and ``GPU ms``
adds the kernel time of a step (profiler, mean of 2 steps): a step far above it is host-bound.

Writes ``<out>/backbone_step.csv`` and ``.md`` (``benchmarks/results/`` is git-ignored) and prints
the Markdown. ``docs/benchmarks.md`` ("One training step on the CPU") holds the last CPU run. On the
2-core machine under load 7-13: 30 rounds of the aligned cases and ``wander`` took 20 minutes, 10
rounds of the three at CASP's lengths 12.5; quick look: ``--reps 3 --warmup 1 --cases casp_late``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import mmrepro  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmrepro.data.loader import Batch  # noqa: E402
from mmrepro.data.missing import present_mask  # noqa: E402
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec  # noqa: E402
from mmrepro.methods import HOOKS, TRANSFORMS, build  # noqa: E402
from mmrepro.methods.adapters import clipped_step, layer_norm_parameters, only_trainable, random_drop_view  # noqa: E402
from mmrepro.methods.casp import nt_xent  # noqa: E402
from mmrepro.methods.balance import probes  # noqa: E402
from mmrepro.models import build_model, presets, transformer  # noqa: E402
from mmrepro.models.transformer import MultiheadAttention  # noqa: E402

REG = TaskSpec("score", "regression", value_range=(-3.0, 3.0))
#: CASP's MOSI (MMSA unaligned features) and MulT's aligned MOSI (CGGM's and MPLMM's).
LAYOUTS = {"unaligned": {"text": (50, 768), "audio": (375, 5), "vision": (500, 20)},
           "aligned": {"text": (50, 300), "audio": (50, 5), "vision": (50, 20)}}
#: The official model sizes (CASP's, CGGM's run/mosi_run.py, MPLMM's main.py).
SIZES = {
    "casp_late": dict(d_model=40, layers=5, heads=8, fusion_layers=1),
    "casp_early": dict(d_model=40, layers=5, heads=8, fusion_layers=1),
    "cggm_msa": dict(d_model=40, layers=5, heads=5, fusion_layers=3),
    "mplmm_mult": dict(d_model=30, layers=5, heads=5, fusion_layers=1),
}
PAPER_LAYOUT = {"casp_late": "unaligned", "casp_early": "unaligned", "cggm_msa": "aligned", "mplmm_mult": "aligned"}
#: method -> the preset it runs on
METHODS = {"cggm": "cggm_msa", "casp": "casp_late", "mplmm": "mplmm_mult", "wander": "casp_late"}
CASES = [*SIZES, *METHODS]
#: The modules whose ``dropout`` the official step replaces by ``F.dropout``.
DROPOUT_USERS = (transformer, presets, probes)
CLIP = 0.8
COLUMNS = ["case", "preset", "layout", "batch", "impl", "cpu_ms", "cpu_iqr", "wall_ms", "wall_iqr", "x_official_cpu",
           "x_official_wall", "compile_s", "gpu_ms", "max_abs_diff", "load_before", "load_after"]


# --- the official arithmetic -------------------------------------------------------------------


def official_attention(x, k_in, v_in, w, b, heads: int, dropout: float, training: bool, causal: bool):
    """MulT/fairseq's attention on time-first ``(T, B, d)`` inputs (the module docstring)."""
    d = x.shape[-1]
    hd = d // heads
    q = F.linear(x, w[:d], b[:d]) * hd ** -0.5
    k = F.linear(k_in, w[d: 2 * d], b[d: 2 * d])
    v = F.linear(v_in, w[2 * d:], b[2 * d:])
    tq, bsz, tk = q.shape[0], q.shape[1], k.shape[0]
    q = q.contiguous().view(tq, bsz * heads, hd).transpose(0, 1)
    k = k.contiguous().view(tk, bsz * heads, hd).transpose(0, 1)
    v = v.contiguous().view(tk, bsz * heads, hd).transpose(0, 1)
    weights = torch.bmm(q, k.transpose(1, 2))
    if causal:
        future = torch.triu(torch.full((tq, tk), float("-inf")), 1 + abs(tk - tq)).to(weights.device)
        weights = weights + future.unsqueeze(0)
    weights = F.softmax(weights.float(), dim=-1).type_as(weights)
    weights = F.dropout(weights, dropout, training)
    return torch.bmm(weights, v).transpose(0, 1).contiguous().view(tq, bsz, d)


class OfficialArithmetic(nn.Module):
    """The official attention on the parameters of one of our preset attention modules."""

    def __init__(self, attn: MultiheadAttention):
        super().__init__()
        self.attn, self.num_heads = attn, attn.num_heads

    def forward(self, query, key=None, value=None, mask=None, causal=False):
        a = self.attn
        x = query.transpose(0, 1)
        k_in = x if key is None else key.transpose(0, 1)
        v_in = k_in if value is None or value is key else value.transpose(0, 1)
        # the benchmark's sequences are full, so any mask is MulT's future mask
        out = official_attention(x, k_in, v_in, a.in_proj_weight, a.in_proj_bias, a.num_heads, a.dropout,
                                 self.training, causal or mask is not None)
        return a.out_proj(out).transpose(0, 1)


class OfficialTorchAttention(nn.Module):
    """The same for an ``nn.MultiheadAttention`` inside ``nn.TransformerEncoderLayer`` (CGGM's classifiers)."""

    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        self.attn, self.batch_first = attn, attn.batch_first

    def forward(self, query, key, value, attn_mask=None, key_padding_mask=None, need_weights=False, is_causal=False):
        if key_padding_mask is not None and bool(key_padding_mask.any()):
            raise ValueError("the benchmark's sequences are full: no key is padded")
        a, x = self.attn, query.transpose(0, 1)
        out = official_attention(x, x, x, a.in_proj_weight, a.in_proj_bias, a.num_heads, a.dropout, self.training,
                                 is_causal)
        return a.out_proj(out).transpose(0, 1), None


@contextlib.contextmanager
def official_dropouts() -> Iterator[None]:
    """The presets' other dropout sites as the released code draws them (``F.dropout``), for the official step."""
    saved = {module: module.dropout for module in DROPOUT_USERS}
    for module in DROPOUT_USERS:
        module.dropout = F.dropout
    try:
        yield
    finally:
        for module, fn in saved.items():
            module.dropout = fn


def official_step(step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with official_dropouts():
            step()
    return run


def to_official(model: nn.Module) -> nn.Module:
    """Swap, in place, every attention inside ``model`` for the official arithmetic (same parameters)."""
    for module in list(model.modules()):
        if isinstance(module, nn.TransformerEncoderLayer):  # CGGM's classifiers: PyTorch's own layer
            module.__class__ = nn.TransformerEncoderLayer
        attn = getattr(module, "self_attn", None)
        if isinstance(attn, MultiheadAttention):
            module.self_attn = OfficialArithmetic(attn)
        elif isinstance(attn, nn.MultiheadAttention):
            module.self_attn = OfficialTorchAttention(attn)
    return model


# --- the cases ---------------------------------------------------------------------------------


def make_batch(layout: str, batch: int, device: str, missing_rate: float = 0.0) -> tuple[DatasetSchema, Batch]:
    shapes = LAYOUTS[layout]
    schema = DatasetSchema(name="mosi", modalities=tuple(ModalitySpec(m, length=t, dim=d) for m, (t, d) in shapes.items()),
                           tasks=(REG,), splits=("train",))
    g = torch.Generator().manual_seed(0)
    present = (torch.from_numpy(present_mask(batch, len(shapes), missing_rate, seed=0, split="bench")) if missing_rate
               else torch.ones(batch, len(shapes), dtype=torch.bool))
    x = {m: torch.randn(batch, t, d, generator=g) for m, (t, d) in shapes.items()}
    lengths = {m: torch.full((batch,), t) for m, (t, _) in shapes.items()}
    return schema, Batch(x=x, lengths=lengths, present=present, y=torch.randn(batch, generator=g),
                         index=torch.arange(batch)).to(device)


def autocast(amp: bool) -> torch.autocast:
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp)


def supervised_step(model: nn.Module, batch: Batch, amp: bool) -> Callable[[], None]:
    """Forward, L1, backward, clip, Adam on the trainable parameters (the shared loop's step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(amp):
            pred = model(batch).pred
        F.l1_loss(pred.float(), batch.y).backward()
        nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
    return step


def cggm_step(model: nn.Module, batch: Batch, official: bool, amp: bool) -> Callable[[], None]:
    """The shared loop's step with the CGGM hook (its classifiers trained and consulted every step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    hook = build(HOOKS, "cggm")
    torch.manual_seed(1)  # the same classifiers for both implementations
    hook.setup(model, F.l1_loss, optimizer)
    if official:
        to_official(hook.probes)

    def step() -> None:
        with autocast(amp):
            out = model(batch)
            loss = hook.loss(model, batch, out, F.l1_loss(out.pred.float(), batch.y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        hook.after_backward(model, batch, out)
        nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
    return step


def casp_step(model: nn.Module, batch: Batch, amp: bool) -> Callable[[], None]:
    """One step of CASP's contrastive stage: LayerNorms only, two views, NT-Xent, clipped Adam step."""
    optimizer = torch.optim.Adam(only_trainable(model, layer_norm_parameters(model)), lr=1e-3)
    unlabelled = Batch(x=batch.x, lengths=batch.lengths, present=batch.present, y=None, index=batch.index)

    def step() -> None:
        with autocast(amp):
            z1 = model(unlabelled).representation.float()
            z2 = model(random_drop_view(unlabelled)).representation.float()
        clipped_step(optimizer, nt_xent(z1, z2, 0.5), CLIP)
    return step


@dataclass
class Case:
    name: str
    preset: str
    layout: str
    batch: int
    steps: dict[str, Callable[[], None]]
    max_abs_diff: float


def build_case(name: str, args) -> Case:
    preset = METHODS.get(name, name)
    layout = PAPER_LAYOUT[preset]
    n = args.unaligned_batch if layout == "unaligned" else args.aligned_batch
    schema, batch = make_batch(layout, n, args.device, missing_rate=0.7 if name == "mplmm" else 0.0)
    torch.manual_seed(0)
    ours = build_model(schema, REG, backbone=preset, kernel=1, dropout=0.0, **SIZES[preset])
    if name in ("mplmm", "wander"):
        ours = build(TRANSFORMS, name).apply(ours)
    ours = ours.to(args.device).train()
    official = to_official(copy.deepcopy(ours))
    impls = {"ours": ours, "official": official}
    if args.compile:
        impls["compiled"] = torch.compile(copy.deepcopy(ours))

    def step_for(impl: str, model: nn.Module) -> Callable[[], None]:
        if name == "cggm":
            return cggm_step(model, batch, official=impl == "official", amp=args.amp)
        if name == "casp":
            return casp_step(model, batch, args.amp)
        return supervised_step(model, batch, args.amp)
    with torch.no_grad():  # dropout off, the two compute the same function: equal up to rounding
        ours.eval(), official.eval()
        diff = (ours(batch).pred - official(batch).pred).abs().max().item()
        ours.train(), official.train()
    steps = {impl: step_for(impl, m) for impl, m in impls.items()}
    steps["official"] = official_step(steps["official"])
    return Case(name, preset, layout, n, steps, diff)


# --- timing ------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gpu_ms(step: Callable[[], None], steps: int = 2) -> float:
    """GPU kernel time of one step, from the profiler's device-time totals."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1000 / steps


def timed(step: Callable[[], None], device: str) -> tuple[float, float]:
    """(CPU seconds of the process, wall seconds) of one step."""
    sync(device)
    cpu, wall = time.process_time(), time.perf_counter()
    step()
    sync(device)
    return time.process_time() - cpu, time.perf_counter() - wall


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, med, q3


def run_case(case: Case, args) -> list[dict]:
    load_before = os.getloadavg()[0]
    compile_s: float | str = ""
    for impl, step in list(case.steps.items()):
        for i in range(args.warmup):
            try:
                _, wall = timed(step, args.device)
            except Exception as e:  # noqa: BLE001 -- a compiler failure is a result to report, not a crash
                if impl != "compiled":
                    raise
                compile_s = f"fails: {type(e).__name__}"
                del case.steps[impl]
                break
            if impl == "compiled" and i == 0:
                compile_s = wall
    impls = list(case.steps)
    cpu: dict[str, list[float]] = {k: [] for k in impls}
    wall: dict[str, list[float]] = {k: [] for k in impls}
    for r in range(args.reps):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            c, w = timed(case.steps[impl], args.device)
            cpu[impl].append(c)
            wall[impl].append(w)
    load_after = os.getloadavg()[0]
    kernels = {impl: gpu_ms(step) for impl, step in case.steps.items()} if args.device == "cuda" else {}
    rows = [] if isinstance(compile_s, float) or not compile_s else [
        {**dict.fromkeys(COLUMNS, ""), "case": case.name, "preset": case.preset, "layout": case.layout,
         "batch": case.batch, "impl": "compiled", "compile_s": compile_s}]
    for impl in impls:
        cq, wq = quartiles(cpu[impl]), quartiles(wall[impl])
        x_cpu = statistics.median(a / b for a, b in zip(cpu[impl], cpu["official"]))
        x_wall = statistics.median(a / b for a, b in zip(wall[impl], wall["official"]))
        rows.append({"case": case.name, "preset": case.preset, "layout": case.layout, "batch": case.batch, "impl": impl,
                     "cpu_ms": round(1e3 * cq[1], 1), "cpu_iqr": f"{1e3 * cq[0]:.0f}-{1e3 * cq[2]:.0f}",
                     "wall_ms": round(1e3 * wq[1], 1), "wall_iqr": f"{1e3 * wq[0]:.0f}-{1e3 * wq[2]:.0f}",
                     "x_official_cpu": round(x_cpu, 3), "x_official_wall": round(x_wall, 3),
                     "compile_s": round(compile_s - wq[1], 1) if impl == "compiled" else "",
                     "gpu_ms": round(kernels[impl], 2) if kernels else "not measured",
                     "max_abs_diff": f"{case.max_abs_diff:.1e}",
                     "load_before": round(load_before, 2), "load_after": round(load_after, 2)})
    return rows


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
            f"thread(s) (torch {torch.__version__})")


def markdown(rows: list[dict], args) -> str:
    md = io.StringIO()
    md.write(f"# One training step: ours vs the official arithmetic\n\nMachine: {machine(args.device)}; "
             f"amp: {'bf16' if args.amp else 'off'}. {args.reps} interleaved rounds after {args.warmup} warm-up "
             f"steps; batch {args.unaligned_batch} (CASP's unaligned MOSI), {args.aligned_batch} (aligned MOSI). "
             f"`x official`: median per-round ratio to the official step, CPU time (wall time). `GPU ms`: kernel "
             f"time of a step on CUDA. `diff`: max abs difference of the two models' eval-mode predictions.\n")
    if args.note:
        md.write(f"\n{args.note}\n")
    md.write("\n| case | preset | layout | batch | impl | CPU ms (IQR) | wall ms (IQR) | x official CPU (wall) | "
             "compile s | GPU ms | diff | load before/after |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        md.write(f"| {r['case']} | {r['preset']} | {r['layout']} | {r['batch']} | {r['impl']} | {r['cpu_ms']} "
                 f"({r['cpu_iqr']}) | {r['wall_ms']} ({r['wall_iqr']}) | {r['x_official_cpu']} ({r['x_official_wall']}) "
                 f"| {r['compile_s']} | {r['gpu_ms']} | {r['max_abs_diff']} | {r['load_before']}/{r['load_after']} |\n")
    return md.getvalue()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the forward (cuda only)")
    p.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    p.add_argument("--unaligned-batch", type=int, default=8, help="batch at CASP's lengths (the papers: 24)")
    p.add_argument("--aligned-batch", type=int, default=64, help="batch at aligned lengths (CGGM's, MPLMM's 64)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    p.add_argument("--reps", type=int, default=30, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (cpu only)")
    p.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--note", default="", help="a line for the Markdown, e.g. the machine's state")
    args = p.parse_args(argv)
    if args.amp and args.device != "cuda":
        p.error("--amp is bf16 autocast on CUDA: use it with --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.cases:
        case_rows = run_case(build_case(name, args), args)
        rows += case_rows
        for r in case_rows:
            print(f"{name} {r['impl']}: CPU {r['cpu_ms']} ms, x official {r['x_official_cpu']}", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "backbone_step.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, args)
    (args.out / "backbone_step.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
