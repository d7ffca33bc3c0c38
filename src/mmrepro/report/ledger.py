"""The claims ledger's table and figure: each paper's claim, decided on synth by paired comparisons.

One comparison per (claim, form, dataset, backbone, setting, rival, metric): the method's value
minus the rival's on the same seed, mean and bootstrap interval over the seeds, and the verdict of
:func:`mmrepro.report.paired.verdict`; one verdict per claim and form (the paper's method, the
released code's variant) by :func:`mmrepro.report.paired.claim_verdict`. Built from the runs'
``metrics.json`` and the ledger spec of :func:`mmrepro.claims.ledger_spec` (claims, bootstrap,
budget), never from MLflow.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .paired import (CONTRADICTED, HOLDS, UNDECIDED, VERDICT_COLORS, Bootstrap, base_method, bootstrap_interval,
                     claim_verdict, paired_differences, verdict)
from .figures import save
from .render import LOWER_IS_BETTER
from .tables import _atomic_write_text, _with_suffix

__all__ = ["comparisons", "claim_verdicts", "write_ledger"]

_COMPARISON_COLUMNS = ["claim", "form", "method", "dataset", "backbone", "setting", "rival", "metric", "n", "mean",
                       "low", "high", "verdict", "note"]


def comparisons(runs: pd.DataFrame, claims: list[dict], bootstrap: Bootstrap) -> pd.DataFrame:
    """Every comparison of every claim (columns :data:`_COMPARISON_COLUMNS`); a comparison without a
    paired seed has ``n`` 0 and is undecided. ``note`` says when a run read target labels."""
    rows = []
    for claim in claims:
        mine = runs[(runs["study"] == claim["study"]) & (runs["dataset"] == claim["dataset"])
                    & runs["setting"].isin(claim["settings"])]
        for form, method in _forms(claim).items():
            marked = mine.loc[mine["method"].map(base_method) == method, "method"]
            note = "; ".join(sorted({m[len(method):].strip(" []") for m in marked if m != method}))
            backbones = list(dict.fromkeys(mine["backbone"])) or [""]
            for setting in claim["settings"]:
                for backbone in backbones:
                    here = mine[(mine["setting"] == setting) & (mine["backbone"] == backbone)]
                    for rival in claim["rivals"]:
                        for metric in claim["metrics"]:
                            diffs = paired_differences(here, method, rival, metric, claim["split"])["diff"]
                            iv = bootstrap_interval(diffs, bootstrap)
                            rows.append({"claim": claim["id"], "form": form, "method": method,
                                         "dataset": claim["dataset"], "backbone": backbone, "setting": setting,
                                         "rival": rival, "metric": metric, "n": iv.n, "mean": iv.mean,
                                         "low": iv.low, "high": iv.high, "verdict": verdict(iv, metric),
                                         "note": note})
    return pd.DataFrame(rows, columns=_COMPARISON_COLUMNS)


def _forms(claim: dict) -> dict[str, str]:
    return {"paper": claim["method"], **({"released code": claim["code_variant"]} if claim.get("code_variant") else {})}


def claim_verdicts(comp: pd.DataFrame, claims: list[dict]) -> pd.DataFrame:
    """One row per (claim, form): the claim's words, where it is decided, the counts and the verdict."""
    rows = []
    for claim in claims:
        for form, method in _forms(claim).items():
            mine = comp[(comp["claim"] == claim["id"]) & (comp["form"] == form)]
            counts = {v: int((mine["verdict"] == v).sum()) for v in (HOLDS, UNDECIDED, CONTRADICTED)}
            rows.append({"claim": claim["id"], "paper": claim["paper"], "wording": claim["wording"],
                         "form": form, "method": method, "where": claim["dose"],
                         "seeds": int(mine["n"].min()) if len(mine) else 0, **counts, "comparisons": len(mine),
                         "verdict": claim_verdict(mine["verdict"]),
                         "note": "; ".join(n for n in dict.fromkeys(mine["note"]) if n)})
    return pd.DataFrame(rows)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _search_lines(searches: list[dict]) -> list[str]:
    """One line per search: the method, whether its best trial was the paper's point, what it chose."""
    def value(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = []
    for best in searches:
        kept = "the paper's point" if best["default_point"] else f"trial {best['trial']}"
        chosen = ", ".join(f"{k} = {value(v)}" for k, v in best["params"].items())
        lines.append(f"- {best['study']} / {best['method']}: {kept} of {best['trials']} ({chosen}); "
                     f"validation loss {best['value']:.4f}")
    return lines


def _markdown(verdicts: pd.DataFrame, comp: pd.DataFrame, spec: dict, bootstrap: Bootstrap,
              searches: list[dict]) -> str:
    def line(cells) -> str:
        return "| " + " | ".join(_cell(c) for c in cells) + " |"

    out = ["# Claims ledger: each paper's claim, decided on synth", "",
           "Every verdict is about this synthetic benchmark at the dose named in *where*, at the budget below; "
           "none is about the papers' real datasets.", "",
           line(["paper", "claim (the paper's words)", "where (dose)", "form", "seeds",
                 "comparisons: hold / undecided / contradicted", "verdict on synth at this dose"]),
           line(["---"] * 4 + ["---:"] * 2 + ["---"])]
    for r in verdicts.itertuples(index=False):
        form = r.form + (f" ({r.note})" if r.note else "")
        out.append(line([r.paper, f"“{r.wording}”", r.where, f"{form}: {r.method}", r.seeds,
                         f"{getattr(r, HOLDS)} / {getattr(r, UNDECIDED)} / {getattr(r, CONTRADICTED)} of "
                         f"{r.comparisons}", f"**{r.verdict}**"]))
    out += ["", "## Comparisons", "",
            line(["claim", "form", "method", "setting", "backbone", "rival", "metric", "better if", "n",
                  f"Δ = method − rival, mean [{100 * bootstrap.level:g} % CI]", "verdict"]),
            line(["---"] * 8 + ["---:"] * 2 + ["---"])]
    for r in comp.itertuples(index=False):
        iv = "no paired seeds" if r.n == 0 else f"{r.mean:+.4f} [{r.low:+.4f}, {r.high:+.4f}]"
        out.append(line([r.claim, r.form, r.method, r.setting, r.backbone, r.rival, r.metric,
                         "< 0" if r.metric in LOWER_IS_BETTER else "> 0", r.n, iv, r.verdict]))
    out += ["", "## How these were measured", "", *(f"- {text}" for text in spec["budget"]),
            f"- Δ per seed: the method's value minus the rival's on the same dataset, backbone, setting and seed "
            f"(the metrics' own units); {bootstrap.describe()}.",
            "- Verdict rule (fixed in mmrepro.report.paired before any measurement): a comparison **holds** when "
            "its interval excludes zero in the method's favour, is **contradicted** when it excludes zero against "
            "it, and is **undecided** otherwise; a claim holds when all its comparisons hold, is contradicted when "
            "any is, and is undecided otherwise (no correction for the number of comparisons).",
            "- Generated from the runs' metrics.json files by `mmrepro claims`; docs/claims.md says how to read it.",
            ""]
    if searches:
        out += ["## Searches", "", "The point each search chose (its best validation loss), which every final run "
                "of that method used; the first trial of every search is the paper's (the config's) point.", "",
                *_search_lines(searches), ""]
    return "\n".join(out)


def _plot(comp: pd.DataFrame, verdicts: pd.DataFrame, stem: Path, bootstrap: Bootstrap) -> list[Path]:
    """One panel per (claim, form): each comparison's interval, signed so that right of zero is in the
    method's favour, coloured by its verdict."""
    groups = list(comp.groupby(["claim", "form"], sort=False))
    tallest = max((len(g) for _, g in groups), default=1)
    fig = Figure(figsize=(4.6 * max(len(groups), 1), 1.6 + 0.3 * tallest), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(groups), 1), squeeze=False)[0]
    for ax, ((claim, form), g) in zip(axes, groups):
        y = np.arange(len(g))[::-1]
        labels = []
        for yi, r in zip(y, g.itertuples(index=False)):
            sign = -1.0 if r.metric in LOWER_IS_BETTER else 1.0
            labels.append(" ".join(str(v) for v in (r.rival, r.setting, r.backbone, r.metric) if v))
            if r.n == 0:
                continue
            lo, hi = sorted((sign * r.low, sign * r.high))
            ax.errorbar([sign * r.mean], [yi], xerr=[[sign * r.mean - lo], [hi - sign * r.mean]], fmt="o", ms=4,
                        capsize=3, color=VERDICT_COLORS[r.verdict])
        ax.axvline(0.0, color="0.2", linewidth=1)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlabel("in the method's favour (metric units)")
        decided = verdicts[(verdicts["claim"] == claim) & (verdicts["form"] == form)]["verdict"].iloc[0]
        ax.set_title(f"{claim} ({form}): {decided}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Claims on synth: paired difference to each rival, mean and {100 * bootstrap.level:g} % "
                 "bootstrap interval over seeds (green holds, red contradicted, grey undecided)", fontsize=10)
    return save(fig, stem)


def write_ledger(runs: pd.DataFrame, spec: dict, table: str | os.PathLike, plot: str | os.PathLike,
                 searches: list[dict] = ()) -> list[Path]:
    """``table.md`` (verdicts, comparisons, how they were measured, what each search chose: the
    ``best.json`` contents of :func:`mmrepro.tune.best`), ``table.csv`` (the comparisons) and
    ``plot.png``/``.pdf`` from the runs of :func:`~mmrepro.report.tables.load_runs` and the ledger spec."""
    bootstrap = Bootstrap(**spec["bootstrap"])
    comp = comparisons(runs, spec["claims"], bootstrap)
    verdicts = claim_verdicts(comp, spec["claims"])
    table = Path(table)
    buf = io.StringIO()
    comp.to_csv(buf, index=False)
    paths = [_with_suffix(table, ".md"), _with_suffix(table, ".csv")]
    _atomic_write_text(paths[0], _markdown(verdicts, comp, spec, bootstrap, list(searches)))
    _atomic_write_text(paths[1], buf.getvalue())
    return paths + _plot(comp, verdicts, Path(plot), bootstrap)
