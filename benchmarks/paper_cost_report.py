"""The cost table of ``paper_cost.py``: its measurements in ``--work`` multiplied out to the real grid.

One row per job type (measured or not: a type ``--only`` left out says so and is not in the sums),
CPU-hours per study and for the grid, the make-data jobs, and each type's need against the request
of its rule (:mod:`mmrepro.resources`). Writes ``<out>/cost.md``, ``cost.csv``, ``requests.md``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from results_table import markdown

from mmrepro.config import backbone_spec, run_spec
from mmrepro.cost import StepCost, job_seconds, steps_per_epoch
from mmrepro.resources import data_resources, train_resources

CONVERT_PEAK_OVER_ARRAYS = 1.3   # benchmarks/store_memory.py: conversion peak <= 1.3x the store's arrays
#: converters that read one pickle (its arrays all in memory at once); the folder loaders (images, volumes,
#: HDF5) write each item into memory-mapped scratch files as they go, a working set that does not grow
WHOLE_FILE_LOADERS = ("mmsa", "mult")
COLUMNS = ["type", "jobs", "batch", "epochs", "real_train", "steps_per_epoch", "s_per_step", "s_per_epoch",
           "job_h", "cpu_h", "peak_rss_mb", "store_gb", "gpu", "note"]
ROW_KEYS = ["estimated_cpu_h"]
CSV_COLUMNS = ["type", "kind", "study", "dataset", "setting", "data", "jobs", "batch", "epochs", "real_train",
               "steps_per_epoch", "s_per_step", "s_per_epoch", "job_min", "cpu_h", "estimated_cpu_h", "peak_rss_mb", "store_gb", "note"]


def on_cpu(execution: dict[str, Any]) -> dict[str, float]:
    """An execution's phases in CPU seconds: each wall phase times the share of a core the process got
    (its CPU time over its wall time), so a loaded machine's waits do not count; ``total`` is its CPU time."""
    share = execution["cpu_s"] / execution["seconds"] if execution.get("cpu_s") else 1.0
    phases = {k: v * share for k, v in execution["timings"].items() if k in ("train", "evaluate", "adapt")}
    return {**phases, "total": execution.get("cpu_s", execution["seconds"])}


