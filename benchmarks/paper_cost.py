"""What the real paper grid costs: each distinct job type of config/paper.yaml run for a few optimizer steps
on full-shape stand-in data, multiplied out to CPU-hours per study and for the whole grid.

Job types come from the config through the project's grid functions (:func:`mmrepro.cost.job_types`:
study x data x backbone x method family, and kind: backbone, train or adapt). For each data file the
types read, ``mmrepro stand-in --scale full`` writes random files with the REAL per-sample shapes
(sequence lengths, widths, image and volume sizes) but only a share of the real samples, cut in
proportion in every split, as many as the measured steps need (full-scale stand-ins of every corpus
take ~17 GB and ~20 minutes). Steps per epoch, the store's size on disk and the passes over valid,
test and adaptation data are computed from the REAL sample counts, which the stand-in plan records.

Then, one process at a time (run it under ``nice``; 1 thread: what a job asks, ``resources.train.threads``):

1. ``convert``: each entry's make-data (``build_store``) in its own process: CPU seconds, grown
   linearly to the real counts, and peak RSS (a pickle loader's plus 1.3x the real store's extra bytes,
   the bound ``store_memory.py`` measured; a folder loader streams items, its peak is kept).
2. ``jobs``: one process per (study, dataset, backbone) runs, in order, the backbone and teachers a
   type needs and each type's first grid job for 1 + ``--steps`` optimizer steps (one epoch, the real
   batch size, model and method). Each step's CPU time is recorded (the progress bar of
   :func:`mmrepro.train.fit` is replaced by a timer); seconds per step = the mean of all but the first;
   the rest of the epoch is validation and the method's epoch-end work; the final evaluation and the
   fixed cost (setup, tracking, saving) come from the job's ``timings.json``. Times are CPU seconds (a
   wall phase times the share of a core the process got): on a shared machine, what a dedicated core
   would take. Peak memory: the process's ``VmHWM`` reset before each job (torch and the process
   included). Two kinds of job do not fit beside other work here at their real batch: BraTS's 2-D model
   at batch 64 and CASP's early-fusion backbone (one encoder over 925 steps of MOSI and MOSEI) at 24.
   They, and every adaptation (its model runs on several views of a batch at once), run at a smaller
   ladder of batches (:data:`LADDERS`, ``--ladder``; an adapter that batches the target itself too), and
   step time and memory are extrapolated linearly to the real batch (an adaptation's passes: their
   CPU time at the larger rung, memory along the two rungs).

One job's projection (:func:`mmrepro.cost.job_seconds`): epochs x (steps per epoch x seconds per
step + the epoch's other work grown to the real counts) + the final evaluation grown + fixed cost +
the process start-up. Summed over every job of the grid (seeds, settings, emotion views, search
trials) it gives CPU-hours per study and for the grid. GPU: not measured unless run on one.

Writes ``results_rehearsal/tables/cost.md`` and ``cost.csv`` (one row per job type), ``make_data.csv``
and ``requests.md`` (each type's need against its rule's request, :mod:`mmrepro.resources`, and a
``resources.datasets`` block covering them); ``--record`` copies the CSVs to ``benchmarks/measured/``.
``--only balance/mosi_mult`` (repeatable) measures part of the grid; groups measured before in
``--work`` are kept, and the table covers all of them (types never measured are estimated from the
measured ones, and say so). Example: ``nice -n 10 python benchmarks/paper_cost.py --only missing/mosi_mult``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import inspect
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))   # paper_cost_report, results_table

CONFIGS = [REPO / "config" / "config.yaml", REPO / "config" / "paper.yaml"]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
MEASURED = REPO / "benchmarks" / "measured"
GPU_COLUMN = "not measured (no GPU lent this session)"


# --- planning ------------------------------------------------------------------------------------

def load_config(extra: list[Path] = ()) -> dict[str, Any]:
    from mmrepro.config import load_schema, read_config_files, validate_config

    return validate_config(read_config_files([*CONFIGS, *extra]), load_schema(SCHEMA))


def selected(types, only: list[str]) -> list:
    """Types whose study/dataset (of their first job) matches one of ``only`` (``study`` or ``study/dataset``)."""
    if not only:
        return types
    keep = []
    for t in types:
        names = {t.study, f"{t.study}/{t.first['dataset']}", f"{t.study}/{t.dataset}"}
        if names & set(only):
            keep.append(t)
    if not keep:
        raise SystemExit(f"--only {only}: no job type matches (give study or study/dataset)")
    return keep


#: the batch sizes a job is measured at when its real batch does not fit beside other work on this
#: machine, by the data's loader, the model's backbone or the job's kind (BraTS's 2-D model at batch 64;
#: CASP's early fusion attends over every step of all modalities at once: 925 on MOSI and MOSEI, passed
#: 6 GB at 24; an adaptation runs its model on several views of a batch at once: MOSI's late-fusion
#: norm_view_consistency passed 7 GB at 24)
LADDERS: dict[str, list[int]] = {"brats": [2, 4], "casp_early": [6, 12], "adapt": [6, 12]}


def ladder_of(config: dict[str, Any], kind: str, run: dict[str, Any], ladders: dict[str, list[int]]) -> list[int] | None:
    """The ladder a job (``run`` with the ``data`` it reads) runs at (by its loader, else its backbone,
    else its kind), or None: its real batch. A job run only to feed a measured one runs once, at the first rung."""
    loader = config["datasets"][run["data"]]["loader"]
    return ladders.get(loader) or ladders.get(job_spec(config, kind, run).model.backbone) or ladders.get(kind)


def at_batch(spec, batch: int):
    """``spec`` at ``batch``: its training batch and, where its test-time adapter batches the target itself
    (an offline one: CASP's 24, the updating baselines' 64), the adapter's batch too."""
    from mmrepro.methods.registry import ADAPTERS

    params = spec.method_params
    name = spec.plan.adapter
    if name and any("batch_size" in inspect.signature(c.__init__).parameters
                    for c in ADAPTERS.get(name).__mro__ if "__init__" in vars(c)):
        params = {**params, name: {**params.get(name, {}), "batch_size": batch}}
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, batch_size=batch), method_params=params)


