"""What a results folder's jobs cost, per study and rule: the sum of Snakemake's per-job benchmarks.

Every training, search and adaptation rule writes a benchmark file (``<results>/benchmarks/...tsv``:
wall seconds ``s``, ``cpu_time``, ``max_rss``). On a shared machine the wall time of a job grows with
the load, its CPU time much less: the CPU seconds say what the same jobs would take on an idle
machine with that many cores (their sum divided by the cores, plus each job's start-up, which the
CPU time includes). Example, after ``snakemake --cores 2 claims``:
``python benchmarks/ledger_cost.py --results results/claims --cores 2``.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from results_table import write_results

COLUMNS = ["study", "rule", "jobs", "wall_s", "cpu_s", "max_rss_mb"]
#: Benchmark folders by rule: the first part of a benchmark's path under <results>/benchmarks.
RULES = {"tune": "search", "backbones": "backbone", "data": "make_data", "mechanisms": "mechanism"}


def _study_and_rule(rel: Path) -> tuple[str, str]:
    """``(study, rule)`` of a benchmark file's path under the benchmarks folder."""
    head = rel.parts[0]
    if head in ("tune", "backbones", "mechanisms"):
        return rel.parts[1], RULES[head]
    if head == "data":
        return "(data)", RULES[head]
    return head, "adapt" if head == "shift" else "train"


def costs(results: Path) -> list[dict]:
    totals: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: {"jobs": 0, "wall_s": 0.0, "cpu_s": 0.0,
                                                                             "max_rss_mb": 0.0})
    root = results / "benchmarks"
    for path in sorted(root.rglob("*.tsv")):
        with open(path, newline="") as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        entry = totals[_study_and_rule(path.relative_to(root))]
        entry["jobs"] += 1
        entry["wall_s"] += float(row["s"])
        entry["cpu_s"] += float(row["cpu_time"])
        entry["max_rss_mb"] = max(entry["max_rss_mb"], float(row["max_rss"]))
    rows = [{"study": s, "rule": r, **v} for (s, r), v in sorted(totals.items())]
    for study in sorted({r["study"] for r in rows}):
        mine = [r for r in rows if r["study"] == study]
        rows.append({"study": study, "rule": "all", "jobs": sum(r["jobs"] for r in mine),
                     "wall_s": sum(r["wall_s"] for r in mine), "cpu_s": sum(r["cpu_s"] for r in mine),
                     "max_rss_mb": max(r["max_rss_mb"] for r in mine)})
    return [{**r, "wall_s": round(r["wall_s"]), "cpu_s": round(r["cpu_s"]), "max_rss_mb": round(r["max_rss_mb"])}
            for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results/claims"), help="a results folder")
    parser.add_argument("--cores", type=int, default=2, help="cores the jobs shared (for the idle-machine estimate)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = costs(args.results)
    if not rows:
        raise SystemExit(f"no benchmark files under {args.results / 'benchmarks'}")
    total = sum(r["cpu_s"] for r in rows if r["rule"] == "all")
    title = (f"Job cost under {args.results} (sums of Snakemake benchmarks; wall grows with the machine's load). "
             f"CPU seconds in all: {total:,.0f}, i.e. about {total / args.cores / 3600:.2f} h on {args.cores} idle cores.")
    print(write_results(rows, COLUMNS, args.out, "ledger_cost", title))


if __name__ == "__main__":
    main()
