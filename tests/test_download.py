"""Fetching real datasets: resume, checksums (published and trust-on-first-use), manual downloads,
folder checks, safe archive extraction and the ``mmrepro fetch`` verb, over a loopback HTTP server
and file:// sources (nothing here reaches the internet)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mmrepro.cli import main
from mmrepro.data.download import (ChecksumMismatch, ChecksumRegistry, DatasetIncomplete, DownloadIncomplete,
                                   ManualDownloadRequired, UnsafeArchive, fetch, fetch_and_report, verify)
from mmrepro.data.mmsa import PUBLISHED_SHA256
from mmrepro.progress import progress_disabled

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB: several read chunks
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """A loopback HTTP server with Range support, a one-shot connection drop and a request log."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[dict] = []  # {"path", "range", "status", "sent"}
        self.drop_after: int | None = None  # next GET: send this many body bytes, then close
        self.stall_after: int | None = None  # next GET: send this many body bytes, then go silent
        self.honour_range = True
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                entry = {"path": self.path, "range": self.headers.get("Range"), "status": None, "sent": 0}
                server.requests.append(entry)
                data = server.files.get(self.path)
                if data is None:
                    entry["status"] = 404
                    self.send_error(404)
                    return
                start, status = 0, 200
                if entry["range"] and server.honour_range:
                    start = int(entry["range"].removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        entry["status"] = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                entry["status"] = status
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.drop_after is not None:
                    body, server.drop_after = body[:server.drop_after], None
                    self.close_connection = True
                if server.stall_after is not None:
                    self.wfile.write(body[:server.stall_after])
                    self.wfile.flush()
                    server.stall_after = None
                    time.sleep(1.5)
                    self.close_connection = True
                    return
                # logged before writing: the client can finish reading before this thread resumes
                entry["sent"] = len(body)
                self.wfile.write(body)
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial files a fetch must not leave behind."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".part", ".tmp")) or ".extract." in p.name)


# ---------------------------------------------------------------------------------------------
# HTTP download, resume, published checksums


def test_http_download_resumes_after_a_dropped_connection(server, tmp_path):
    server.files["/data.pkl"] = PAYLOAD
    server.drop_after = 300_000
    target = tmp_path / "raw" / "data.pkl"
    source = {"url": server.url("/data.pkl"), "sha256": PAYLOAD_SHA}

    with pytest.raises(DownloadIncomplete, match="re-run to resume"):
        fetch("toy", source, target, checksums=tmp_path / "checksums.json")
    part = target.with_name("data.pkl.part")
    assert not target.exists()
    assert part.read_bytes() == PAYLOAD[:300_000]

    report = fetch_and_report("toy", source, target, checksums=tmp_path / "checksums.json")
    assert server.requests[-1]["range"] == "bytes=300000-"
    assert server.requests[-1]["status"] == 206
    assert server.requests[-1]["sent"] == len(PAYLOAD) - 300_000  # only the rest was transferred
    assert target.read_bytes() == PAYLOAD
    assert report["checksum"] == "published" and report["sha256"] == PAYLOAD_SHA
    assert "resumed" in report["actions"][0]
    assert leftovers(tmp_path) == []


def test_a_stalled_transfer_times_out_keeping_the_part_then_resumes(server, tmp_path):
    server.files["/data.pkl"] = PAYLOAD
    server.stall_after = 200_000
    target = tmp_path / "data.pkl"
    source = {"url": server.url("/data.pkl"), "sha256": PAYLOAD_SHA}
    with pytest.raises(DownloadIncomplete, match="re-run to resume"):
        fetch("toy", source, target, checksums=None, timeout=0.3)
    assert target.with_name("data.pkl.part").stat().st_size == 200_000  # every byte received is kept
    assert not target.exists()
    fetch("toy", source, target, checksums=None, timeout=5)
    assert server.requests[-1]["range"] == "bytes=200000-" and server.requests[-1]["status"] == 206
    assert target.read_bytes() == PAYLOAD


def test_a_server_ignoring_range_restarts_the_file_instead_of_appending(server, tmp_path):
    server.files["/data.pkl"] = PAYLOAD
    server.honour_range = False
    target = tmp_path / "data.pkl"
    target.with_name("data.pkl.part").write_bytes(b"stale bytes from another version")
    fetch("toy", {"url": server.url("/data.pkl"), "sha256": PAYLOAD_SHA}, target, checksums=None)
    assert server.requests[-1]["range"] == "bytes=32-" and server.requests[-1]["status"] == 200
    assert target.read_bytes() == PAYLOAD


def test_a_complete_part_file_is_verified_without_refetching(server, tmp_path):
    server.files["/data.pkl"] = PAYLOAD
    target = tmp_path / "data.pkl"
    target.with_name("data.pkl.part").write_bytes(PAYLOAD)  # an earlier run stopped before the rename
    fetch("toy", {"url": server.url("/data.pkl"), "sha256": PAYLOAD_SHA}, target, checksums=None)
    assert [r["status"] for r in server.requests] == [416]
    assert target.read_bytes() == PAYLOAD and leftovers(tmp_path) == []


def test_published_checksum_mismatch_keeps_the_download_as_bad(server, tmp_path):
    server.files["/data.pkl"] = PAYLOAD
    target = tmp_path / "data.pkl"
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatch) as err:
        fetch("toy", {"url": server.url("/data.pkl"), "sha256": wrong}, target, checksums=tmp_path / "c.json")
    message = str(err.value)
    assert f"expected SHA-256 {wrong}" in message and f"found {PAYLOAD_SHA}" in message
    assert str(target.with_name("data.pkl.bad")) in message
    assert not target.exists() and not target.with_name("data.pkl.part").exists()
    assert target.with_name("data.pkl.bad").read_bytes() == PAYLOAD
    assert not (tmp_path / "c.json").exists()  # a published checksum is never replaced by a record


