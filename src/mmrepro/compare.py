"""Tables from the MLflow store, for any filter of runs: the runs a user sees in the UI, as files.

Each job logs its metrics.json to its run (:meth:`mmrepro.tracking.RunTracker.log_summary`);
:func:`load_tracked_runs` reads them back into the long frame of
:func:`mmrepro.report.load_runs`, so ``mmrepro compare`` writes the same tables as
``mmrepro report`` does from the files. Only finished runs that logged a summary count; when a
job ran several times, its latest run stands for it (as its files do).
"""

from __future__ import annotations

import logging
import math

import pandas as pd

from mmrepro.report.tables import RUN_COLUMNS
from mmrepro.tracking import LOSS_SERIES, MONITOR_SERIES, TAG_KEYS

log = logging.getLogger(__name__)

_PREFIXES = ("oracle/", "params/", LOSS_SERIES, MONITOR_SERIES)


def _rows(run) -> list[dict]:
    tags, metrics = run.data.tags, run.data.metrics
    base = {k: tags[k] for k in TAG_KEYS} | {"seed": int(tags["seed"]), "task": tags["task"]}
    counts = {k: metrics.get(f"params/{k}", math.nan) for k in ("trainable", "backbone")}
    rows = []
    for key, value in metrics.items():
        if key.startswith(_PREFIXES) or "/" not in key:
            continue  # per-step series (unprefixed in older runs), oracle and parameter counts are not table rows
        split, metric = key.split("/", 1)
        rows.append({**base, "split": split, "metric": metric, "value": value,
                     "oracle": metrics.get(f"oracle/{key}", math.nan), "trainable_params": counts["trainable"],
                     "backbone_params": counts["backbone"], "path": f"mlflow:{run.info.run_id}"})
    return rows


def load_tracked_runs(uri: str, experiment: str, filter_string: str = "") -> pd.DataFrame:
    """The long frame of :func:`~mmrepro.report.load_runs` from an experiment's runs.

    ``filter_string`` is MLflow's search syntax (``"tags.method = 'cggm'"``); only FINISHED runs
    with a logged summary are read. Raises ``ValueError`` when the experiment is unknown or no
    run matches.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {uri}")
    query = " and ".join(f for f in ("attributes.status = 'FINISHED'", filter_string) if f)
    runs = [r for r in client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"],
                                          max_results=50000)
            if {*TAG_KEYS, "task"} <= set(r.data.tags)]
    seen: set[tuple] = set()
    latest = []
    for run in runs:
        key = tuple(run.data.tags[k] for k in TAG_KEYS)
        if key not in seen:
            seen.add(key)
            latest.append(run)
    if len(latest) < len(runs):
        log.info("%d older runs of the same job ignored (the latest stands for each)", len(runs) - len(latest))
    rows = [row for run in reversed(latest) for row in _rows(run)]
    if not rows:
        raise ValueError(f"no finished run with metrics in experiment {experiment!r} matches {filter_string!r}")
    frame = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    return frame.astype({"seed": "int64", "value": "float64", "oracle": "float64", "trainable_params": "float64",
                         "backbone_params": "float64"})
