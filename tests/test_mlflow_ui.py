"""The MLflow UI as a new user meets it: ``mlflow ui --app-name mmrepro`` opens experiments on their
training runs, whose Duration is the job's and whose charts open on the loss curves (headless
Chromium, skipped where it is not installed: Debian ``apt-get install chromium``)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import tomllib
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path

import mlflow.server
import pytest

from chromium import CHROMIUM, Page
from mmrepro.mlflow_ui import DEFAULT_SWITCH, create_app, index_page
from mmrepro.spec import TrackingSpec
from mmrepro.tracking import ingest_runs, init_store, tracking_uri
from test_tracking import SPEC, _finished_run_folder, _free_port, _serve, _stop

ROOT = Path(__file__).resolve().parents[1]


def test_the_page_sets_the_switch_before_mlflow_reads_it():
    html = (Path(mlflow.server.app.static_folder) / "index.html").read_text()
    page = index_page(html)
    assert page.count(DEFAULT_SWITCH) == 1 and page.index(DEFAULT_SWITCH) < page.index("<script defer")
    with pytest.raises(ValueError, match="index.html"):
        index_page("<html><body></body></html>")


def test_the_app_is_mlflows_serving_that_page(monkeypatch):
    monkeypatch.delenv("_MLFLOW_SGI_NAME", raising=False)  # Flask, as for mlflow's gunicorn and waitress servers
    served = create_app().test_client().get("/")
    assert served.status_code == 200 and DEFAULT_SWITCH in served.get_data(as_text=True)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["mlflow.app"]
    assert declared == {"mmrepro": "mmrepro.mlflow_ui:create_app"}


def _sections(text: str) -> list[str]:
    """The chart sections of a run's metrics page, in page order: each header is its name, then ``(N)``."""
    lines = [line.strip() for line in text.splitlines()]
    return [name for name, count in zip(lines, lines[1:]) if re.fullmatch(r"\(\d+\)", count)]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_a_new_user_meets_the_training_runs(tmp_path, monkeypatch):
    """The README's ``mlflow ui --app-name mmrepro`` over a store the track step filled, in a fresh
    browser: the experiments list, click the study, its runs with their jobs' Duration, click a run,
    its Model metrics open on the loss curves; init-tracking's compare link shows the study's columns,
    and they stay the experiment's once saved."""
    if "mmrepro" not in {e.name for e in entry_points(group="mlflow.app")}:
        pytest.skip("mmrepro's mlflow.app entry point is not installed (pip install -e . registers it)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(tmp_path)
    exp_id = init_store(uri, ["balance"], tmp_path / "mlartifacts")["balance"]
    job_start = time.time() - 3600
    folders = []
    for method in ("joint", "cggm"):
        folder = tmp_path / "balance" / method
        _finished_run_folder(folder, replace(SPEC, method=method, results=str(tmp_path),
                                             tracking=TrackingSpec(uri=None, mode="deferred")), "deferred")
        (folder / "timings.json").write_text(json.dumps({"train": 85.0, "total": 90.0, "start": job_start,
                                                         "end": job_start + 90}))
        folders.append(folder)
    ingest_runs(uri, folders)  # logged in well under a second; the jobs took 90 s each
    port = _free_port()
    server = _serve(["ui", "--app-name", "mmrepro", "--backend-store-uri", uri], port)
    base = f"http://127.0.0.1:{port}/#/experiments"

    async def browse() -> dict[str, str]:
        async with Page(tmp_path / "profile") as page:
            await page.goto(base)
            await page.wait_for_text("balance")
            await page.click("a", "balance", "location.href.includes('/runs')")
            assert f"/experiments/{exp_id}/runs" in await page.url()
            await page.wait_for_text("joint/complete/seed3", "cggm/complete/seed3", "1.5min")
            await page.screenshot(tmp_path / "runs.png")
            runs = await page.text()
            await page.click("a", "joint/complete/seed3", "location.href.includes('/runs/')")
            await page.click("button, [role=tab], a, span", "Model metrics", "location.href.includes('model-metrics')")
            await page.wait_for_text("train_loss", "valid_loss", "oracle/test")
            await page.wait_for("document.querySelectorAll('.js-plotly-plot').length >= 2", "the first charts drawn")
            await page.screenshot(tmp_path / "metrics.png")
            metrics = await page.text()
            await page.goto(f"{base}/{exp_id}/runs?viewStateShareKey=compare")  # the link init-tracking prints
            await page.wait_for_text("test/mae", "dataset", "method", "setting", "seed")
            await page.screenshot(tmp_path / "compare.png")
            compare = await page.text()
            await page.click("button", "Override saved view", "!document.body.innerText.includes('a shared view')")
            await page.goto(base)  # the saved view stays the experiment's in this browser
            await page.click("a", "balance", "location.href.includes('/runs')")
            await page.wait_for_text("joint/complete/seed3", "test/mae", "method")
            return {"runs": runs, "metrics": metrics, "compare": compare}

    try:
        seen = asyncio.run(browse())
    finally:
        _stop(server)
    assert "GenAI apps" not in seen["runs"] and "Traces 0" not in seen["runs"]
    assert not re.search(r"\b\d+ms\b", seen["runs"]), "a run lasts as long as its job, not its logging"
    sections = _sections(seen["metrics"])
    assert sections[0] == "loss" and {"oracle/test", "test"} <= set(sections[1:]), sections
    assert "results/balance" not in seen["compare"]
    for shot in ("runs", "metrics", "compare"):
        assert (tmp_path / f"{shot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