def test_present_file_is_verified_and_never_deleted_on_mismatch(tmp_path):
    target = tmp_path / "data.pkl"
    target.write_bytes(b"something else")
    with pytest.raises(ChecksumMismatch, match="move it away"):
        fetch("toy", {"url": "file:///nonexistent", "sha256": PAYLOAD_SHA}, target, checksums=None)
    assert target.read_bytes() == b"something else"


def test_mmsa_published_checksums_apply_without_a_source_sha256(tmp_path):
    target = tmp_path / "MOSI" / "Processed" / "unaligned_50.pkl"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the MMSA release")
    with pytest.raises(ChecksumMismatch) as err:
        verify("mosi", {}, target, checksums=tmp_path / "checksums.json")
    assert err.value.expected == PUBLISHED_SHA256["MOSI/Processed/unaligned_50.pkl"]
    assert "MMSA" in str(err.value)


def test_http_errors_propagate_and_leave_nothing_at_the_path(server, tmp_path):
    with pytest.raises(OSError, match="404"):
        fetch("toy", {"url": server.url("/missing.pkl")}, tmp_path / "x.pkl", checksums=tmp_path / "c.json")
    assert not (tmp_path / "x.pkl").exists() and not (tmp_path / "c.json").exists()


# ---------------------------------------------------------------------------------------------
# file:// sources and trust on first use


def test_file_url_resumes_from_the_part_offset(tmp_path):
    src = tmp_path / "mirror" / "data.pkl"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    target = tmp_path / "raw" / "data.pkl"
    target.parent.mkdir()
    # a .part whose first half is deliberately not PAYLOAD: resuming must keep it and copy only the rest
    target.with_name("data.pkl.part").write_bytes(b"\0" * 1000)
    with pytest.raises(ChecksumMismatch):
        fetch("toy", {"url": src.as_uri(), "sha256": PAYLOAD_SHA}, target, checksums=None)
    assert target.with_name("data.pkl.bad").read_bytes() == b"\0" * 1000 + PAYLOAD[1000:]

    target.with_name("data.pkl.part").write_bytes(PAYLOAD[:1000])
    report = fetch_and_report("toy", {"url": src.as_uri(), "sha256": PAYLOAD_SHA}, target, checksums=None)
    assert target.read_bytes() == PAYLOAD and "resumed" in report["actions"][0]