def measured_batch(config: dict[str, Any], t, ladders: dict[str, list[int]]) -> list[int]:
    """The batch sizes a type is measured at: its real one, or its smaller ladder."""
    ladder = ladder_of(config, t.kind, t.first, ladders)
    return list(ladder) if ladder else [job_spec(config, t.kind, t.first).train.batch_size]


def job_spec(config: dict[str, Any], kind: str, run: dict[str, Any]):
    from mmrepro.config import backbone_spec, run_spec

    if kind == "backbone":
        return backbone_spec(config, run["study"], run["dataset"], run["seed"], run.get("backbone"))
    return run_spec(config, run["study"], run["dataset"], run["method"], run["setting"], run["seed"],
                    run.get("backbone"))


def real_train_samples(loader: str, rel: str) -> int:
    """The real training samples behind a raw path (the stand-in plan's counts; a lower share where the
    converter carves validation or folds out of them), to size the cut."""
    from mmrepro.data.iemocap_h5 import IEMOCAP_4CLASS_TOTALS
    from mmrepro.data.standin import food, sequences, volumes

    if loader == "mmsa":
        return sequences.release_of(rel, sequences.MMSA_RELEASES, "MMSA").counts["train"]
    if loader == "mult":
        return sequences.release_of(rel, sequences.MULT_RELEASES, "MulT").counts["train"]
    if loader == "iemocap_h5":
        return int(0.6 * sum(IEMOCAP_4CLASS_TOTALS.values()))
    if loader == "food101":
        return int(0.9 * food.REAL["train"])
    if loader == "brats":
        return int(0.7 * volumes.REAL_CASES)
    raise ValueError(f"no stand-in for loader {loader!r}")


#: the fewest training samples a stand-in may hold (Food-101: 6 per class for the converter's carve)
MIN_TRAIN = {"food101": 6 * 101, "brats": 10}


# --- processes and memory ------------------------------------------------------------------------

