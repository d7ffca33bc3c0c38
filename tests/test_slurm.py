"""SLURM for real: the README's "On a cluster (SLURM)" section followed as a user would, on a
one-node cluster that this test starts (``tests/cluster/start_slurm.sh``). In a copy of the
workflow, with the tiny config: a copy of the SLURM profile with account and partition filled in
(and the status command the README names for a cluster without accounting, which this one is),
the README's tracking server on this machine's host name, and the README's command; nothing else
on the command line. Also: a configuration the jobs refuse fails once, its message on the terminal.

Skipped, with the reason, where SLURM or the SLURM executor plugin is not installed or the user is
not root (CI installs neither). Fails, not skips, where SLURM is installed but its daemons do not
start, or where SLURM daemons this test did not start already run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import mlflow
import pytest
import yaml

from conftest import REPO
from test_tracking_parallel import mlflow_server

pytestmark = pytest.mark.slow
START = REPO / "tests" / "cluster" / "start_slurm.sh"
ACCOUNT, PARTITION = "mmrepro_test", "mmrepro"  # any account (no accounting database); the script's partition
RESOURCES = {"threads": 2, "mem_mb": 1234, "runtime": 7, "gpu": 1}  # what sbatch must receive for a train job
CONFIG = {
    "seeds": [0],
    "resources": {"train": RESOURCES},
    "datasets": {"synth": {"loader": "synth", "synth": {"n": {"train": 64, "valid": 32, "test": 32}}}},
    "model": {"d_model": 8, "heads": 2},
    "train": {"epochs": 1, "batch_size": 32},
    "studies": {"balance": {"datasets": ["synth"], "methods": ["joint"], "settings": {"complete": {"type": "complete"}}}},
}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a one-node cluster this test started, stopped afterwards (only its own daemons)."""
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (as root on Debian: tests/cluster/start_slurm.sh --install)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld and slurmd needs root")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("the SLURM executor plugin is not installed: pip install -e '.[slurm]'")
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(START), str(state)], capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        pytest.fail(f"SLURM is installed but the test's cluster did not start: {started.stderr.strip()[-1500:]}")
    try:
        yield "/etc/slurm/slurm.conf"
    finally:
        subprocess.run(["bash", str(START), "--stop", str(state)], timeout=120, check=True)


