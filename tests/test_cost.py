"""The paper grid's cost model and what its jobs ask the scheduler for: every job of config/paper.yaml
falls in exactly one measured type, one job's time multiplies out as documented, and every rule's request
covers what benchmarks/paper_cost.py measured (benchmarks/measured/*.csv, checked in)."""

from __future__ import annotations

import csv

import pytest

from conftest import REPO, SCHEMA
from mmrepro.config import backbone_runs, load_schema, read_config_files, study_grid, validate_config
from mmrepro.cost import StepCost, job_seconds, job_types, steps_per_epoch
from mmrepro.data.standin.plan import Scale, choose_counts
from mmrepro.resources import DATA_FALLBACK, data_resources, search_resources, train_resources

MEASURED = REPO / "benchmarks" / "measured"


@pytest.fixture(scope="module")
def paper() -> dict:
    return validate_config(read_config_files([REPO / "config" / "config.yaml", REPO / "config" / "paper.yaml"]),
                           load_schema(SCHEMA))


def test_every_paper_job_is_in_one_type(paper):
    types = job_types(paper)
    studies = [s for s, c in paper["studies"].items() if c.get("datasets")]
    grid = sum(len(study_grid(paper, s)) + len(backbone_runs(paper, s)) for s in studies)
    assert sum(len(t.runs) for t in types) == grid   # paper.yaml searches nothing: no trial runs
    assert len({t.key for t in types}) == len(types)
    views = [t for t in types if t.key == "train/missing/iemocap_mmin_neutral/mplmm"]
    assert len(views) == 1 and {r["data"] for r in views[0].runs} == {f"iemocap_mmin_{e}" for e in
                                                                          ("neutral", "happy", "sad", "angry")}
    variants = next(t for t in types if t.key == "train/balance/iemocap_mmin/cggm")
    assert {r["method"] for r in variants.runs} == {"cggm", "cggm_magnitude", "cggm_direction"}


def test_one_job_multiplies_out():
    cost = StepCost(step_s=2.0, epoch_extra_s=1.0, final_s=3.0, fixed_s=5.0, written=10)
    # 3 epochs x (4 steps x 2 s + 1 s grown x2) + 3 s grown x2 + 5 s
    assert job_seconds(cost, real=20, epochs=3, steps_per_epoch=4) == pytest.approx(41.0)
    assert job_seconds(cost, real=20, epochs=0, steps_per_epoch=0) == pytest.approx(11.0)   # an adapt job
    assert steps_per_epoch(1284, 64) == 21 and steps_per_epoch(10, 64) == 1


def test_stand_in_share_keeps_shapes_and_cuts_every_split():
    real = {"train": 1284, "valid": 229, "test": 686}
    counts = choose_counts(Scale("full", fraction=0.1), real, {"train": 1, "valid": 1, "test": 1}, 1000)
    assert counts.written == {"train": 129, "valid": 23, "test": 69} and counts.real == real and "fraction" in counts.cut
    assert choose_counts(Scale("full", max_bytes=10**5, fraction=0.5), real, {}, 1000).written["train"] == 58
    with pytest.raises(ValueError, match="fraction"):
        Scale("full", fraction=0.0)


def _rows(name: str) -> list[dict]:
    with open(MEASURED / name) as f:
        return [r for r in csv.DictReader(f) if r.get("peak_rss_mb")]


def test_paper_requests_cover_what_was_measured(paper):
    rows = _rows("paper_cost.csv")
    assert rows, "benchmarks/measured/paper_cost.csv holds no measured job type"
    under = []
    for r in rows:
        ask = train_resources(paper, r["study"], r["dataset"], None if r["kind"] == "backbone" else r["setting"])
        if ask["mem_mb"] < float(r["peak_rss_mb"]) or ask["runtime"] < int(r["job_min"]):
            under.append((r["type"], ask["mem_mb"], r["peak_rss_mb"], ask["runtime"], r["job_min"]))
    assert not under, f"requests under the measured need (type, mem asked, peak MB, runtime asked, minutes): {under}"
    for r in _rows("paper_make_data.csv"):
        ask = data_resources(paper, r["entry"])
        assert ask["mem_mb"] >= float(r["real_peak_mb"]) and ask["runtime"] >= int(r["real_min"]), r


def test_requests_follow_the_data_a_job_reads(paper):
    config = {**paper, "resources": {"train": {"threads": 1, "mem_mb": 100, "runtime": 5, "gpu": 0},
                                     "datasets": {"mosei_mult": {"train": {"mem_mb": 900}},
                                                  "sims_casp": {"train": {"runtime": 70}, "data": {"mem_mb": 7}}}}}
    assert train_resources(config, "missing", "sims", None)["mem_mb"] == 900      # the backbone trains on MOSEI
    assert train_resources(config, "missing", "sims", "rate0.7")["mem_mb"] == 100
    assert train_resources(config, "shift", "mosi_casp", "to_sims")["runtime"] == 70   # adapts on the target
    assert data_resources(config, "sims_casp") == {"mem_mb": 7, "runtime": 30}
    assert data_resources({"datasets": {"s": {"loader": "synth"}}, "resources": {}}, "s") == DATA_FALLBACK
    tuned = {**config, "tune": {**config["tune"], "trials": 5, "workers": 2}}
    assert search_resources(tuned, "shift", "mosi_casp", "casp", worker=True)["runtime"] == 5 * 3
