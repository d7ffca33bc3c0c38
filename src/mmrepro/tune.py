"""Hyperparameter search with Optuna: one study per (study, dataset, method), feeding the final runs.

A search trains the method (or adapts, for test-time adapters) on the first setting, seed (and, on
the shift study's backbone axis, backbone) that run it (:func:`mmrepro.config.search_run`; a
cross-dataset setting's trials read its target's store) and scores a trial by its best validation
loss; the test split is never read here. Its best parameters serve every run of that (study, dataset, method).
A cross-dataset setting's validation split is the target's: such a search chooses with target
labels, says so (``target_labels_used`` in ``best.json`` and on its MLflow run), and every run
that takes its parameters is marked the same way (:attr:`mmrepro.spec.RunSpec.tuned_on_target_labels`).
The config's values are the first trial, so a search never ends worse than the published point.
Three steps, one CLI verb each, so that several Snakemake jobs can share one study:

- ``create``: the Optuna study (a journal file by default, ``tune.storage`` names an RDB URL),
  with the default point enqueued, and the search's MLflow parent run.
- ``work``: one worker's loop. It claims trials with ``ask`` until ``tune.trials`` have finished
  (complete or pruned) across all workers; a claim a concurrent worker made surplus is failed,
  never run. The journal store has no heartbeat, so a worker first fails the trials it left
  RUNNING when it was killed and enqueues their parameters again: retried, never counted twice.
- ``best``: after every worker: fails whatever is still RUNNING (nobody runs it), tops the budget
  up with the same loop, then writes the best parameters, the plots and the parent run's params.

The search spec each step reads is built with the config (:func:`mmrepro.config.search_spec`, which
also checks the spaces); the final runs take the best parameters through
:meth:`mmrepro.spec.RunSpec.with_params`.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

from mmrepro.spec import RunSpec
from mmrepro.tracking import REHEARSAL_TAG, flatten, tracking_uri

log = logging.getLogger(__name__)


def _storage(url_or_path: str):
    """An RDB URL (it has ``://``) as is; otherwise a journal file (safe for workers on one file system)."""
    import optuna

    if "://" in url_or_path:
        return optuna.storages.RDBStorage(url_or_path)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url_or_path))


def _open(search: dict[str, Any], worker: int):
    """The study with this worker's sampler: TPE with every argument written out (Optuna 5 changed the
    defaults), seeded per worker so that concurrent workers do not propose the same points."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=search["seed"] + worker, **search["sampler"])
    pruner = search["pruner"]
    pruner = (optuna.pruners.MedianPruner(**{k: v for k, v in pruner.items() if k != "type"})
              if pruner["type"] == "median" else optuna.pruners.NopPruner())
    return optuna.load_study(study_name=search["name"], storage=_storage(search["storage"]), sampler=sampler,
                             pruner=pruner)


def _counts(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def create(search: dict[str, Any]) -> dict[str, Any]:
    """Create (or load) the study, enqueue the default point first, open the MLflow parent run."""
    import mlflow
    import optuna

    if "://" not in search["storage"]:
        Path(search["storage"]).parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=search["name"], storage=_storage(search["storage"]),
                                direction="minimize", load_if_exists=True)
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(search["default"], user_attrs={"point": "default"})
    client = mlflow.MlflowClient(tracking_uri=_uri(search))
    exp = client.get_experiment_by_name(search["study"])
    if exp is None:
        raise RuntimeError(f"MLflow experiment {search['study']!r} does not exist; run the init_tracking rule first")
    found = client.search_runs([exp.experiment_id], f"tags.search = '{search['name']}' and tags.role = 'search'")
    if found:
        parent = found[0].info.run_id
    else:
        tags = {"study": search["study"], "dataset": search["dataset"], "method": search["method"],
                "search": search["name"], "role": "search",
                "target_labels_used": str(scores_target_labels(_spec(search))).lower()}
        if _spec(search).stand_in is not None:
            tags[REHEARSAL_TAG] = _spec(search).stand_in
        parent = client.create_run(exp.experiment_id, run_name=f"search/{search['dataset']}/{search['method']}",
                                   tags=tags).info.run_id
        from mlflow.entities import Param

        params = flatten({k: search[k] for k in ("space", "default", "trials", "seed", "sampler", "pruner")})
        client.log_batch(parent, params=[Param(k[:250], v[:6000]) for k, v in params.items()])
    return {**search, "parent_run": parent}


def _spec(search: dict[str, Any]) -> RunSpec:
    """The run spec the search's trials vary (its JSON in the search spec)."""
    return RunSpec.from_dict(search["spec"])