@pytest.fixture
def project(tmp_path):
    """A copy of the workflow, the tiny config, and the SLURM profile copied and edited as the README says."""
    for folder in ("workflow", "config"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    shutil.copy(REPO / "environment.yml", tmp_path)  # the rules' conda env, recorded with each job
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    shutil.copytree(tmp_path / "workflow" / "profiles" / "slurm", tmp_path / "my-slurm")
    profile = tmp_path / "my-slurm" / "config.yaml"
    text = profile.read_text()
    for placeholder in ('"your_account"', '"your_partition"', "# slurm-status-command: squeue"):
        assert placeholder in text, f"the README's profile edit needs {placeholder!r} in {profile}"
    profile.write_text(text.replace('"your_account"', ACCOUNT).replace('"your_partition"', PARTITION)
                       .replace("# slurm-status-command: squeue", "slurm-status-command: squeue"))
    return tmp_path


def _env(slurm: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "SLURM_CONF": slurm, "PATH": f"{os.path.dirname(sys.executable)}:{env['PATH']}", **extra}


def _jobs(env) -> list[dict[str, str]]:
    """Every job the controller remembers, as ``scontrol show job`` fields."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], env=env, capture_output=True, text=True, timeout=60).stdout
    return [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in out.splitlines() if line.startswith("JobId=")]


def _of_rule(jobs, rule: str) -> list[dict[str, str]]:
    return [j for j in jobs if f"rule_{rule}" in j.get("Comment", "") + j.get("JobName", "")]


def _snakemake(project, env, *args: str) -> subprocess.CompletedProcess:
    """The README's command in the project's root, with the tiny config."""
    return subprocess.run([sys.executable, "-m", "snakemake", "--profile", "my-slurm", *args, "--configfile", "tiny.yaml"],
                          env=env, capture_output=True, text=True, cwd=project, timeout=1500)


def test_the_readme_slurm_section_runs_balance_to_its_table(slurm, project):
    env = _env(slurm)
    before = {job["JobId"] for job in _jobs(env)}
    results = project / "results"
    with mlflow_server(results / "mlflow.db", results / "mlartifacts", host=socket.gethostname()) as uri:
        env["MLFLOW_TRACKING_URI"] = uri
        # doctor asks the tracking API as a job would: the server answers its host name, refuses another
        doctor = [sys.executable, "-m", "mmrepro.cli", "doctor", "--configfile", "tiny.yaml"]
        checked = subprocess.run(doctor, env=env, capture_output=True, text=True, cwd=project, timeout=600)
        assert f"[  ok] tracking: server {uri} answers its tracking API" in checked.stdout, checked.stdout
        loopback = uri.replace(socket.gethostname(), "127.0.0.1")
        refused = subprocess.run(doctor, env={**env, "MLFLOW_TRACKING_URI": loopback}, capture_output=True, text=True,
                                 cwd=project, timeout=600)
        assert refused.returncode == 1 and f"tracking server {loopback} refuses the tracking API: 403" in refused.stdout

        done = _snakemake(project, env, "balance")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        client = mlflow.MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("balance").experiment_id])
        assert [r.info.status for r in runs] == ["FINISHED"]
    run_dir = results / "balance/synth/joint/complete/seed0"
    assert json.loads((run_dir / "metrics.json").read_text())["epochs_run"] == 1
    logged = json.loads((run_dir / "tracking.json").read_text())
    assert (logged["uri"], logged["run_id"]) == (uri, runs[0].info.run_id)  # logged live, from the SLURM job
    table = (results / "tables" / "balance.md").read_text().splitlines()
    assert [row for row in table if row.startswith("| synth | joint | complete | 1 |")], table  # the table, with the run

    submitted = [job for job in _jobs(env) if job["JobId"] not in before]
    assert submitted and {job["JobState"] for job in submitted} == {"COMPLETED"}
    assert {(job["Account"], job["Partition"]) for job in submitted} == {(ACCOUNT, PARTITION)}  # the profile's
    [train] = _of_rule(submitted, "train")
    assert train["MinMemoryNode"] == f"{RESOURCES['mem_mb']}M"
    assert train["TimeLimit"] == f"00:{RESOURCES['runtime']:02d}:00"
    assert train["NumCPUs"] == str(RESOURCES["threads"])
    assert train["TresPerJob"] == f"gres:gpu:{RESOURCES['gpu']}"  # the cluster's stand-in GPU; training ran on CPU
    [data] = _of_rule(submitted, "make_data")
    assert data["MinMemoryNode"] == "4000M"  # the data rule's own resources


def test_a_refused_configuration_fails_once_with_its_message_on_the_terminal(slurm, project):
    env = _env(slurm)
    before = {job["JobId"] for job in _jobs(env)}
    with mlflow_server(project / "server.db", project / "server-artifacts", host=socket.gethostname()) as uri:
        # a server that refuses the name the jobs use (403): the local init rule fails, before any training job
        loopback = uri.replace(socket.gethostname(), "127.0.0.1")
        done = _snakemake(project, {**env, "MLFLOW_TRACKING_URI": loopback}, "balance")
    terminal = done.stdout + done.stderr
    assert done.returncode != 0
    assert terminal.count(f"tracking server {loopback} refuses the tracking API: 403") >= 1, terminal[-3000:]
    assert "Trying to restart" not in terminal
    assert not _of_rule([j for j in _jobs(env) if j["JobId"] not in before], "train")

    # live logging to the default sqlite store from inside an allocation: the job refuses, once
    config = yaml.safe_load((project / "tiny.yaml").read_text())
    (project / "tiny.yaml").write_text(yaml.safe_dump({**config, "tracking": {"mode": "live"}}))
    done = _snakemake(project, env, "balance")
    terminal = done.stdout + done.stderr
    assert done.returncode != 0
    assert "this job runs on a SLURM node and would share the default sqlite store" in terminal, terminal[-3000:]
    assert "Trying to restart" not in terminal
    [train] = _of_rule([j for j in _jobs(env) if j["JobId"] not in before], "train")
    assert train["JobState"] == "FAILED"