def test_trust_on_first_use_records_then_enforces(tmp_path):
    src = tmp_path / "mirror.bin"
    src.write_bytes(PAYLOAD)
    registry = tmp_path / "resources" / "checksums.json"
    target = tmp_path / "resources" / "toy" / "data.bin"
    source = {"url": src.as_uri()}

    first = fetch_and_report("toy", source, target, checksums=registry)
    assert first["checksum"] == "newly recorded"
    assert json.loads(registry.read_text()) == {"toy/toy/data.bin": PAYLOAD_SHA}

    assert verify("toy", source, target, checksums=registry)["checksum"] == "recorded"

    target.write_bytes(PAYLOAD[:-1] + b"X")  # tampered (or corrupted) after the first use
    with pytest.raises(ChecksumMismatch) as err:
        fetch("toy", source, target, checksums=registry)
    assert err.value.expected == PAYLOAD_SHA and "toy/toy/data.bin" in str(err.value)
    assert target.read_bytes() == PAYLOAD[:-1] + b"X"  # kept

    # the source changed: a fresh download is refused too, and kept as .bad
    target.unlink()
    src.write_bytes(b"a different release")
    with pytest.raises(ChecksumMismatch):
        fetch("toy", source, target, checksums=registry)
    assert not target.exists() and target.with_name("data.bin.bad").read_bytes() == b"a different release"


def test_published_checksum_wins_over_the_registry(tmp_path):
    src = tmp_path / "mirror.bin"
    src.write_bytes(PAYLOAD)
    registry = ChecksumRegistry(tmp_path / "checksums.json")
    target = tmp_path / "data.bin"
    registry.record(registry.key("toy", target), "f" * 64)  # a wrong record
    report = fetch_and_report("toy", {"url": src.as_uri(), "sha256": PAYLOAD_SHA}, target,
                              checksums=registry.path)
    assert report["checksum"] == "published" and target.read_bytes() == PAYLOAD
    with pytest.raises(ChecksumMismatch):
        verify("toy", {}, target, checksums=registry.path)  # without the published sum the record applies


def test_registry_keeps_other_entries_and_waits_for_the_write_lock(tmp_path):
    registry = ChecksumRegistry(tmp_path / "checksums.json")
    registry.record("a/x", "1" * 64)
    assert registry.record("a/x", "2" * 64) == "1" * 64  # an existing entry is never overwritten

    with registry.lock():
        writer = threading.Thread(target=registry.record, args=("b/y", "3" * 64))
        writer.start()
        time.sleep(0.2)
        assert "b/y" not in registry.read()  # blocked while another writer holds the lock
    writer.join(5)
    assert registry.read() == {"a/x": "1" * 64, "b/y": "3" * 64}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checksums.json", "checksums.json.lock"]


# ---------------------------------------------------------------------------------------------
# Manual downloads and folder datasets


def test_gated_source_asks_for_a_manual_download_then_proceeds(server, tmp_path):
    server.files["/iemocap.pkl"] = PAYLOAD
    target = tmp_path / "resources" / "iemocap_data.pkl"
    source = {"url": server.url("/iemocap.pkl"), "gated": True, "instructions": "Fill in the USC SAIL release form."}
    with pytest.raises(ManualDownloadRequired) as err:
        fetch("iemocap", source, target, checksums=tmp_path / "checksums.json")
    message = str(err.value)
    assert "'iemocap'" in message and "gated" in message
    assert "Fill in the USC SAIL release form." in message
    assert f"the file {target}" in message
    assert "re-run the same command" in message
    assert server.requests == []  # a gated source is never downloaded

    target.parent.mkdir(parents=True)
    target.write_bytes(PAYLOAD)
    report = fetch_and_report("iemocap", source, target, checksums=tmp_path / "checksums.json")
    assert report["checksum"] == "newly recorded" and report["sha256"] == PAYLOAD_SHA


