"""The Python half of ``benchmarks/slurm_rehearsal.sh`` (the tiny rehearsal through SLURM).

``requests``: a config overlay that caps every memory request of the layered config at ``--cap-mb``.
``config/paper.yaml`` asks what the REAL data needs (16 GB for the CASP entries' training and
adaptation, 46 GB to convert MOSEI's CASP features); the rehearsal runs on tiny stand-ins, and on the
one-node test cluster (this machine's CPUs and memory) a 46 GB job is never scheduled and 16 GB ones
run one at a time. Capped at the node's memory per CPU, every CPU can run a job. paper.yaml's own
requests are left as they are.

``jobs``: where the wall time of the SLURM jobs went, from ``scontrol show job -o`` and the Snakemake log:
each job's wait in the queue (submitted to started), its run (started to ended), of which its rule's
command (the job's ``benchmark:`` file) and the rest (the job's own Snakemake start), and how long
Snakemake took to see it end (the plugin polls the status command), as median and total.

``check``: every run the rehearsal finished (each ``tracking.json`` beside a ``metrics.json``) is on
the tracking server as a FINISHED run tagged ``rehearsal``, and the server holds no other rehearsal run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from mmrepro.config import load_schema, read_config_files, validate_config
from mmrepro.resources import data_resources
from mmrepro.tracking import REHEARSAL_TAG

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def layered(configfiles: list[Path]) -> dict[str, Any]:
    """The config Snakemake builds from config/config.yaml and ``configfiles``, defaults filled in."""
    return validate_config(read_config_files([REPO / "config" / "config.yaml", *configfiles]), load_schema(SCHEMA))


def capped_requests(config: dict[str, Any], cap_mb: int) -> dict[str, Any]:
    """The overlay that lowers each memory request above ``cap_mb`` to it (``resources.train`` and,
    per dataset entry, its jobs' ``train`` and make-data's ``data``); empty where none is above."""
    resources = config["resources"]
    overlay: dict[str, Any] = {}
    if resources["train"]["mem_mb"] > cap_mb:
        overlay["train"] = {"mem_mb": cap_mb}
    for entry in config["datasets"]:
        own = resources["datasets"].get(entry, {})
        asks = {"train": {**resources["train"], **own.get("train", {})}["mem_mb"],
                "data": data_resources(config, entry)["mem_mb"]}
        capped = {kind: {"mem_mb": cap_mb} for kind, mem_mb in asks.items() if mem_mb > cap_mb}
        if capped:
            overlay.setdefault("datasets", {})[entry] = capped
    return {"resources": overlay} if overlay else {}


def check_runs(results: Path, uri: str) -> list[str]:
    """What is wrong with the runs under ``results`` on the server at ``uri`` (empty: every run is there)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    problems = []
    runs = [m.parent for m in sorted(results.rglob("metrics.json")) if "mlartifacts" not in m.parts]
    ids = set()
    for run_dir in runs:
        record = run_dir / "tracking.json"
        if not record.is_file():
            problems.append(f"{run_dir}: a finished run without tracking.json")
            continue
        run_id = json.loads(record.read_text())["run_id"]
        try:
            run = client.get_run(run_id) if run_id else None
        except mlflow.exceptions.MlflowException as e:
            run = None
            problems.append(f"{record}: run {run_id} not on the server ({e.error_code})")
        if run is not None and (run.info.status != "FINISHED" or REHEARSAL_TAG not in run.data.tags):
            problems.append(f"{record}: run {run_id} is {run.info.status}, tags.{REHEARSAL_TAG} = "
                            f"{run.data.tags.get(REHEARSAL_TAG)}")
        ids.add(run_id)
    experiments = [e.experiment_id for e in client.search_experiments()]
    on_server = {r.info.run_id for r in client.search_runs(experiments, max_results=50000)
                 if REHEARSAL_TAG in r.data.tags}
    problems += [f"run {r} on the server belongs to no run folder" for r in sorted(on_server - ids)]
    print(f"{len(runs)} finished runs under {results}; {len(on_server)} rehearsal runs on {uri}; "
          f"{len(problems)} problems")
    return problems


