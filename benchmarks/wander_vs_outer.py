"""Wander's factorised fusion vs the explicit outer product: forward+backward time and peak memory.

For each number of modalities M and sequence length T, at MOSI-like sizes (T ~ 50 tokens, token
widths 32-64, rank 8), one forward and backward pass (loss = sum of the output; gradients for every
adapter parameter) is timed for three implementations of the same function:

- ``wander``: ``WanderAdapter`` (CP factors applied mode by mode, never building a tensor of order M);
- ``explicit``: ``explicit_outer_product`` per common-length position: the (r')^M outer product of the
  M token-mapped vectors, contracted with the CP-reconstructed feature weight tensor;
- ``explicit_full``: ``explicit_outer_product(full_sequence=True)``: the outer product of the M whole
  projected sequences (prod_m T_m r' entries per sample) contracted with the full weight tensor.

An explicit case whose big tensors exceed ``--max-explicit-elements`` is reported as "skipped (too
large)" instead of run. Times are wall-clock per pass (median and min of ``--repeats`` after
``--warmup``). Memory:

- ``peak_mib`` on CPU: the peak of live tensor storage during one extra forward+backward pass,
  counted at the operator level (a ``TorchDispatchMode`` that adds every new output storage and
  drops it when the storage is freed): activations, tensors saved for backward, temporaries
  returned by operators, gradients. Allocator overhead and scratch space inside a single kernel are
  not included; tensors that existed before the pass (inputs, parameters) are not counted.
- ``peak_mib`` on CUDA: ``torch.cuda.max_memory_allocated`` over the timed passes minus the memory
  allocated before them (tensors only, not the caching allocator's reserve).
- ``rss_mib`` (CPU only): every case runs in a fresh Python process; after the inputs and module
  exist, the peak-RSS mark is reset (``/proc/self/clear_refs``) and the RSS noted; the figure is the
  peak RSS (VmHWM) during the warm-up and timed passes minus that. It is what the process really
  took from the OS, so it also shows the allocator: glibc keeps freed mid-sized blocks, so it can be
  far above ``peak_mib`` (and not monotone in the sizes). Without the reset it falls back to
  ``ru_maxrss`` (marked ``rss-maxrss``; can under-read).

Writes ``<out>/wander_vs_outer.csv`` and ``.md`` (``benchmarks/results/`` is git-ignored) and
prints both. Example (small): ``python benchmarks/wander_vs_outer.py --modalities 2 3 --lengths 25 50``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mmrepro.methods.peft.wander import WanderAdapter, explicit_elements, explicit_outer_product, wander_param_count

METHODS = ("wander", "explicit", "explicit_full")
COLUMNS = ["device", "M", "T", "dims", "batch", "rank", "drank", "trank", "L", "h", "method", "status",
           "ms_median", "ms_min", "peak_mib", "rss_mib", "memory_measure", "explicit_elements", "adapter_params"]


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage created by operators while active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                ref = StorageWeakRef(st)
                old = self.live.get(ref.cdata)
                if old is not None and not old[0].expired():
                    continue  # a view of, or the same, storage
                if old is not None:
                    self.current -= old[1]
                self.live[ref.cdata] = (ref, st.nbytes())
                self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modalities", type=int, nargs="+", default=[2, 3, 4, 5], help="values of M (default 2 3 4 5)")
    p.add_argument("--lengths", type=int, nargs="+", default=[25, 50, 100],
                   help="sequence lengths T, the same for every modality (default 25 50 100)")
    p.add_argument("--dims", type=int, nargs="+", default=[32, 48, 64, 40, 56],
                   help="token width per modality, cycled over the M modalities (default 32 48 64 40 56)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--rank", type=int, default=8, help="down-projection width r (default 8)")
    p.add_argument("--drank", type=int, default=8, help="CP rank over features (default 8)")
    p.add_argument("--trank", type=int, default=8, help="low rank over the sequence dimension (default 8)")
    p.add_argument("--common-length", type=int, default=None, help="common length L (default: rank)")
    p.add_argument("--hidden", type=int, default=None, help="fused width h (default: rank)")
    p.add_argument("--append-one", action="store_true", help="append a constant 1 to each projected token (r' = r+1)")
    p.add_argument("--out-dim", type=int, default=None, help="output width F (default: sum of the token widths)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="what to measure (default all)")
    p.add_argument("--max-explicit-elements", type=float, default=5e7,
                   help="skip an explicit case whose outer-product and weight tensors exceed this many elements "
                        "(default 5e7, ~200 MB in float32 before the backward pass)")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes first (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes (default 5); median and min are reported")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when available")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="output folder (default benchmarks/results)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one CPU case, print JSON
    return p.parse_args(argv)


def _status_kb(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_case(case: dict) -> dict:
    """Build the adapter and inputs, then time ``warmup + repeats`` forward+backward passes."""
    device = torch.device(case["device"])
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    torch.manual_seed(case["seed"])
    M, T, B = case["M"], case["T"], case["batch"]
    dims = case["dims"]
    adapter = WanderAdapter(dims, [T] * M, case["out_dim"], rank=case["rank"], drank=case["drank"],
                            trank=case["trank"], common_length=case["L"], hidden=case["h"],
                            append_one=case["append_one"]).to(device)
    adapter.reset_parameters(zero_output=False)
    tokens = [torch.randn(B, T, d, device=device) for d in dims]
    valid = [torch.randint(T // 2, T + 1, (B,), device=device) for _ in dims]
    pads = [torch.arange(T, device=device)[None, :] >= v[:, None] for v in valid]
    if case["method"] == "wander":
        fn = lambda: adapter(tokens, pads)  # noqa: E731
    else:
        full = case["method"] == "explicit_full"
        fn = lambda: explicit_outer_product(adapter, tokens, pads, full_sequence=full)  # noqa: E731

    def step():
        adapter.zero_grad(set_to_none=True)
        fn().sum().backward()

    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        measure = "cuda-max-allocated"
    else:
        measure = "rss-hwm" if _reset_peak_rss() else "rss-maxrss"
        base = _status_kb("VmRSS")["VmRSS"] * 1024
    times = []
    try:
        for i in range(case["warmup"] + case["repeats"]):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if i >= case["warmup"]:
                times.append((time.perf_counter() - t0) * 1e3)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:  # RuntimeError: CPU allocation failures
        return {"status": f"failed ({type(e).__name__})", "memory_measure": measure}
    out = {"status": "ok", "ms_median": statistics.median(times), "ms_min": min(times), "memory_measure": measure}
    if cuda:
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return out
    rss = (_status_kb("VmHWM")["VmHWM"] * 1024 if measure == "rss-hwm"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out["rss_mib"] = max(rss - base, 0) / 2**20
    adapter.zero_grad(set_to_none=True)
    with PeakTensorMemory() as tracker:
        step()
    out["peak_mib"] = tracker.peak / 2**20
    out["memory_measure"] = "tensor-peak; " + measure
    return out


def run_isolated(case: dict) -> dict:
    """A CPU case in a fresh interpreter, so its peak RSS is its own."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"status": f"failed (exit {proc.returncode}: {tail[:80]})", "memory_measure": ""}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(v, nd=1):
    return f"{v:.{nd}f}" if isinstance(v, float) else ("" if v is None else str(v))