def test_source_without_url_names_the_reason(tmp_path):
    with pytest.raises(ManualDownloadRequired, match="no direct download link"):
        fetch("mosi", {"instructions": "Google Drive folder"}, tmp_path / "x.pkl", checksums=None)


def test_folder_dataset_is_checked_against_expect(tmp_path):
    folder = tmp_path / "brats2021"
    source = {"gated": True, "instructions": "Synapse", "expect": ["*/*_t1.nii.gz", "*/*_seg.nii.gz"]}
    with pytest.raises(ManualDownloadRequired) as err:
        fetch("brats", source, folder, checksums=None)
    assert f"{folder}/" in str(err.value) and "*/*_seg.nii.gz" in str(err.value)

    (folder / "case1").mkdir(parents=True)
    (folder / "case1" / "case1_t1.nii.gz").write_bytes(b"t1")
    with pytest.raises(ManualDownloadRequired, match=r"no files match \['\*/\*_seg.nii.gz'\]"):
        fetch("brats", source, folder, checksums=None)
    with pytest.raises(DatasetIncomplete):
        verify("brats", source, folder, checksums=None)

    (folder / "case1" / "case1_seg.nii.gz").write_bytes(b"seg")
    report = fetch_and_report("brats", source, folder, checksums=None)
    assert report["kind"] == "directory" and report["expect"] == {"*/*_t1.nii.gz": 1, "*/*_seg.nii.gz": 1}


# ---------------------------------------------------------------------------------------------
# Archives


def make_tar(path: Path, members: dict[str, bytes]) -> bytes:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def make_zip(path: Path, members: dict[str, bytes]) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path.read_bytes()


CASES = {"case1/case1_t1.nii.gz": b"t1", "case1/case1_seg.nii.gz": b"seg"}
EXPECT = ["*/*_t1.nii.gz", "*/*_seg.nii.gz"]


def test_tar_archive_is_verified_kept_and_extracted(tmp_path):
    data = make_tar(tmp_path / "release.tar.gz", CASES)
    folder = tmp_path / "resources" / "brats2021"
    source = {"url": (tmp_path / "release.tar.gz").as_uri(), "sha256": sha(data), "archive": "tar", "expect": EXPECT}
    report = fetch_and_report("brats", source, folder, checksums=None)
    assert (folder / "case1" / "case1_seg.nii.gz").read_bytes() == b"seg"
    assert (tmp_path / "resources" / "brats2021.tar").read_bytes() == data
    assert report["checksum"] == "published" and report["expect"] == {p: 1 for p in EXPECT}
    assert leftovers(tmp_path) == []


def test_zip_archive_over_http_with_trust_on_first_use(server, tmp_path):
    data = make_zip(tmp_path / "release.zip", CASES)
    server.files["/release.zip"] = data
    folder = tmp_path / "food"
    registry = tmp_path / "checksums.json"
    source = {"url": server.url("/release.zip"), "archive": "zip", "expect": EXPECT}
    assert fetch("food", source, folder, checksums=registry) == folder
    assert (folder / "case1" / "case1_t1.nii.gz").read_bytes() == b"t1"
    assert json.loads(registry.read_text()) == {"food/food.zip": sha(data)}