def scores_target_labels(spec: RunSpec) -> bool:
    """Whether trials of ``spec`` are scored on target labels: its data setting's validation split is
    the target's (a cross-dataset shift; a synth domain setting validates on the source)."""
    from mmrepro.methods.registry import SETTINGS, build

    return build(SETTINGS, spec.data_setting.type, spec.data_setting.params).validates_on_target


def _uri(search: dict[str, Any]) -> str:
    spec = _spec(search)
    return tracking_uri(spec.results, spec.tracking.uri)


#: A worker marks a trial as its own right after ``ask``; one still unmarked this long after was
#: claimed by a job killed in between.
UNMARKED_GRACE_S = 5.0


def _fail_stale(study, owner: int | None) -> list[int]:
    """Fail the RUNNING trials of ``owner`` (all of them for None) and enqueue their parameters again."""
    from optuna.trial import TrialState

    def candidates():
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if owner is None or t.user_attrs.get("worker", owner) == owner]

    if owner is not None and any("worker" not in t.user_attrs for t in candidates()):
        time.sleep(UNMARKED_GRACE_S)  # a live worker may be between ask and marking
    stale = candidates()
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        # A job killed before its objective suggested anything leaves ``params`` empty; an enqueued
        # point (the config's defaults) then lives only in Optuna's ``fixed_params``.
        params = t.params or t.system_attrs.get("fixed_params", {})
        study.enqueue_trial(params, user_attrs={"retry_of": t.number, **{k: v for k, v in t.user_attrs.items()
                                                                         if k == "point"}})
        log.warning("trial %d was left RUNNING by a stopped job: failed, its parameters enqueued again", t.number)
    return [t.number for t in stale]


def _suggest(trial, key: str, dist: dict[str, Any]) -> Any:
    if "choices" in dist:
        return trial.suggest_categorical(key, dist["choices"])
    if dist.get("type") == "int":
        return trial.suggest_int(key, dist["low"], dist["high"], log=dist.get("log", False), step=dist.get("step") or 1)
    return trial.suggest_float(key, dist["low"], dist["high"], log=dist.get("log", False), step=dist.get("step"))