def to_markdown(rows: list[dict], header: str) -> str:
    cols = ["M", "T", "method", "status", "ms_median", "ms_min", "peak_mib", "rss_mib", "explicit_elements",
            "adapter_params"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) if c != "explicit_elements" or r.get(c) in (None, "")
                                       else f"{r[c]:.3g}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
        return
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    L, h = args.common_length or args.rank, args.hidden or args.rank
    width = args.rank + int(args.append_one)
    rows = []
    for M in args.modalities:
        dims = [args.dims[i % len(args.dims)] for i in range(M)]
        out_dim = args.out_dim or sum(dims)
        for T in args.lengths:
            for method in args.methods:
                elements = None
                if method != "wander":
                    elements = explicit_elements(width, [T] * M, batch=args.batch, trank=args.trank,
                                                 common_length=L, hidden=h, full_sequence=method == "explicit_full")
                case = dict(device=device, M=M, T=T, dims=dims, batch=args.batch, rank=args.rank, drank=args.drank,
                            trank=args.trank, L=L, h=h, append_one=args.append_one, out_dim=out_dim, method=method,
                            warmup=args.warmup, repeats=args.repeats, threads=args.threads, seed=args.seed)
                row = {k: case[k] for k in COLUMNS if k in case}
                row.update(dims="/".join(map(str, dims)), explicit_elements=elements,
                           adapter_params=wander_param_count(dims, [T] * M, out_dim, rank=args.rank, drank=args.drank,
                                                             trank=args.trank, common_length=L, hidden=h,
                                                             append_one=args.append_one))
                if elements is not None and elements > args.max_explicit_elements:
                    row.update(status="skipped (too large)")
                else:
                    row.update(run_isolated(case) if device == "cpu" else run_case(case))
                    if device == "cuda":
                        torch.cuda.empty_cache()
                print(f"M={M} T={T} {method:>13}: {row['status']} {fmt(row.get('ms_median'))} ms "
                      f"{fmt(row.get('peak_mib'))} MiB (rss {fmt(row.get('rss_mib'))})", file=sys.stderr, flush=True)
                rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    (args.out / "wander_vs_outer.csv").write_text(buf.getvalue())
    threads = args.threads or torch.get_num_threads()
    dev_name = (torch.cuda.get_device_name() if device == "cuda"
                else f"CPU ({platform.processor() or platform.machine()}, {threads} threads)")
    header = (f"# Wander vs explicit outer product: forward+backward\n\n{dev_name}; batch {args.batch}, "
              f"rank {args.rank}, "
              f"drank {args.drank}, trank {args.trank}, L {L}, h {h}, r' {width}; median/min of {args.repeats} passes "
              f"after {args.warmup} warm-up; peak_mib: "
              + ("CUDA max allocated over the passes minus allocated before" if device == "cuda" else
                 "peak live tensor storage in one pass (operator-level accounting); rss_mib: peak RSS during the "
                 "passes minus RSS before (fresh process per case, includes allocator retention)")
              + f"; explicit cases over {args.max_explicit_elements:.3g} elements are skipped.")
    md = to_markdown(rows, header)
    (args.out / "wander_vs_outer.md").write_text(md)
    print(buf.getvalue())
    print(md)


if __name__ == "__main__":
    main()