def measurements(work: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """Per measured task name: its executions; and per name, its process's start-up seconds."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    startup: dict[str, float] = {}
    for path in sorted((work / "groups").glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        first = next((r for r in lines if "startup_s" in r), {})
        start = first.get("startup_cpu_s", first.get("startup_s", 0.0))
        for r in lines:
            if "name" in r:
                runs[r["name"]].append(r)
                startup[r["name"]] = start
    return runs, startup


def data_counts(work: Path, entry: str) -> dict[str, Any]:
    """What the stand-in and the store of ``entry`` hold: growth factor to the real counts, store n and bytes."""
    manifest = json.loads((work / "standin" / "stand_in.json").read_text())
    counts = manifest["paths"][manifest["datasets"][entry]]["counts"]
    written, real = sum(counts["written"].values()), sum(counts["real"].values())
    store = json.loads((work / "data" / entry / "manifest.json").read_text())["splits"]
    return {"grow": real / written, "written": written, "real": real, "train": store["train"]["n"],
            "store_bytes": sum(a["bytes"] for s in store.values() for a in s["arrays"].values())}


def spec_of(config: dict[str, Any], t) -> Any:
    run = t.first
    if t.kind == "backbone":
        return backbone_spec(config, run["study"], run["dataset"], run["seed"], run.get("backbone"))
    return run_spec(config, run["study"], run["dataset"], run["method"], run["setting"], run["seed"], run.get("backbone"))


def estimate(rows: list[dict[str, Any]]) -> None:
    """Fill ``estimated_cpu_h`` of each unmeasured row: its jobs x the mean job of the measured rows of the
    same kind, study and data, else of the same kind and study (said in its note)."""
    def mean_job(match) -> float | None:
        hours = [r["job_h"] for r in rows if r["job_h"] != "" and match(r)]
        return sum(hours) / len(hours) if hours else None

    for r in rows:
        if r["cpu_h"] != "":
            continue
        same_data = mean_job(lambda m: (m["kind"], m["study"], m["data"]) == (r["kind"], r["study"], r["data"]))
        same_study = mean_job(lambda m: (m["kind"], m["study"]) == (r["kind"], r["study"]))
        job, basis = ((same_data, f"{r['kind']} types on {r['data']}") if same_data is not None
                      else (same_study, f"{r['kind']} types of {r['study']}"))
        if job is not None:
            r["estimated_cpu_h"] = round(job * r["jobs"], 1)
            r["note"] = f"{r['note']}; estimated {r['estimated_cpu_h']} CPU-h from the mean measured {basis}"


def per_batch_costs(execs: list[dict[str, Any]], startup: float) -> tuple[dict[int, tuple], float]:
    """Per measured batch size: (s per step, rest of the epoch, final evaluation, peak MB, note);
    and the fixed seconds of a job (setup, tracking, saving, start-up). Raises on a failed execution."""
    errors = [e["error"] for e in execs if e["error"]]
    if errors:
        raise RuntimeError(errors[0])
    cpu = [on_cpu(e) for e in execs]
    fixed = [c["total"] - c["train"] - c["evaluate"] + startup for c in cpu]
    by_batch: dict[int, dict[int, tuple[dict[str, Any], dict[str, float]]]] = defaultdict(dict)
    for e, c in zip(execs, cpu):
        by_batch[e["batch"]][e["steps"]] = (e, c)
    per_batch = {}
    for batch, runs in by_batch.items():
        e, c = runs[max(runs)]
        if e.get("step_cpu"):   # each step's CPU time recorded: the first (warm-up) left out
            steps = e["step_cpu"][1:] or e["step_cpu"]
            step = sum(steps) / len(steps)
            per_batch[batch] = (step, max(0.0, c["train"] - sum(e["step_cpu"])), c["evaluate"], e["peak_mb"], "")
            continue
        (one, one_cpu), (more, more_cpu) = runs[1], runs[max(runs)]
        step = (more_cpu["train"] - one_cpu["train"]) / (more["steps"] - 1)
        note = ""
        if step <= 0:   # a noisy difference on a loaded machine: the mean step of the longer run instead
            step, note = more_cpu["train"] / more["steps"], "step from the mean (difference <= 0)"
        per_batch[batch] = (step, max(0.0, one_cpu["train"] - step), one_cpu["evaluate"],
                            max(one["peak_mb"], more["peak_mb"]), note)
    return per_batch, sum(fixed) / len(fixed)


def along_ladder(peaks: dict[int, float], real_batch: int) -> tuple[float, str]:
    """Peak memory at the real batch from the two smallest-to-largest measured rungs (linear in the batch:
    activations grow with it, the process and model do not); one rung: its own peak."""
    if len(peaks) < 2:
        return next(iter(peaks.values())), ""
    b1, b2 = min(peaks), max(peaks)
    p1, p2 = peaks[b1], peaks[b2]
    return (p2 + max(0.0, p2 - p1) * (real_batch - b2) / (b2 - b1),
            f"measured at batch {b1} and {b2}, extrapolated linearly to {real_batch}")


def type_row(config: dict[str, Any], t, execs, startup: float, work: Path) -> dict[str, Any]:
    spec = spec_of(config, t)
    run = t.first
    row = {**dict.fromkeys(CSV_COLUMNS + COLUMNS + ROW_KEYS, ""), "type": t.key, "kind": t.kind, "study": t.study, "dataset": run["dataset"], "setting": run.get("setting", ""),
           "data": t.dataset, "jobs": len(t.runs), "batch": spec.train.batch_size, "gpu": "", "note": ""}
    if not execs:
        return {**row, "note": "not measured (left out by --only, or its measurement did not finish)"}
    data = data_counts(work, t.dataset)
    real_train = round(data["train"] * data["grow"])
    row.update(real_train=real_train, store_gb=round(data["store_bytes"] * data["grow"] / 1e9, 2))
    rungs = sorted({x["batch"] for x in execs if not x["error"] and x["batch"]})
    if len(rungs) == 1 and rungs[0] != spec.train.batch_size:   # a ladder cut short: nothing to extrapolate along
        return {**row, "note": f"not measured: only the ladder's batch {rungs[0]} finished"}
    if t.kind == "adapt":
        e = [x for x in execs if not x["error"]]
        if not e:
            return {**row, "note": f"FAILED: {execs[0]['error']}"}
        top = max(e, key=lambda x: x["batch"] or 0)   # a ladder's larger rung: the passes' CPU time
        c = on_cpu(top)
        cost = StepCost(0.0, 0.0, c["adapt"], c["total"] - c["adapt"] + startup, data["written"])
        seconds = job_seconds(cost, data["real"], 0, 0)
        peak, ladder = along_ladder({x["batch"]: x["peak_mb"] for x in e}, spec.train.batch_size)
        row.update(epochs=0, steps_per_epoch=0, s_per_step="", s_per_epoch="", peak_rss_mb=round(peak),
                   note="; ".join(n for n in ("test-time adaptation: passes over the target grown to its real "
                                               "counts", ladder and f"{ladder} (memory; CPU time of the passes "
                                               "at the larger batch)") if n))
    else:
        try:
            per_batch, fixed = per_batch_costs(execs, startup)
        except RuntimeError as err:
            return {**row, "note": f"FAILED: {err}"}
        batches = sorted(per_batch)
        real_batch = spec.train.batch_size
        step, extra, final, peak, note = per_batch[batches[-1]]
        if len(batches) > 1:   # a ladder (BraTS, CASP's early fusion): linear in the batch, to the real one
            b2 = batches[-1]
            step = per_batch[b2][0] * real_batch / b2
            peak, ladder = along_ladder({b: per_batch[b][3] for b in batches}, real_batch)
            note = f"{ladder} (step time x {real_batch}/{b2}, memory along the two points)"
        epochs = spec.train.epochs
        steps = steps_per_epoch(real_train, real_batch)
        cost = StepCost(step, extra, final, fixed, data["written"])
        seconds = job_seconds(cost, data["real"], epochs, steps)
        row.update(epochs=epochs, steps_per_epoch=steps, s_per_step=round(step, 2),
                   s_per_epoch=round(steps * step + extra * data["grow"], 1), peak_rss_mb=round(peak), note=note)
    row.update(job_h=round(seconds / 3600, 2), job_min=math.ceil(seconds / 60),
               cpu_h=round(seconds * len(t.runs) / 3600, 1))
    return row


def convert_rows(config: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    rows = []
    for folder in sorted((work / "data").glob("*/convert.json")):
        entry = folder.parent.name
        measured = json.loads(folder.read_text())
        data = data_counts(work, entry)
        loader = config["datasets"][entry]["loader"]
        peak = measured["peak_mb"]
        if loader in WHOLE_FILE_LOADERS:   # the whole corpus passes through memory: grows with it
            peak += CONVERT_PEAK_OVER_ARRAYS * data["store_bytes"] * (data["grow"] - 1) / 2**20
        request = data_resources(config, entry)
        minutes = math.ceil(measured.get("cpu_s", measured["seconds"]) * data["grow"] / 60)
        rows.append({"entry": entry, "loader": loader,
                     "measured_s": round(measured.get("cpu_s", measured["seconds"]), 1), "measured_peak_mb": round(measured["peak_mb"]),
                     "real_min": minutes, "real_peak_mb": round(peak), "store_gb": round(data["store_bytes"] * data["grow"] / 1e9, 2),
                     "request_mem_mb": request["mem_mb"], "request_runtime": request["runtime"],
                     "clock": "cpu" if "cpu_s" in measured else "wall (loaded: upper bound)",
                     "ok": "yes" if request["mem_mb"] >= peak and request["runtime"] >= minutes else "NO"})
    return rows


def request_rows(config: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["job_min"] == "":
            continue
        setting = None if r["kind"] == "backbone" else r["setting"]
        request = train_resources(config, r["study"], r["dataset"], setting)
        ok = request["mem_mb"] >= r["peak_rss_mb"] and request["runtime"] >= r["job_min"]
        out.append({"type": r["type"], "peak_rss_mb": r["peak_rss_mb"], "request_mem_mb": request["mem_mb"],
                    "job_min": r["job_min"], "request_runtime": request["runtime"], "threads": request["threads"],
                    "gpu": request["gpu"], "ok": "yes" if ok else "NO"})
    return out


HEADROOM = 1.25   # what a suggested request adds to the need (load, data-dependent memory)


def suggested(paper: dict[str, Any], rows: list[dict[str, Any]], converts: list[dict[str, Any]]) -> str:
    """A ``resources.datasets`` block that covers every measured need with HEADROOM, per data entry
    (memory in steps of 500 MB, runtime in whole hours; never below resources.train / the loader default)."""
    base = paper["resources"]["train"]
    need: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["job_min"] != "":
            own = need[r["data"]]["train"]
            own["mem_mb"] = max(own.get("mem_mb", 0), r["peak_rss_mb"])
            own["runtime"] = max(own.get("runtime", 0), r["job_min"])
    for c in converts:
        need[c["entry"]]["data"] = {"mem_mb": c["real_peak_mb"], "runtime": c["real_min"]}
    lines = ["resources:", "  datasets:"]
    for entry in sorted(need):
        parts = []
        for rule, own in sorted(need[entry].items()):
            floor = base if rule == "train" else data_resources(paper, entry)
            if floor["mem_mb"] >= own["mem_mb"] * HEADROOM and floor["runtime"] >= own["runtime"] * HEADROOM:
                continue   # the default covers it
            mem = max(floor["mem_mb"], 500 * math.ceil(own["mem_mb"] * HEADROOM / 500))
            runtime = max(floor["runtime"], 60 * math.ceil(own["runtime"] * HEADROOM / 60))
            parts.append(f"{rule}: {{mem_mb: {mem}, runtime: {runtime}}}")
        if parts:
            lines.append(f"    {entry}: {{{', '.join(parts)}}}")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def report(config: dict[str, Any], types, work: Path, out: Path, load: list[float], gpu: str,
           paper: dict[str, Any] | None = None) -> str:
    """Write cost.md, cost.csv and requests.md under ``out``; return cost.md's text."""
    paper = paper or config
    runs, startup = measurements(work)
    rows = []
    for t in types:
        name = t.key.replace("/", "__")
        rows.append({**type_row(config, t, runs.get(name, []), startup.get(name, 0.0), work), "gpu": gpu})
    measured = [r for r in rows if r["cpu_h"] != ""]
    estimate(rows)
    studies: dict[str, dict[str, float]] = defaultdict(
        lambda: {"types": 0, "measured": 0, "jobs": 0, "cpu_h": 0.0, "estimated_jobs": 0, "estimated_h": 0.0})
    for r in rows:
        s = studies[r["study"]]
        s["types"] += 1
        s["jobs"] += r["jobs"]
        if r["cpu_h"] != "":
            s["measured"] += 1
            s["cpu_h"] += r["cpu_h"]
        elif r["estimated_cpu_h"] != "":
            s["estimated_jobs"] += r["jobs"]
            s["estimated_h"] += r["estimated_cpu_h"]
    converts = convert_rows(paper, work)
    total = sum(s["cpu_h"] for s in studies.values())
    convert_h = sum(c["real_min"] for c in converts) / 60
    machine = (f"{platform.machine()}, {os.cpu_count()} cores shared with other niced work (load average "
               f"{min(load):.1f}-{max(load):.1f} over the run), 1 thread per job as resources.train.threads")
    head = [
        "# What the paper grid costs (config/paper.yaml)",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} by `benchmarks/paper_cost.py` on {machine}. GPU: {gpu}.",
        "",
        "Stand-in data with the FULL per-sample shapes of every corpus (sequence lengths, feature widths, image "
        "and volume sizes) and the paper grid's real batch sizes, models and methods, but only as many samples as "
        "the measured steps need (the same share of every split); steps per epoch, store size and the passes over "
        "validation, test and adaptation data are computed from the REAL sample counts the stand-in plan records. "
        "Seconds per step: the mean of steps 2 and 3 of a 3-step, one-epoch run of the type's first grid job (one "
        "process per study/dataset, its jobs one after the other, 1 thread); memory: that process's peak RSS "
        "during the job (torch included; the store's pages of a stand-in, not of the real store). Times are CPU "
        "seconds of the job's process (each wall phase times the share of a core it got), so the shared "
        "machine's waits do not count: about the wall time on a dedicated core. A job's hours: epochs x steps x "
        "s/step + the epoch's validation and method work and the final evaluation grown to the real counts + "
        "setup and start-up; CPU-hours: that x the grid's jobs of the type (seeds, settings, emotion views, "
        "search trials).",
        "",
        "Types not measured (time ran out on the shared machine, or left out by --only) are estimated from "
        "the mean job of the measured types of the same kind, study and data (else of the same kind and "
        "study), and counted apart.",
        "",
        "| study | job types (measured) | jobs | CPU-hours, measured types | jobs estimated | CPU-hours, estimated | "
        "CPU-hours |",
        "|---|---|---|---|---|---|---|",
    ]
    for study, s in studies.items():
        head.append(f"| {study} | {s['types']} ({s['measured']}) | {s['jobs']} | {s['cpu_h']:,.0f} | "
                    f"{s['estimated_jobs']} | {s['estimated_h']:,.0f} | {s['cpu_h'] + s['estimated_h']:,.0f} |")
    estimated = sum(s["estimated_h"] for s in studies.values())
    head.append(f"| make-data ({len(converts)} entries) | | {len(converts)} | {convert_h:,.1f} | | | "
                f"{convert_h:,.1f} |")
    head.append(f"| **grid** | {len(rows)} ({len(measured)}) | {sum(r['jobs'] for r in rows) + len(converts)} | "
                f"{total + convert_h:,.0f} | {sum(s['estimated_jobs'] for s in studies.values())} | {estimated:,.0f} | "
                f"**{total + convert_h + estimated:,.0f}** |")
    text = "\n".join(head) + "\n\n## Job types\n\n" + markdown(rows, COLUMNS)
    text += "\n## make-data\n\n" + markdown(converts, list(converts[0]) if converts else ["entry"])
    requests = request_rows(paper, rows)
    under = [r for r in requests if r["ok"] != "yes"] + [c for c in converts if c["ok"] != "yes"]
    req_text = (f"# Requests against needs ({len(under)} under)\n\nneed: measured peak RSS (MB) and projected "
                "minutes of one job on 1 CPU thread; request: mmrepro.resources for config/paper.yaml\n\n"
                + markdown(requests, list(requests[0]) if requests else ["type"])
                + "\n## make-data\n\n" + markdown(converts, list(converts[0]) if converts else ["entry"])
                + f"\n## Requests that cover these needs (x{HEADROOM})\n\n```yaml\n" + suggested(paper, rows, converts)
                + "```\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.md").write_text(text)
    (out / "requests.md").write_text(req_text)
    write_csv(out / "cost.csv", rows, CSV_COLUMNS)
    write_csv(out / "make_data.csv", converts, list(converts[0]) if converts else ["entry"])
    return "\n".join(head) + f"\n\n{len(under)} requests under need: {out / 'requests.md'}"