def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far: on a shared machine, what a dedicated core would take."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def status_kb(pid: int | str = "self") -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def run_child(args: list[str], max_rss_gb: float, log: Path) -> tuple[int, float, float, bool]:
    """Run this script as a child (``args``; it inherits this process's nice); return (exit code, seconds, peak RSS MB, stopped).
    A child past ``max_rss_gb`` is stopped, so the shared machine keeps its memory."""
    began = time.perf_counter()
    with open(log, "a") as f:
        child = subprocess.Popen([sys.executable, __file__, *args], stdout=f, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    stopped = False
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        try:
            if status_kb(child.pid)["VmRSS"] > max_rss_gb * 2**20 and not stopped:
                stopped = True
                os.kill(child.pid, signal.SIGKILL)
        except (OSError, KeyError):
            pass
        time.sleep(0.2)
    code = os.waitstatus_to_exitcode(status)
    return code, time.perf_counter() - began, usage.ru_maxrss / 1024, stopped


# --- the child processes -------------------------------------------------------------------------

def child_convert(work: Path, name: str) -> None:
    """make-data of one entry (as its rule runs it): the store under WORK/data/NAME."""
    from mmrepro.config import dataset_spec
    from mmrepro.data import build_store

    import torch

    torch.set_num_threads(1)   # make_data's threads: 1
    config = load_config([work / "overlay.yaml"])
    before = status_kb()
    began, cpu = time.perf_counter(), cpu_seconds()
    build_store(name, dataset_spec(config, name), work / "data" / name)
    seconds, cpu = time.perf_counter() - began, cpu_seconds() - cpu
    (work / "data" / name / "convert.json").write_text(json.dumps(
        {"seconds": seconds, "cpu_s": cpu, "rss_before_mb": before["VmRSS"] / 1024,
         "peak_mb": status_kb()["VmHWM"] / 1024}))


def _reset_peak() -> None:
    """Start a job's peak afresh: what the jobs before it freed is handed back to the system first (glibc
    keeps freed heap pages mapped: a backbone's 3 GB of activations stayed in the RSS of the adaptations
    after it), so each job's peak is about what it would be in a process of its own."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


STEP_CPU: list[float] = []


def timed(iterable, *args, **kwargs):
    """Stands in for mmrepro.train's progress bar: the CPU time from one batch to the next is one optimizer
    step (loading the batch included), recorded in STEP_CPU."""
    last = cpu_seconds()
    for item in iterable:
        yield item
        now = cpu_seconds()
        STEP_CPU.append(now - last)
        last = now


def child_jobs(work: Path, tasks_file: Path) -> None:
    """Run a group's tasks in order; append one JSON line per measured execution to its results file."""
    import torch

    import mmrepro.train
    from mmrepro.config import teacher_runs
    from mmrepro.jobs import adapt_job, train_job

    mmrepro.train.tqdm = timed

    config = load_config([work / "overlay.yaml"])
    group = json.loads(tasks_file.read_text())
    results = tasks_file.with_suffix(".jsonl")
    made: dict[str, Path] = {}   # "kind:json(run)" -> its run folder (model.pt, feature_stats.pt)

    def store(dataset: str) -> Path:
        return work / "data" / dataset / "manifest.json"

    def execute(task: dict[str, Any], steps: int | None, batch: int | None) -> Path:
        kind, run = task["kind"], task["run"]
        spec = job_spec(config, kind, run)
        spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, epochs=1, patience=1, max_steps=steps))
        spec = at_batch(spec, batch) if batch else spec
        out = work / "runs" / task["name"] / f"steps{steps}_batch{batch}"
        if kind == "adapt":
            start = made[f"backbone:{json.dumps(start_of(config, run), sort_keys=True)}"]
            adapt_job(spec, store(run["data"]), start / "model.pt", out, 1, source_stats=start / "feature_stats.pt")
            return out
        init = None
        if kind == "train" and spec.checkpoint is not None:
            init = made[f"backbone:{json.dumps(start_of(config, run), sort_keys=True)}"] / "model.pt"
        teachers = {} if kind == "backbone" else {
            m: made[f"train:{json.dumps({**r, 'data': run['dataset']}, sort_keys=True)}"] / "model.pt"
            for m, r in teacher_runs(config, run["study"], run["dataset"], run["method"], run["seed"]).items()}
        train_job(spec, store(run["data"]), out, 1, init=init, teachers=teachers or None)
        return out

    from mmrepro.phases import process_age

    with open(results, "a") as f:   # start-up (interpreter and imports), which every job pays once
        f.write(json.dumps({"startup_s": process_age(), "startup_cpu_s": cpu_seconds()}) + "\n")
    for task in group["tasks"]:
        ladder = task.get("batches") or [None]
        for batch in ladder:
            for steps in ([None] if task["kind"] == "adapt" else [1 + group["steps"]] if task["measure"] else [1]):
                if not task["measure"] and batch != ladder[0]:
                    continue
                STEP_CPU.clear()
                _reset_peak()
                before = status_kb()["VmRSS"]
                began, cpu = time.perf_counter(), cpu_seconds()
                error = None
                try:
                    out = execute(task, steps, batch)
                    made[f"{task['kind']}:{json.dumps(task['run'], sort_keys=True)}"] = out
                except Exception as e:  # a job that fails is a row that says so, not a lost benchmark
                    error, out = f"{type(e).__name__}: {e}", None
                seconds, cpu = time.perf_counter() - began, cpu_seconds() - cpu
                peak = status_kb()["VmHWM"] / 1024
                if task["measure"]:
                    timings = json.loads((out / "timings.json").read_text()) if out else {}
                    with open(results, "a") as f:
                        f.write(json.dumps({"name": task["name"], "steps": steps, "batch": batch, "seconds": seconds, "cpu_s": cpu, "step_cpu": STEP_CPU,
                                            "peak_mb": peak, "rss_before_mb": before / 1024, "timings": timings,
                                            "error": error}) + "\n")
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
    with open(results, "a") as f:   # the group is complete: a later run of the benchmark keeps it
        f.write(json.dumps({"done": True}) + "\n")