def test_archive_placed_by_hand_is_verified_and_extracted(tmp_path):
    folder = tmp_path / "brats2021"
    data = make_tar(tmp_path / "brats2021.tar", CASES)
    source = {"gated": True, "archive": "tar", "sha256": sha(data), "expect": EXPECT}
    report = fetch_and_report("brats", source, folder, checksums=None)
    assert (folder / "case1" / "case1_t1.nii.gz").exists() and "found the archive" in report["actions"][0]


def test_gated_archive_message_offers_both_places(tmp_path):
    folder = tmp_path / "brats2021"
    with pytest.raises(ManualDownloadRequired) as err:
        fetch("brats", {"gated": True, "archive": "tar", "expect": EXPECT}, folder, checksums=None)
    assert f"{tmp_path / 'brats2021.tar'} (it is verified, then extracted into {folder}/)" in str(err.value)
    assert f"the folder {folder}/ so that these patterns match" in str(err.value)


@pytest.mark.parametrize("kind,evil", [("tar", "../evil.txt"), ("zip", "../evil.txt"), ("zip", "/abs/evil.txt"),
                                       ("tar", "case1/../../evil.txt")])
def test_archive_members_escaping_the_folder_are_refused(tmp_path, kind, evil):
    make = make_tar if kind == "tar" else make_zip
    data = make(tmp_path / f"release.{kind}", {**CASES, evil: b"pwned"})
    folder = tmp_path / "out" / "data"
    source = {"url": (tmp_path / f"release.{kind}").as_uri(), "sha256": sha(data), "archive": kind}
    with pytest.raises(UnsafeArchive, match="refused member"):
        fetch("evil", source, folder, checksums=None)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()
    assert not folder.exists() and leftovers(tmp_path) == []
    assert (tmp_path / "out" / f"data.{kind}").read_bytes() == data  # the verified download is kept


def test_archive_without_the_expected_files_is_not_put_in_place(tmp_path):
    data = make_zip(tmp_path / "release.zip", {"readme.txt": b"hi"})
    folder = tmp_path / "data"
    source = {"url": (tmp_path / "release.zip").as_uri(), "sha256": sha(data), "archive": "zip", "expect": EXPECT}
    with pytest.raises(DatasetIncomplete, match="nothing was put at"):
        fetch("toy", source, folder, checksums=None)
    assert not folder.exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Command line and progress


def test_cli_fetch_exit_codes_and_messages(tmp_path, capsys):
    src = tmp_path / "mirror.bin"
    src.write_bytes(PAYLOAD)
    target = tmp_path / "data.bin"
    registry = str(tmp_path / "checksums.json")

    ok = {"path": str(target), "source": {"url": src.as_uri(), "sha256": PAYLOAD_SHA}}
    assert main(["fetch", "--dataset", "toy", "--spec", json.dumps(ok), "--checksums", registry]) == 0
    out = capsys.readouterr().out
    assert f"copied {src.as_uri()} to {target}" in out and "matches the published checksum" in out

    gated = {"path": str(tmp_path / "iemocap.pkl"), "source": {"gated": True, "instructions": "USC SAIL form"}}
    assert main(["fetch", "--dataset", "iemocap", "--spec", json.dumps(gated), "--checksums", registry]) == 2
    err = capsys.readouterr().err
    assert "USC SAIL form" in err and str(tmp_path / "iemocap.pkl") in err and "Traceback" not in err

    bad = {"path": str(tmp_path / "other.bin"), "source": {"url": src.as_uri(), "sha256": "a" * 64}}
    assert main(["fetch", "--dataset", "toy", "--spec", json.dumps(bad), "--checksums", registry]) == 1
    assert "checksum mismatch" in capsys.readouterr().err

    assert main(["fetch", "--dataset", "toy", "--spec", json.dumps({"source": {}}), "--checksums", registry]) == 2
    assert "has no 'path'" in capsys.readouterr().err


def test_progress_follows_the_project_rule(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert progress_disabled() is True
    monkeypatch.delenv("CI")
    assert progress_disabled() is None  # tqdm then shows the bar only on a terminal
