"""``mmrepro doctor``: reports versions, threads, GPU, tracking and data, and fails on what is broken."""

from __future__ import annotations

import contextlib
import http.server
import socket
import sqlite3
import threading
from pathlib import Path

import pytest
import yaml

from conftest import SCHEMA, small_synth
from mmrepro.cli import main
from mmrepro.config import EXPERIMENTS
from mmrepro.data import build_store


def _config(tmp_path, **tracking) -> str:
    config = {"results": str(tmp_path / "results"), "tracking": tracking,
              "datasets": {"synth": small_synth(train=20, valid=10, test=10)},
              "studies": {"balance": {"datasets": ["synth"], "methods": ["joint"],
                                      "settings": {"complete": {"type": "complete"}}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "config.yaml")


def _initialised_store(path) -> None:
    """The experiments table as MLflow's init rule leaves it (its columns name and lifecycle_stage;
    a real store takes tens of seconds to create on a busy machine, test_tracking covers that)."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE experiments (experiment_id INTEGER, name TEXT, lifecycle_stage TEXT)")
        db.executemany("INSERT INTO experiments VALUES (?, ?, 'active')", list(enumerate(["Default", *EXPERIMENTS])))


def doctor(capsys, *args) -> tuple[int, str]:
    code = main(["doctor", "--schema", str(SCHEMA), "--configfile", *args])
    return code, capsys.readouterr().out


def test_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["doctor", "--help"])
    assert done.value.code == 0 and "exit code 1 when something is broken" in " ".join(capsys.readouterr().out.split())


def test_a_ready_project_reports_everything_and_exits_0(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _config(tmp_path)
    build_store("synth", small_synth(train=20, valid=10, test=10), tmp_path / "results" / "data" / "synth")
    _initialised_store(tmp_path / "results" / "mlflow.db")
    code, out = doctor(capsys, config)
    assert code == 0, out
    for line in ("] torch: 2.", "] mlflow: 3.", "] snakemake: ", "] threads: ", "] gpu: ", "] config: ",
                 f"] tracking: sqlite:///{tmp_path}/results/mlflow.db: experiments {', '.join(EXPERIMENTS)}",
                 "] data synth: ", "every array matches its checksum", "ready: nothing to fix"):
        assert line in out, (line, out)
    assert "FAIL" not in out


def test_what_is_broken_is_named_with_its_fix_and_exits_1(tmp_path, capsys, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    config = _config(tmp_path)
    store = build_store("synth", small_synth(train=20, valid=10, test=10), tmp_path / "results" / "data" / "synth")
    target = store.parent / "train" / "x" / "text.npy"
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    target.write_bytes(bytes(raw))
    code, out = doctor(capsys, config)
    assert code == 1
    assert f"[FAIL] tracking: tracking server http://127.0.0.1:{port} does not answer" in out
    assert "[FAIL] data synth: file=" in out and "key=x/text: checksum mismatch" in out
    assert f"fix: rm -r {store.parent} && snakemake --cores all {store} --configfile {config}" in out
    assert "2 problem(s) to fix" in out


def test_a_bad_config_and_a_missing_manual_dataset_fail(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"datasets": {"synth": {"loader": "synth"}}, "studies": {"balance": {}}}))
    code, out = doctor(capsys, str(bad))
    assert code == 1 and "[FAIL] config: invalid config" in out and "studies.balance" in out
    config = yaml.safe_load(open(_config(tmp_path)))
    config["datasets"]["mosi"] = {"loader": "mmsa", "path": str(tmp_path / "absent.pkl")}
    config["studies"]["balance"]["datasets"] = ["mosi"]
    (tmp_path / "mosi.yaml").write_text(yaml.safe_dump(config))
    code, out = doctor(capsys, str(tmp_path / "mosi.yaml"))
    assert code == 1 and "[FAIL] data mosi: " in out and "cannot be downloaded automatically" in out
    assert f"fix: snakemake --cores 1 fetch_mosi --configfile {tmp_path / 'mosi.yaml'} prints the manual steps" in out
    config["datasets"]["mosi"].update(path="absent.pkl", stand_in="tiny")   # the fetch step writes a stand-in
    (tmp_path / "mosi.yaml").write_text(yaml.safe_dump(config))
    code, out = doctor(capsys, str(tmp_path / "mosi.yaml"))
    assert "[warn] data mosi: " in out and "snakemake writes the random stand-in first; now: snakemake --cores 1 fetch_mosi" in out


def test_every_fix_is_a_command_snakemake_accepts_as_written(tmp_path, capsys, monkeypatch):
    """Targets before --configfile (which reads every word after it as a file), --cores given, and
    config/config.yaml (which the Snakefile loads itself) not repeated."""
    import shlex

    from snakemake.cli import get_argument_parser

    from mmrepro.doctor import snakemake_command
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("{}")
    (tmp_path / "paper.yaml").write_text("{}")
    command = snakemake_command("fetch_mosi", [Path("config/config.yaml"), Path("paper.yaml")])
    assert command == "snakemake --cores all fetch_mosi --configfile paper.yaml"
    args = get_argument_parser().parse_args(shlex.split(command)[1:])
    assert args.targets == ["fetch_mosi"] and args.cores and list(map(str, args.configfile)) == ["paper.yaml"]


def test_a_read_only_results_folder_fails_naming_it(tmp_path, capsys, monkeypatch):
    """What a run writes to is checked (as root, permission bits do not stop writes: the check asks
    the OS, which also answers for read-only mounts; here the OS is made to refuse)."""
    import os

    from mmrepro import doctor as module
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _config(tmp_path)
    (tmp_path / "results" / "tracking").mkdir(parents=True)
    refused = tmp_path / "results" / "tracking"
    monkeypatch.setattr(module.os, "access", lambda p, mode: Path(p) != refused and os.path.exists(p))
    code, out = doctor(capsys, config)
    assert code == 1
    assert f"[FAIL] writable: {refused} is not a writable folder; a run writes outputs of a run there" in out
    assert f"fix: chmod -R u+w {refused}, or set results: to a writable folder" in out


def test_work_folders_of_killed_conversions_are_listed_with_the_command_that_removes_them(tmp_path, capsys,
                                                                                          monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = _config(tmp_path)
    left = tmp_path / "results" / "data" / ".synth.partial-somehost-99-abcdefgh"
    (left / "train").mkdir(parents=True)
    (left / "train" / "x.npy").write_bytes(b"0" * 2_000_000)
    code, out = doctor(capsys, config)
    assert "[warn] data leftovers: 1 work folder(s) of interrupted conversions, 2 MB" in out
    assert f"fix: rm -r {left}" in out


def test_doctor_and_every_message_point_only_to_docs_that_exist():
    """A page named in a message (docs/x.md, with a 'Heading' after it) exists, with that heading."""
    import re

    from conftest import REPO
    pages = {}
    for source in (REPO / "src" / "mmrepro").rglob("*.py"):
        for page, heading in re.findall(r"(docs/[\w/.-]+\.md)(?: '([^']+)')?", source.read_text()):
            pages.setdefault((page, heading), source.name)
    assert pages, "no docs reference found: the pattern is wrong"
    for (page, heading), source in pages.items():
        path = REPO / page
        assert path.is_file(), f"{source} names {page}, which does not exist"
        if heading:
            assert re.search(rf"^#+ {re.escape(heading)}$", path.read_text(), re.M), f"{source}: no '{heading}' in {page}"
    assert not [s for s in (REPO / "src" / "mmrepro").rglob("*.py") if re.search(r"README section", s.read_text())]


@contextlib.contextmanager
def host_checking_server():
    """What MLflow 3.17's server answers for a Host header not in --allowed-hosts: /health 200, the API 403."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            health = self.path == "/health"
            body = b"OK" if health else b"Invalid Host header - possible DNS rebinding attack detected"
            self.send_response(200 if health else 403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_refusing_the_jobs_host_fails_doctor_and_init_tracking(tmp_path, capsys, monkeypatch):
    with host_checking_server() as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        code, out = doctor(capsys, _config(tmp_path))
        assert code == 1
        assert f"[FAIL] tracking: tracking server {uri} refuses the tracking API: 403 Invalid Host header" in out
        host = uri.removeprefix("http://")
        assert f"--allowed-hosts '{host.split(':')[0]},{host}'" in out
        # the local init rule asks the same before any job is submitted, and fails with the message
        assert main(["init-tracking", "--results", str(tmp_path), "--out", str(tmp_path / "exp.json")]) == 2
        err = capsys.readouterr().err
        assert f"mmrepro init-tracking: error: tracking.uri (or MLFLOW_TRACKING_URI): tracking server {uri} refuses" in err
        assert not (tmp_path / "exp.json").exists()