def start_of(config: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """The backbone start a finetune/adapt run needs (as backbone_runs writes it), with the data it trains on."""
    from mmrepro.config import backbone_source

    start = {k: run[k] for k in ("study", "dataset", "seed", "backbone") if k in run}
    return {**start, "data": backbone_source(config, run["study"], run["dataset"])}


# --- the parent: plan, stand-ins, conversions, groups, projection -------------------------------

def write_stand_ins(config: dict[str, Any], groups: dict[str, dict[str, Any]], work: Path) -> None:
    """Full-shape stand-ins of every raw path the tasks read, cut to what the measured steps need; then
    WORK/overlay.yaml pointing the entries at them (results, data and tracking under WORK)."""
    import yaml

    from mmrepro.data.standin import MANIFEST, Scale, generate
    from mmrepro.data.standin.generate import overlay

    need: dict[str, tuple[str, int]] = {}   # raw path -> (an entry reading it, training samples needed)
    for group in groups.values():
        for task in group["tasks"]:
            dataset = task["run"]["data"]
            entry = config["datasets"][dataset]
            batch = max(task["batches"] or [job_spec(config, task["kind"], task["run"]).train.batch_size])
            n = max((1 + group["steps"]) * batch + batch // 2, MIN_TRAIN.get(entry["loader"], 0))
            need[entry["path"]] = (dataset, max(n, need.get(entry["path"], ("", 0))[1]))
    root = work / "standin"
    fractions_file = work / "fractions.json"
    fractions = json.loads(fractions_file.read_text()) if fractions_file.is_file() else {}
    for rel, (dataset, n) in need.items():
        entry = config["datasets"][dataset]
        fraction = min(1.0, n / real_train_samples(entry["loader"], rel))
        if fractions.get(rel, 0) >= fraction:
            continue
        print(f"stand-in {rel}: {fraction:.2%} of the real samples, full shapes", flush=True)
        generate(config["datasets"], root, Scale("full", None, progress=False, fraction=fraction),
                 [d for d, e in config["datasets"].items() if e.get("path") == rel])
        fractions[rel] = fraction
        fractions_file.write_text(json.dumps(fractions, indent=1))
    fragment = overlay(json.loads((root / MANIFEST).read_text()))
    fragment.update(results=str(work / "results"), data_root=str(root), tracking={"mode": "deferred"})
    tmp = work / f"overlay.{os.getpid()}.yaml"   # replaced whole: a child reading it never sees half
    tmp.write_text(yaml.safe_dump(fragment, sort_keys=False))
    os.replace(tmp, work / "overlay.yaml")


def plan_groups(config: dict[str, Any], types, steps: int, ladders: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    """Per (study, dataset, backbone) of the types' first jobs: the tasks in order (backbone, teachers,
    then each type's first job, measured)."""
    from mmrepro.config import STUDY_KINDS, teacher_runs

    groups: dict[str, dict[str, Any]] = {}
    backbone_first = {json.dumps(t.first, sort_keys=True): t for t in types if t.kind == "backbone"}
    for t in types:
        run = t.first
        name = "_".join(str(p) for p in (run["study"], run["dataset"], run.get("backbone")) if p)
        group = groups.setdefault(name, {"steps": steps, "tasks": [], "names": set()})

        def add(kind: str, task_run: dict[str, Any], measure: str | None, batches=None) -> None:
            key = f"{kind}:{json.dumps(task_run, sort_keys=True)}"
            if key in group["names"]:
                return
            group["names"].add(key)
            group["tasks"].append({"kind": kind, "run": task_run, "measure": measure, "batches": batches,
                                   "name": measure or f"dep_{len(group['tasks'])}_{name}"})

        if t.kind == "backbone" or STUDY_KINDS[t.study] != "train":
            start = start_of(config, run)
            measured = backbone_first.get(json.dumps(start, sort_keys=True))
            add("backbone", start, measured.key.replace("/", "__") if measured else None,
                measured_batch(config, measured, ladders) if measured else ladder_of(config, "backbone", start, ladders))
            if t.kind == "backbone":
                continue
        for r in teacher_runs(config, run["study"], run["dataset"], run["method"], run["seed"]).values():
            teacher = {**r, "data": run["dataset"]}
            add("train", teacher, None, ladder_of(config, "train", teacher, ladders))
        add(t.kind, run, t.key.replace("/", "__"), measured_batch(config, t, ladders))
    for g in groups.values():
        g.pop("names")
    return groups


def complete(results: Path) -> bool:
    """Whether a group's results file was finished (its process wrote the closing line) without a failed job."""
    text = results.read_text() if results.is_file() else ""
    return '"done": true' in text and '"error": "' not in text


def on_a_ladder(group: dict[str, Any]) -> int:
    """How many of a group's jobs do not fit at their real batch (the slowest and largest to measure): the
    groups with most go last."""
    return sum(len(t["batches"] or []) > 1 for t in group["tasks"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], metavar="STUDY[/DATASET]",
                   help="measure only these job types (by their first job's study/dataset); repeatable")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps measured beyond the first (default 2)")
    p.add_argument("--ladder", nargs=3, action="append", default=[], metavar=("LOADER|BACKBONE", "B1", "B2"),
                   help="measure the jobs of this loader or backbone at batches B1 and B2 and extrapolate "
                        f"linearly to the real batch (repeatable; default {LADDERS})")
    p.add_argument("--max-rss-gb", type=float, default=12.0, help="stop a child past this resident memory")
    p.add_argument("--work", type=Path, default=REPO / "results_rehearsal" / "cost",
                   help="stand-ins, stores and runs (kept, so parts can be measured in turn)")
    p.add_argument("--out", type=Path, default=REPO / "results_rehearsal" / "tables")
    p.add_argument("--report-only", action="store_true", help="write the table from the measurements in --work")
    p.add_argument("--record", action="store_true",
                   help="also copy cost.csv and make_data.csv to benchmarks/measured/ (what tests/test_cost.py checks "
                        "config/paper.yaml's requests against)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        what, work, arg = args.child
        (child_convert if what == "convert" else child_jobs)(Path(work), arg if what == "convert" else Path(arg))
        return 0
    from mmrepro.cost import job_types

    args.work.mkdir(parents=True, exist_ok=True)
    config = load_config()
    types = selected(job_types(config), args.only)
    log = args.work / "children.log"

    def note_load() -> None:   # the machine's load over every part of the measurement, for the table's caption
        with open(args.work / "load.jsonl", "a") as f:
            f.write(json.dumps(os.getloadavg()[0]) + "\n")

    note_load()
    if not args.report_only:
        ladders = {**LADDERS, **{name: [int(b1), int(b2)] for name, b1, b2 in args.ladder}}
        groups = plan_groups(config, types, args.steps, ladders)
        write_stand_ins(config, groups, args.work)
        datasets = sorted({task["run"]["data"] for g in groups.values() for task in g["tasks"]})
        for name in datasets:
            if (args.work / "data" / name / "convert.json").is_file():
                continue
            code, seconds, peak, stopped = run_child(["--child", "convert", str(args.work), name], args.max_rss_gb, log)
            print(f"convert {name}: exit {code}, {seconds:.0f} s, peak {peak:.0f} MB{' (stopped)' if stopped else ''}",
                  flush=True)
            note_load()
        for name, group in sorted(groups.items(), key=lambda g: on_a_ladder(g[1])):
            tasks = args.work / "groups" / f"{name}.json"
            tasks.parent.mkdir(parents=True, exist_ok=True)
            if complete(tasks.with_suffix(".jsonl")) and json.loads(tasks.read_text()) == group:
                print(f"jobs {name}: measured before, kept", flush=True)
                continue
            tasks.with_suffix(".jsonl").unlink(missing_ok=True)
            tasks.write_text(json.dumps(group, indent=1))
            code, seconds, peak, stopped = run_child(["--child", "jobs", str(args.work), str(tasks)], args.max_rss_gb, log)
            print(f"jobs {name}: exit {code}, {seconds:.0f} s, peak {peak:.0f} MB{' (stopped)' if stopped else ''}",
                  flush=True)
            note_load()
    from paper_cost_report import report

    load = [json.loads(line) for line in (args.work / "load.jsonl").read_text().split()]
    print(report(load_config([args.work / "overlay.yaml"]), job_types(load_config()), args.work, args.out, load,
                 GPU_COLUMN))
    if args.record:
        MEASURED.mkdir(exist_ok=True)
        shutil.copy(args.out / "cost.csv", MEASURED / "paper_cost.csv")
        shutil.copy(args.out / "make_data.csv", MEASURED / "paper_make_data.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
