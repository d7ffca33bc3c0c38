"""SLURM for real: the tiny config through ``snakemake --executor slurm`` with the project's profile,
on a one-node cluster started on this machine (``tests/cluster/start_slurm.sh``), jobs logging to an
MLflow server on loopback. Skipped, with the reason, where SLURM is not installed or cannot start."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import mlflow
import pytest
import yaml

from conftest import REPO
from test_tracking_parallel import mlflow_server
from test_workflow import SNAKEFILE

pytestmark = pytest.mark.slow
START = REPO / "tests" / "cluster" / "start_slurm.sh"
RESOURCES = {"threads": 2, "mem_mb": 1234, "runtime": 7}  # what sbatch must receive for a train job
CONFIG = {
    "results": "out",
    "seeds": [0],
    "resources": {"train": RESOURCES},
    "datasets": {"synth": {"loader": "synth", "synth": {"n": {"train": 64, "valid": 32, "test": 32}}}},
    "model": {"d_model": 8, "heads": 2},
    "train": {"epochs": 1, "batch_size": 32},
    "studies": {"balance": {"datasets": ["synth"], "methods": ["joint"], "settings": {"complete": {"type": "complete"}}}},
}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running one-node cluster, stopped afterwards."""
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (as root on Debian: tests/cluster/start_slurm.sh --install)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld and slurmd needs root")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("the SLURM executor plugin is not installed: pip install -e '.[slurm]'")
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(START), str(state)], capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        subprocess.run(["bash", str(START), "--stop", str(state)], timeout=60)
        pytest.skip(f"the SLURM services did not start: {started.stderr.strip()[-500:]}")
    yield "/etc/slurm/slurm.conf"
    subprocess.run(["bash", str(START), "--stop", str(state)], timeout=60)


def _jobs(env) -> list[dict[str, str]]:
    """Every job the controller remembers, as ``scontrol show job`` fields."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], env=env, capture_output=True, text=True, timeout=60).stdout
    return [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in out.splitlines() if line.startswith("JobId=")]


def test_the_tiny_config_runs_on_slurm_with_per_rule_resources(slurm, tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "SLURM_CONF": slurm, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    before = {job["JobId"] for job in _jobs(env)}
    with mlflow_server(tmp_path) as uri:
        env["MLFLOW_TRACKING_URI"] = uri
        done = subprocess.run(
            [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(tmp_path),
             "--configfile", str(tmp_path / "config.yaml"), "--profile", str(REPO / "workflow" / "profiles" / "slurm"),
             "--default-resources", "slurm_account=mmrepro", "slurm_partition=mmrepro", "mem_mb=500", "runtime=10",
             "--slurm-status-command", "squeue", "--latency-wait", "10", "--jobs", "2"],
            env=env, capture_output=True, text=True, cwd=tmp_path, timeout=1500)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        client = mlflow.MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("balance").experiment_id])
        assert [r.info.status for r in runs] == ["FINISHED"]
    metrics = json.loads((tmp_path / "out/balance/synth/joint/complete/seed0/metrics.json").read_text())
    assert metrics["epochs_run"] == 1
    assert not (tmp_path / "out" / "mlflow.db").exists()  # the jobs logged to the server, not to a shared file

    submitted = [job for job in _jobs(env) if job["JobId"] not in before]
    assert {job["JobState"] for job in submitted} == {"COMPLETED"}
    train = [job for job in submitted if "rule_train" in job.get("Comment", "") + job.get("JobName", "")]
    assert len(train) == 1, [(j.get("JobName"), j.get("Comment")) for j in submitted]
    job = train[0]
    assert job["MinMemoryNode"] == f"{RESOURCES['mem_mb']}M"
    assert job["TimeLimit"] == f"00:{RESOURCES['runtime']:02d}:00"
    assert job["NumCPUs"] == str(RESOURCES["threads"])
    assert job["Partition"] == "mmrepro"
    data = [j for j in submitted if "rule_make_data" in j.get("Comment", "") + j.get("JobName", "")]
    assert data and data[0]["MinMemoryNode"] == "4000M"  # the data rule's own resources