def job_states(scontrol: str) -> dict[str, int]:
    """How many jobs ended in each state (COMPLETED, FAILED, ...), from ``scontrol show job -o``."""
    return dict(Counter(re.findall(r"\bJobState=(\S+)", scontrol)))


def job_times(scontrol: str, log: str, workdir: Path) -> dict[str, list[float]]:
    """Seconds per SLURM job: ``queued`` (submit to start), ``ran`` (start to end), ``command`` (its rule's
    command, from the benchmark file under ``workdir``) and ``rest`` (ran - command; only jobs with a
    benchmark file), ``noticed`` (end to Snakemake's "Finished
    jobid"), from ``scontrol show job -o`` and the Snakemake log of one run."""
    slurm = {}
    for line in scontrol.splitlines():
        fields = dict(re.findall(r"(\S+?)=(\S*)", line))
        if "JobId" in fields and fields.get("EndTime", "Unknown") != "Unknown":
            slurm[fields["JobId"]] = {k: datetime.fromisoformat(fields[f"{k}Time"]) for k in ("Submit", "Start", "End")}
    submitted, benchmarks, finished, stamp, benchmark = {}, {}, {}, None, None
    for line in log.splitlines():
        if m := re.fullmatch(r"\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]", line.strip()):
            stamp, benchmark = datetime.strptime(m[1], "%a %b %d %H:%M:%S %Y"), None
        elif m := re.fullmatch(r"benchmark: (\S+)", line.strip()):
            benchmark = workdir / m[1]
        elif m := re.match(r"Job (\d+) has been submitted with SLURM jobid (\d+)", line):
            submitted[m[1]], benchmarks[m[1]] = m[2], benchmark
        elif (m := re.match(r"Finished jobid: (\d+)", line)) and stamp is not None:
            finished[m[1]] = stamp
    times: dict[str, list[float]] = {"queued": [], "ran": [], "command": [], "rest": [], "noticed": []}
    for job, slurm_id in submitted.items():
        if slurm_id in slurm and job in finished:
            t = slurm[slurm_id]
            times["queued"].append((t["Start"] - t["Submit"]).total_seconds())
            times["ran"].append((t["End"] - t["Start"]).total_seconds())
            if benchmarks[job] is not None and benchmarks[job].is_file():
                command = float(benchmarks[job].read_text().splitlines()[1].split("\t")[0])
                times["command"].append(command)
                times["rest"].append(times["ran"][-1] - command)
            times["noticed"].append((finished[job] - t["End"]).total_seconds())
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    requests = verbs.add_parser("requests", help="print the overlay that caps memory requests (YAML)")
    requests.add_argument("--cap-mb", type=int, required=True)
    requests.add_argument("configfiles", nargs="+", type=Path, help="the layers after config/config.yaml")
    jobs = verbs.add_parser("jobs", help="queue, run and notice time of the SLURM jobs")
    jobs.add_argument("scontrol", type=Path, help="`scontrol show job -o` saved after the run")
    jobs.add_argument("log", type=Path, help="the run's Snakemake log")
    jobs.add_argument("workdir", type=Path, help="the run's working directory (benchmark paths are relative to it)")
    check = verbs.add_parser("check", help="every finished run is on the server")
    check.add_argument("results", type=Path)
    check.add_argument("--uri", required=True)
    args = parser.parse_args(argv)
    if args.verb == "requests":
        overlay = capped_requests(layered(args.configfiles), args.cap_mb)
        print(f"# every memory request above {args.cap_mb} MB (the node's memory per CPU) capped to it: "
              "the rehearsal's stand-ins are tiny; written by benchmarks/slurm_rehearsal.py")
        print(yaml.safe_dump(overlay, sort_keys=True), end="")
        return 0
    if args.verb == "jobs":
        scontrol = args.scontrol.read_text()
        times = job_times(scontrol, args.log.read_text(), args.workdir)
        print(f"SLURM jobs: {job_states(scontrol)}; of those Snakemake saw end, {len(times['ran'])} ({len(times['command'])} with "
              "a benchmark file), seconds per job, median (total): " + ", ".join(
            f"{k} {statistics.median(v) if v else 0:.0f} ({sum(v):.0f})" for k, v in times.items()))
        return 0
    problems = check_runs(args.results, args.uri)
    print("\n".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
