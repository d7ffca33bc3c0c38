"""What each rule's job asks the scheduler for (threads, mem_mb, runtime in minutes, gpu), from the config.

A training, backbone or adaptation job asks ``resources.train``, overridden per dataset entry by
``resources.datasets.<entry>.train``; the entry is the data the job reads (a backbone's source, an
adaptation's target). A make-data job asks its loader's default (:data:`DATA_DEFAULTS`), overridden by
``resources.datasets.<entry>.data``. ``config/paper.yaml`` sets the paper grid's figures from what
``benchmarks/paper_cost.py`` measured, and ``tests/test_resources.py`` holds them to the checked-in
measurements (``benchmarks/measured/paper_cost.csv``).
"""

from __future__ import annotations

from typing import Any

from mmrepro.config import backbone_source, search_run, target_dataset

#: make-data's request per loader (converting images and volumes takes longer); others: DATA_FALLBACK
DATA_DEFAULTS: dict[str, dict[str, int]] = {
    "mmsa": {"mem_mb": 16000, "runtime": 30}, "mult": {"mem_mb": 16000, "runtime": 30},
    "food101": {"mem_mb": 16000, "runtime": 600}, "brats": {"mem_mb": 8000, "runtime": 240},
}
DATA_FALLBACK = {"mem_mb": 4000, "runtime": 30}


def job_data(config: dict[str, Any], study: str, dataset: str, setting: str | None) -> str:
    """The dataset entry a job reads, the one its cost follows: a backbone's source (``setting`` None),
    else the setting's target (the run's own dataset unless a ``dataset`` setting names another)."""
    if setting is None:
        return backbone_source(config, study, dataset)
    return target_dataset(config, study, dataset, setting)


def train_resources(config: dict[str, Any], study: str, dataset: str, setting: str | None) -> dict[str, int]:
    """threads, mem_mb, runtime, gpu of a train or adapt job (``setting`` None: a backbone job)."""
    own = config["resources"].get("datasets", {}).get(job_data(config, study, dataset, setting), {})
    return {**config["resources"]["train"], **own.get("train", {})}


def search_resources(config: dict[str, Any], study: str, dataset: str, method: str, worker: bool) -> dict[str, int]:
    """A search's job asks what the run its trials stand for asks (:func:`~mmrepro.config.search_run`); a
    ``worker`` runs its share of ``tune.trials`` one after the other, so its runtime is that many times."""
    own = train_resources(config, study, dataset, search_run(config, study, dataset, method)["setting"])
    trials = -(-config["tune"]["trials"] // config["tune"]["workers"]) if worker else 1
    return {**own, "runtime": own["runtime"] * trials}


def data_resources(config: dict[str, Any], dataset: str) -> dict[str, int]:
    """mem_mb and runtime of the make-data job of ``dataset``."""
    loader = config["datasets"][dataset]["loader"]
    own = config["resources"].get("datasets", {}).get(dataset, {})
    return {**DATA_DEFAULTS.get(loader, DATA_FALLBACK), **own.get("data", {})}