def _objective(search: dict[str, Any], spec: RunSpec, store: Path, init: Path | None, trial, run) -> float:
    """The trial's best validation loss; a pruned trial raises ``TrialPruned`` from the loop's epoch callback."""
    import optuna
    import torch

    from mmrepro.jobs import RunData, adapted_predictions, prepare_adapter, prepare_training
    from mmrepro.train import fit, task_loss_fn

    data = RunData(store, spec)
    if search["kind"] == "adapt":
        stats = init.with_name("feature_stats.pt")  # saved beside the source model, for SSA
        _, adapter, device = prepare_adapter(spec, data, init, stats if stats.is_file() else None)
        pred, y = adapted_predictions(adapter, data, device, "valid")
        value = float(task_loss_fn(data.task.type)(torch.as_tensor(pred), torch.as_tensor(y)))
        run.log_metrics({"valid_loss": value}, step=0)
        return value
    train, valid = data.train_loader(), data.loader("valid")
    model, hook, _ = prepare_training(spec, data, init)

    def on_epoch(epoch: int, values: dict[str, float]) -> None:
        run.log_metrics(values, step=epoch)
        trial.report(values["valid_loss"], epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: valid_loss {values['valid_loss']:.4g}")

    result = fit(model, train, valid, hook, spec.train, log_epoch=on_epoch)
    return min(h["valid_loss"] for h in result.history)


def _run_trial(study, trial, search: dict[str, Any], store: Path, init: Path | None, threads: int) -> None:
    """One trial as a nested MLflow run under the search's parent run; tells Optuna how it ended."""
    import optuna
    from optuna.trial import TrialState

    from mmrepro import reproducibility
    from mmrepro.tracking import RunTracker, run_tags

    spec = _spec(search).with_params({k: _suggest(trial, k, d) for k, d in search["space"].items()})
    reproducibility.configure(spec.seed, threads)  # every trial starts from the same seed
    tags = {**run_tags(spec, threads), "mlflow.parentRunId": search["parent_run"], "search": search["name"],
            "trial": str(trial.number), "role": "trial"}
    with RunTracker(_uri(search), spec.study, spec, threads, run_name=f"trial{trial.number}/{search['method']}",
                    tags=tags) as run:
        try:
            value = _objective(search, spec, store, init, trial, run)
        except optuna.TrialPruned as e:
            log.info("trial %d pruned: %s", trial.number, e)
            run.status = "KILLED"
            study.tell(trial, state=TrialState.PRUNED)
            return
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        run.log_values({"objective": value})
        study.tell(trial, value)


def _run_trials(study, search: dict[str, Any], worker: int, store: Path, init: Path | None, threads: int) -> int:
    """Claim and run trials until the shared budget of finished trials is met (or this job's timeout)."""
    from optuna.trial import TrialState

    finished, live = (TrialState.COMPLETE, TrialState.PRUNED), (TrialState.COMPLETE, TrialState.PRUNED,
                                                                  TrialState.RUNNING)
    deadline = None if search["timeout"] is None else time.monotonic() + search["timeout"]
    ran = 0
    while deadline is None or time.monotonic() < deadline:
        if len(study.get_trials(deepcopy=False, states=live)) >= search["trials"]:
            break  # finished, or the rest are running in other workers
        trial = study.ask()
        trial.set_user_attr("worker", worker)
        ahead = [t for t in study.get_trials(deepcopy=False, states=live) if t.number < trial.number]
        if len(ahead) >= search["trials"]:  # another worker claimed the last trial first
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        _run_trial(study, trial, search, store, init, threads)
        ran += 1
    log.info("worker %d ran %d trials; finished in the study: %d of %d", worker, ran,
             len(study.get_trials(deepcopy=False, states=finished)), search["trials"])
    return ran


def work(search: dict[str, Any], worker: int, store: Path, init: Path | None, threads: int) -> dict[str, Any]:
    """One worker job: fail what this worker left RUNNING when killed, then run trials to the budget."""
    study = _open(search, worker)
    retried = _fail_stale(study, owner=worker)
    ran = _run_trials(study, search, worker, store, init, threads)
    return {"worker": worker, "ran": ran, "retried": retried, "states": _counts(study)}


def best(search: dict[str, Any], store: Path, init: Path | None, threads: int, folder: Path) -> dict[str, Any]:
    """After all workers: finish the budget, write ``best.json`` and the plots, close the parent run."""
    import mlflow
    from mlflow.entities import Metric, Param
    from optuna.trial import TrialState

    from mmrepro.report.marking import marked, title_for

    study = _open(search, search["workers"])
    _fail_stale(study, owner=None)  # every worker job has ended: nothing RUNNING is alive
    _run_trials(study, search, search["workers"], store, init, threads)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise RuntimeError(f"search {search['name']}: no trial completed ({_counts(study)}); "
                           "raise tune.timeout or loosen tune.pruner")
    top = study.best_trial
    counts = _counts(study)
    result = {k: search[k] for k in ("study", "dataset", "method", "name", "trials")}
    result.update(params=top.params, value=top.value, trial=top.number,
                  default_point=top.user_attrs.get("point") == "default", states=counts,
                  setting=_spec(search).setting, target_labels_used=scores_target_labels(_spec(search)))
    folder.mkdir(parents=True, exist_ok=True)
    with marked(title_for([_spec(search).stand_in])):
        plot_search(study, folder, search["seed"])
    client = mlflow.MlflowClient(tracking_uri=_uri(search))
    parent = search["parent_run"]
    client.log_batch(parent, params=[Param(f"best.{k}"[:250], str(v)) for k, v in top.params.items()],
                     metrics=[Metric("best_valid_loss", float(top.value), int(time.time() * 1000), top.number)],
                     tags=[mlflow.entities.RunTag("best_trial", str(top.number))])
    for name in ("history.png", "importances.png"):
        client.log_artifact(parent, str(folder / name))
    client.set_terminated(parent, status="FINISHED")
    return result


def plot_search(study, folder: Path, seed: int) -> None:
    """``history.png`` (objective per trial, best so far) and ``importances.png`` (fANOVA, seeded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    from mmrepro.report.marking import mark_figure

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the plots are stable here
    ax = plot_optimization_history(study)
    mark_figure(ax.figure)
    ax.figure.savefig(folder / "history.png", bbox_inches="tight")
    plt.close(ax.figure)
    try:
        ax = plot_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
    except (RuntimeError, ValueError) as e:  # too few finished trials, or no parameter varied
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, f"no importances: {e}", ha="center", va="center", wrap=True)
        ax.set_axis_off()
    mark_figure(ax.figure)
    ax.figure.savefig(folder / "importances.png", bbox_inches="tight")
    plt.close(ax.figure)

