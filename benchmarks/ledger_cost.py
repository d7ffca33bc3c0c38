"""What the claims ledger's jobs cost, per study and rule, measured or estimated from a sample.

Every data, training, search and adaptation rule writes a benchmark file (``<results>/benchmarks/...tsv``:
wall seconds ``s``, ``cpu_time``, ``max_rss``). On a shared machine the wall time of a job grows with
the load, its CPU time much less: the CPU seconds say what the same jobs would take on an idle
machine with that many cores (their sum divided by the cores: the jobs are single-threaded and the
cores kept busy; each job's start-up is in its CPU time).

Measured: ``python benchmarks/ledger_cost.py --results results/claims`` after ``snakemake --cores 2
claims`` sums what ran. Estimated: ``--estimate`` also counts the jobs the ledger plans at the
configured budget (``claims.budget`` of config/config.yaml, or ``--budget``) and multiplies each
(study, rule)'s count by the mean CPU seconds per job of that (study, rule) in the results folder,
which may hold only a sample (a search and a final run per study): "not measured" where it holds none.
A search is one unit: its workers and its best-trial job together.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from results_table import write_results

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["study", "rule", "jobs", "wall_s", "cpu_s", "max_rss_mb"]
ESTIMATE_COLUMNS = ["study", "rule", "measured", "cpu_s_per_job", "planned", "cpu_s", "idle_h"]
#: Benchmark folders by rule: the first part of a benchmark's path under <results>/benchmarks.
RULES = {"tune": "search", "backbones": "backbone", "data": "make_data", "mechanisms": "mechanism"}


def _unit(rel: Path) -> tuple[str, str, str]:
    """``(study, rule, job)`` of a benchmark file's path under the benchmarks folder; the files of one
    search (its workers and best-trial job) share their job."""
    head = rel.parts[0]
    if head == "tune":
        return rel.parts[1], RULES[head], rel.parent.as_posix()
    if head in ("backbones", "mechanisms"):
        return rel.parts[1], RULES[head], rel.as_posix()
    if head == "data":
        return "(data)", RULES[head], rel.as_posix()
    return head, "adapt" if head == "shift" else "train", rel.as_posix()


def costs(results: Path) -> list[dict]:
    """Per (study, rule) and per study ("all"): jobs, summed wall and CPU seconds, the largest RSS."""
    jobs: dict[tuple[str, str], set[str]] = defaultdict(set)
    totals: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: {"wall_s": 0.0, "cpu_s": 0.0,
                                                                             "max_rss_mb": 0.0})
    root = results / "benchmarks"
    for path in sorted(root.rglob("*.tsv")):
        with open(path, newline="") as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        study, rule, job = _unit(path.relative_to(root))
        jobs[study, rule].add(job)
        entry = totals[study, rule]
        entry["wall_s"] += float(row["s"])
        entry["cpu_s"] += float(row["cpu_time"])
        entry["max_rss_mb"] = max(entry["max_rss_mb"], float(row["max_rss"]))
    rows = [{"study": s, "rule": r, "jobs": len(jobs[s, r]), **v} for (s, r), v in sorted(totals.items())]
    for study in sorted({r["study"] for r in rows}):
        mine = [r for r in rows if r["study"] == study]
        rows.append({"study": study, "rule": "all", "jobs": sum(r["jobs"] for r in mine),
                     "wall_s": sum(r["wall_s"] for r in mine), "cpu_s": sum(r["cpu_s"] for r in mine),
                     "max_rss_mb": max(r["max_rss_mb"] for r in mine)})
    return [{**r, "wall_s": round(r["wall_s"]), "cpu_s": round(r["cpu_s"]), "max_rss_mb": round(r["max_rss_mb"])}
            for r in rows]


def planned_jobs(budget: str | None = None) -> dict[tuple[str, str], int]:
    """The jobs ``snakemake claims`` runs per (study, rule) at the configured budget (or ``budget``):
    one per dataset, backbone, search and final run (the ledger's own config, :func:`mmrepro.claims.ledger_config`)."""
    from mmrepro.claims import ledger_config, ledger_searches, load_claims
    from mmrepro.config import STUDY_KINDS, backbone_runs, load_schema, read_config_files, study_grid, validate_config

    schemas = REPO / "workflow" / "schemas"
    config = validate_config(read_config_files([REPO / "config" / "config.yaml"]),
                             load_schema(schemas / "config.schema.yaml"))
    if budget is not None:
        config["claims"]["budget"] = budget
    claims_file = REPO / config["claims"]["file"]
    ledger = ledger_config(config, load_claims(claims_file, load_schema(schemas / "claims.schema.yaml")),
                           load_schema(schemas / "config.schema.yaml"), str(claims_file))
    plan: dict[tuple[str, str], int] = defaultdict(int)
    plan["(data)", "make_data"] = len({d for cfg in ledger["studies"].values() for d in cfg["datasets"]})
    for search in ledger_searches(ledger):
        plan[search.split("/")[0], "search"] += 1
    for study in ledger["studies"]:
        plan[study, "adapt" if STUDY_KINDS[study] == "adapt" else "train"] += len(study_grid(ledger, study))
        if backbone_runs(ledger, study):
            plan[study, "backbone"] += len(backbone_runs(ledger, study))
    return dict(plan)


def estimate(measured: list[dict], plan: dict[tuple[str, str], int], cores: int) -> list[dict]:
    """Per (study, rule): planned jobs times the measured mean CPU seconds per job ("not measured"
    without a sample); per study ("all"): the sum over its measured rules."""
    per_job = {(r["study"], r["rule"]): (r["jobs"], r["cpu_s"] / r["jobs"]) for r in measured
               if r["rule"] != "all" and r["jobs"]}
    rows = []
    for (study, rule), n in sorted(plan.items()):
        m, cpu = per_job.get((study, rule), (0, None))
        shown = (round(cpu, 1), round(cpu * n), round(cpu * n / cores / 3600, 2)) if m else ("not measured",) * 3
        rows.append(dict(zip(ESTIMATE_COLUMNS, (study, rule, m, shown[0], n, *shown[1:]))))
    for study in sorted({r["study"] for r in rows}):
        mine = [r for r in rows if r["study"] == study and r["measured"]]
        cpu = sum(r["cpu_s"] for r in mine)
        rows.append({"study": study, "rule": "all", "measured": sum(r["measured"] for r in mine), "cpu_s_per_job": "",
                     "planned": sum(n for (s, _), n in plan.items() if s == study), "cpu_s": cpu,
                     "idle_h": round(cpu / cores / 3600, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results/claims"), help="a results folder")
    parser.add_argument("--cores", type=int, default=2, help="cores the jobs shared (for the idle-machine estimate)")
    parser.add_argument("--estimate", action="store_true",
                        help="also estimate the whole ledger from this folder's jobs (a sample will do)")
    parser.add_argument("--budget", default=None, help="the ledger budget to estimate (default: claims.budget)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = costs(args.results)
    if not rows:
        raise SystemExit(f"no benchmark files under {args.results / 'benchmarks'}")
    total = sum(r["cpu_s"] for r in rows if r["rule"] == "all")
    title = (f"Job cost under {args.results} (sums of Snakemake benchmarks; wall grows with the machine's load). "
             f"CPU seconds in all: {total:,.0f}, i.e. about {total / args.cores / 3600:.2f} h on {args.cores} idle cores.")
    print(write_results(rows, COLUMNS, args.out, "ledger_cost", title))
    if args.estimate:
        est = estimate(rows, planned_jobs(args.budget), args.cores)
        known = [r for r in est if r["rule"] != "all" and r["measured"]]
        cpu = sum(r["cpu_s"] for r in known)
        missing = [f"{r['study']}/{r['rule']}" for r in est if r["rule"] != "all" and not r["measured"]]
        title = (f"Estimated ledger cost from the jobs under {args.results}: planned jobs x measured CPU seconds per "
                 f"job. In all {cpu:,.0f} CPU s, about {cpu / args.cores / 3600:.2f} h on {args.cores} idle cores"
                 + (f" (not measured, left out: {', '.join(missing)})" if missing else "") + ".")
        print(write_results(est, ESTIMATE_COLUMNS, args.out, "ledger_estimate", title))


if __name__ == "__main__":
    main()
