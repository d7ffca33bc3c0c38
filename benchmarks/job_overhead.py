"""Fixed cost vs compute of each kind of pipeline job, run exactly as its Snakemake rule runs it.

A job's fixed cost is everything that is not its real work: starting Python and importing, opening
the store and building the model and plug-ins (``setup``), opening the tracking run, writing files
and logging them (``finish``). Its compute is training, evaluation or adaptation. Each job writes
``timings.json`` (:mod:`mmrepro.phases`); this script runs one job of every rule of the given
config as a subprocess of the ``mmrepro`` CLI, measures its wall time from outside, and splits it
with those phases. The sqlite default logs runs after the jobs (``tracking.mode: auto`` ->
deferred); ``--modes deferred live`` shows what logging each job live to sqlite would cost.

Writes ``<out>/job_overhead.csv`` and ``.md`` (``benchmarks/results/`` is git-ignored) and prints
the table. Example: ``python benchmarks/job_overhead.py --threads 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from results_table import write_results

from mmrepro.config import backbone_spec, load_schema, merge_config, run_spec, study_grid, validate_config

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["rule", "job", "mode", "wall_s", "compute_s", "fixed_s", "startup_s", "setup_s", "tracking_s",
           "finish_s"]


def mmrepro(*args: str, threads: int) -> float:
    """Run one CLI verb as a rule does; return its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mmrepro.cli", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"mmrepro {args[0]} failed:\n{done.stderr[-3000:]}")
    return wall


def row(rule: str, job: str, mode: str, wall: float, out_dir: Path | None) -> dict:
    """A job's wall time split into compute and fixed cost (from its timings.json when it has one)."""
    phases = json.loads((out_dir / "timings.json").read_text()) if out_dir else {}
    compute = sum(phases.get(k, 0.0) for k in ("train", "evaluate", "adapt"))
    return {"rule": rule, "job": job, "mode": mode, "wall_s": round(wall, 2), "compute_s": round(compute, 2),
            "fixed_s": round(wall - compute, 2),
            **{f"{k}_s": round(phases[k], 2) if k in phases else "" for k in ("startup", "setup", "tracking", "finish")}}


def first(config: dict, study: str) -> dict:
    return study_grid(config, study)[0]


def run_all(config: dict, work: Path, modes: list[str], threads: int) -> list[dict]:
    results = work / "results"
    config["results"] = str(results)
    store = results / "data" / "synth" / "manifest.json"
    rows = []
    spec = json.dumps(config["datasets"]["synth"])
    rows.append(row("make_data", "synth", "-", mmrepro("make-data", "--dataset", "synth", "--spec", spec, "--out",
                                                       str(store), threads=threads), None))
    rows.append(row("init_tracking", "-", "-", mmrepro("init-tracking", "--results", str(results), "--out",
                                                       str(results / "tracking" / "experiments.json"),
                                                       threads=threads), None))
    for mode in modes:
        config["tracking"]["mode"] = mode
        for study in config["studies"]:
            run = first(config, study)
            name = f"{study}/{run['method']}/{run['setting']}/seed{run['seed']}"
            init: list[str] = []
            if study in ("peft", "shift"):
                bb = backbone_spec(config, study, run["dataset"], run["seed"])
                out = results / mode / "backbones" / study
                wall = mmrepro("train", "--spec", json.dumps(bb), "--data", str(store), "--out-dir", str(out),
                               "--threads", str(threads), threads=threads)
                rows.append(row("backbone", f"for-{study}", mode, wall, out))
                init = ["--init", str(out / "model.pt")] if study == "peft" else ["--model", str(out / "model.pt")]
            spec = json.dumps(run_spec(config, **run))
            out = results / mode / study
            verb = "adapt" if study == "shift" else "train"
            wall = mmrepro(verb, "--spec", spec, "--data", str(store), "--out-dir", str(out), *init,
                           "--threads", str(threads), threads=threads)
            rows.append(row("adapt" if verb == "adapt" else "train", name, mode, wall, out))
    runs = sorted(str(p) for p in (results / "deferred").rglob("metrics.json")) if "deferred" in modes else []
    if runs:
        wall = mmrepro("track", "--results", str(results), "--out", str(results / "tracking" / "deferred.json"),
                       *runs, threads=threads)
        rows.append(row("track", f"{len(runs)} runs", "deferred", wall, None))
        wall = mmrepro("report", "--table", str(work / "table"), "--plot", str(work / "plot"), *runs, threads=threads)
        rows.append(row("report", f"{len(runs)} runs", "-", wall, None))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=[str(REPO / "config" / "config.yaml")],
                   help="config file(s), layered as Snakemake layers --configfile (default: the default config)")
    p.add_argument("--modes", nargs="+", default=["deferred", "live"], choices=["deferred", "live"],
                   help="tracking modes to time the training jobs under")
    p.add_argument("--threads", type=int, default=1, help="threads per job (the default config's rules use 1)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for the CSV and Markdown")
    args = p.parse_args(argv)
    config: dict = {}
    for path in args.config:
        merge_config(config, yaml.safe_load(Path(path).read_text()) or {})
    validate_config(config, load_schema(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_all(config, Path(tmp), args.modes, args.threads)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(write_results(rows, COLUMNS, args.out, "job_overhead", f"Job overhead ({machine}; threads per job {args.threads})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
