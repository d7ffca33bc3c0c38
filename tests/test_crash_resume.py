"""Crash and resume through Snakemake: the whole run (Snakemake and its training job) is killed with
SIGKILL mid-training, then ``snakemake --rerun-incomplete`` resumes the job from its last epoch
checkpoint and writes the same metrics.json as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from test_workflow import SNAKEFILE

EPOCHS = 4
CONFIG = {
    "results": "out",
    "seeds": [0],
    "datasets": {"synth": {"loader": "synth", "synth": {"n": {"train": 480, "valid": 64, "test": 64}}}},
    "model": {"d_model": 8, "heads": 2},
    "train": {"epochs": EPOCHS, "batch_size": 32, "patience": EPOCHS},
    "studies": {"balance": {"datasets": ["synth"], "methods": ["joint"], "settings": {"complete": {"type": "complete"}}}},
}
RUN = "out/balance/synth/joint/complete/seed0"


def _command(workdir, *args):
    return [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), "--cores", "1", *args]


def _env():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_incomplete_gives_the_same_metrics(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    ckpt = tmp_path / RUN / "last.ckpt"
    snake = subprocess.Popen(_command(tmp_path), env=_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not ckpt.exists():  # the job has finished epoch 1 and is inside epoch 2
            assert snake.poll() is None, "snakemake ended before the first epoch checkpoint"
            assert time.monotonic() < deadline, "no epoch checkpoint within 10 min"
            time.sleep(0.02)
    finally:
        os.killpg(snake.pid, signal.SIGKILL)  # snakemake and its job: the group this test started
        snake.wait()
    time.sleep(0.5)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert 1 <= saved["state"]["epoch"] < EPOCHS, "the kill must land mid-training"
    assert not (tmp_path / RUN / "metrics.json").exists()

    unlock = subprocess.run(_command(tmp_path, "--unlock"), env=_env(), capture_output=True, text=True, timeout=300)
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    again = subprocess.run(_command(tmp_path, "--rerun-incomplete"), env=_env(), capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (tmp_path / "out" / "logs" / "balance" / "synth" / "joint" / "complete" / "seed0.log").read_text()
    assert f"resumed from {ckpt.relative_to(tmp_path)} after epoch {saved['state']['epoch']}" in log, log[-2000:]
    assert not ckpt.exists()
    resumed = tmp_path / RUN / "metrics.json"
    assert json.loads(resumed.read_text())["epochs_run"] == EPOCHS

    # the uninterrupted run: the same job spec on the same store, from scratch
    straight = tmp_path / "straight"
    done = subprocess.run([sys.executable, "-m", "mmrepro.cli", "train", "--spec", (tmp_path / RUN / "config.json").read_text(),
                           "--data", str(tmp_path / "out" / "data" / "synth" / "manifest.json"),
                           "--out-dir", str(straight), "--threads", "1"],
                          env=_env(), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed" not in done.stderr
    assert (straight / "metrics.json").read_bytes() == resumed.read_bytes()
