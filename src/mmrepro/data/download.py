"""Get the real datasets onto disk, verified, without losing or trusting anything unchecked.

Real data comes from direct links, shared-drive folders and licence-gated portals. A dataset's
``source`` config entry says which; :func:`fetch` turns it into one of two outcomes: the data is at
the dataset's ``path`` and verified, or :class:`ManualDownloadRequired` says what to download by
hand and the exact path to put it at (re-running the same command then verifies it and proceeds).

Source keys (all optional)::

    url: "https://... | file:///..."   # direct link to one file (the data file or an archive)
    sha256: "<hex>"                    # published checksum of that file, enforced
    archive: tar | zip                 # the file is an archive, extracted into ``path`` (a folder)
    gated: true                        # licence/login needed: never downloaded, manual steps shown
    instructions: "free text"          # where to get it and what to accept
    expect: ["glob", ...]              # folder datasets: patterns that must match under ``path``

Guarantees:

* **Verified before use.** A file is compared with its published SHA-256 (``source.sha256``, or the
  table MMSA publishes for its feature files). Without one, the first complete download (or the
  first sighting of a file placed by hand) is recorded in a checksum registry, a JSON file
  ``{"<dataset>/<file path relative to the registry's folder>": sha256}``: trust on first use,
  enforced on every later check. A published checksum always wins over the registry.
* **Nothing half-done looks done.** Downloads go to ``<file>.part`` and are renamed into place only
  after the checksum matched; archives are extracted into a temporary sibling folder, checked
  against ``expect`` and renamed into place.
* **Interrupted downloads resume**: HTTP ``Range`` requests (a server answering 200 instead of 206
  restarts the file), or a byte offset for ``file://`` sources.
* **Nothing is deleted.** A file on disk that fails its checksum stays where it is (the error says
  to move it away to download again); a download that fails it is kept as ``<file>.bad``.
* **Archives stay inside their folder**: members with absolute paths or ``..`` (and links pointing
  that way, devices, FIFOs) are refused before anything is extracted.

Folder datasets are recognised by ``archive`` or ``expect`` (or an existing folder at ``path``);
their presence check is the ``expect`` patterns, since hashing a whole folder on every run would be
too slow. An archive, when there is one, is kept next to the folder as ``<path>.tar`` or
``<path>.zip``; for a gated archive the user may put the archive there and re-run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO

from tqdm import tqdm

from mmrepro.data.store import sha256_file
from mmrepro.locking import exclusive
from mmrepro.progress import progress_disabled

log = logging.getLogger(__name__)

ARCHIVE_KINDS = ("tar", "zip")
SOURCE_KEYS = ("url", "sha256", "archive", "gated", "instructions", "expect")
DEFAULT_TIMEOUT_S = 60.0  # per socket operation (connect, each read), not for the whole download
USER_AGENT = "mmrepro-fetch (+urllib)"
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# Errors


class ManualDownloadRequired(RuntimeError):
    """The data is missing and cannot be downloaded automatically; the message says what to do."""

    def __init__(self, dataset: str, reason: str, instructions: str | None, places: list[str]):
        self.dataset, self.reason, self.instructions, self.places = dataset, reason, instructions, places
        lines = [f"dataset {dataset!r} must be downloaded by hand: {reason}."]
        if instructions:
            lines.append(f"Where to get it: {instructions.strip()}")
        lines.append("Put it at this exact path:" if len(places) == 1 else "Put it at one of these exact paths:")
        lines += [f"  {place}" for place in places]
        lines.append("Then re-run the same command: it finds the data there, verifies it and proceeds.")
        super().__init__("\n".join(lines))


class ChecksumMismatch(ValueError):
    """A file's SHA-256 differs from the published or recorded one; the file is kept, never deleted."""

    def __init__(self, file: Path | str, expected: str, found: str, *, origin: str, advice: str):
        self.file, self.expected, self.found, self.origin = str(file), expected, found, origin
        super().__init__(f"checksum mismatch for {file}: expected SHA-256 {expected} ({origin}), "
                         f"found {found}. {advice}")


class DatasetIncomplete(ValueError):
    """A dataset folder (or an extracted archive) lacks files matching some ``expect`` patterns."""

    def __init__(self, folder: Path | str, missing: list[str], advice: str = ""):
        self.folder, self.missing = str(folder), missing
        super().__init__(f"{folder}: no files match {missing} (the source's 'expect' patterns)"
                         + (f". {advice}" if advice else ""))


class UnsafeArchive(ValueError):
    """An archive member would be written outside the target folder (absolute path, ``..``, link...)."""


class DownloadIncomplete(OSError):
    """The connection ended before the whole file arrived; the ``.part`` file is kept for resuming."""


# ---------------------------------------------------------------------------------------------
# Checksum registry (trust on first use)


class ChecksumRegistry:
    """SHA-256 digests recorded on first use, in one JSON file ``{"<dataset>/<path>": sha256}``.

    Keys use the file's path relative to the registry's folder, so a project (or its ``resources``
    folder) can move without invalidating them. Writes go to a temporary file that replaces the
    registry atomically (readers never see half a file), under an exclusive lock on
    ``<registry>.lock`` (writers never lose each other's entries); an existing entry is never
    overwritten.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def key(self, dataset: str, file: Path | str) -> str:
        rel = os.path.relpath(os.path.abspath(file), os.path.abspath(self.path.parent))
        return f"{dataset}/{Path(rel).as_posix()}"

    def read(self) -> dict[str, str]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"checksum registry {self.path} is not valid JSON ({e}); fix it or move it away") from e
        if not isinstance(entries, dict):
            raise ValueError(f"checksum registry {self.path} must hold a JSON object of path: sha256")
        return entries

    def get(self, key: str) -> str | None:
        return self.read().get(key)

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold the registry's exclusive write lock (blocks while another writer holds it)."""
        return exclusive(self.path)

    def record(self, key: str, sha256: str) -> str:
        """Record ``sha256`` under ``key`` unless an entry exists; return the digest now on record."""
        with self.lock():
            entries = self.read()
            if key in entries:
                return entries[key]
            entries[key] = sha256
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(entries, f, indent=1, sort_keys=True)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        return sha256


# ---------------------------------------------------------------------------------------------
# Public API


def verify(name: str, source: Mapping[str, Any] | None, path: Path | str, *,
           checksums: Path | str | None) -> dict[str, Any]:
    """Check data already on disk, before converting it; return what was checked.

    A file: its SHA-256 against the published digest (``source.sha256``, else MMSA's published
    table), else the one recorded in the registry ``checksums``, else it is recorded now (trust on
    first use; with ``checksums=None`` nothing is recorded and the result says ``"unchecked"``).
    A folder: every ``expect`` pattern must match at least one path under it.

    Returns ``{"dataset", "path", "kind": "file"|"directory", "file", "sha256", "checksum", "expect"}``
    where ``checksum`` is ``"published"``, ``"recorded"``, ``"newly recorded"`` or ``"unchecked"``
    (``None`` for folders) and ``expect`` maps each pattern to its number of matches.
    Raises :class:`FileNotFoundError` when the data is absent, :class:`ChecksumMismatch` (the file is
    left in place) or :class:`DatasetIncomplete`.
    """
    source, path = _check_source(name, source), Path(path)
    registry = ChecksumRegistry(checksums) if checksums else None
    if _is_folder(source, path):
        if not _folder_present(path):
            raise FileNotFoundError(f"dataset {name!r}: folder {path} is missing or empty; run `mmrepro fetch`")
        counts = _match_expect(path, source.get("expect", []))
        missing = [pattern for pattern, n in counts.items() if n == 0]
        if missing:
            raise DatasetIncomplete(path, missing)
        return _result(name, path, "directory", expect=counts)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {name!r}: {path} is missing; run `mmrepro fetch`")
    check = _checksum(name, source, path, registry)
    if check["checksum"] == "mismatch":
        raise _mismatch_in_place(path, check, registry)
    return _result(name, path, "file", **_public(check))


def fetch(name: str, source: Mapping[str, Any] | None, path: Path | str, *,
          checksums: Path | str | None, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """Make dataset ``name`` present and verified at ``path``; return ``path``.

    See :func:`fetch_and_report` (same arguments), which also says what was done.
    """
    return Path(fetch_and_report(name, source, path, checksums=checksums, timeout=timeout)["path"])


def fetch_and_report(name: str, source: Mapping[str, Any] | None, path: Path | str, *,
                     checksums: Path | str | None, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Download (or resume), verify and, for archives, extract dataset ``name``; say what was done.

    Present data is only verified (:func:`verify`). Otherwise, for an archive already kept at
    ``<path>.tar|zip`` (downloaded earlier, or placed by hand) that archive is verified and
    extracted; a gated source, or one without ``url``, raises :class:`ManualDownloadRequired`;
    else ``url`` is downloaded to ``<file>.part`` (resuming one left by an interrupted run), its
    SHA-256 checked, and only then renamed into place. A mismatching download is kept as
    ``<file>.bad`` and :class:`ChecksumMismatch` is raised. ``timeout`` applies to each socket
    operation. Returns the :func:`verify` result plus ``"actions"``, the steps taken, in words.
    """
    source, path = _check_source(name, source), Path(path)
    registry = ChecksumRegistry(checksums) if checksums else None
    folder = _is_folder(source, path)
    manual_reason = _manual_reason(source)
    archive = _archive_path(source, path)

    if (folder and _folder_present(path)) or (not folder and path.is_file()):
        try:
            result = verify(name, source, path, checksums=checksums)
        except DatasetIncomplete as e:
            if manual_reason:
                raise ManualDownloadRequired(name, f"{manual_reason}; {e}", source.get("instructions"),
                                             _places(source, path, archive)) from None
            raise DatasetIncomplete(path, e.missing, advice="Move the folder away and re-run to extract the archive "
                                    "again, or correct the patterns") from None
        return {**result, "actions": [f"already present at {path}, verified"]}

    actions: list[str] = []
    target = archive or path
    if archive is not None and archive.is_file():
        check = _checksum(name, source, archive, registry)
        if check["checksum"] == "mismatch":
            raise _mismatch_in_place(archive, check, registry)
        actions.append(f"found the archive {archive}, {_describe_check(check)}")
    else:
        if manual_reason:
            raise ManualDownloadRequired(name, manual_reason, source.get("instructions"),
                                         _places(source, path, archive))
        part = target.with_name(target.name + ".part")
        how = _download(source["url"], part, desc=name, timeout=timeout)
        check = _checksum(name, source, part, registry, record_as=target)
        if check["checksum"] == "mismatch":
            bad = target.with_name(target.name + ".bad")
            os.replace(part, bad)
            raise ChecksumMismatch(bad, check["expected"], check["sha256"], origin=check["origin"],
                                   advice=f"The download was kept as {bad} for inspection and nothing was put at "
                                          f"{target}; re-running downloads it again."
                                          + _registry_advice(check, registry))
        os.replace(part, target)
        check["file"] = str(target)
        actions.append(f"{how} {source['url']} to {target}, {_describe_check(check)}")

    if archive is None:
        return {**_result(name, path, "file", **_public(check)), "actions": actions}
    counts = _extract(archive, source["archive"], path, source.get("expect", []))
    actions.append(f"extracted {archive} into {path}/")
    return {**_result(name, path, "directory", **_public(check), expect=counts), "actions": actions}


def summary(report: Mapping[str, Any]) -> str:
    """The steps of a :func:`fetch_and_report` result, one line each, for the command line."""
    lines = [f"dataset {report['dataset']}: {action}" for action in report.get("actions", [])]
    if report.get("expect"):
        lines.append(f"dataset {report['dataset']}: expected files present: "
                     + ", ".join(f"{pattern} ({n})" for pattern, n in report["expect"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Source handling


def _check_source(name: str, source: Mapping[str, Any] | None) -> dict[str, Any]:
    source = dict(source or {})
    unknown = sorted(set(source) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(f"dataset {name!r}: unknown source key(s) {unknown}; known: {list(SOURCE_KEYS)}")
    if source.get("archive") not in (None, *ARCHIVE_KINDS):
        raise ValueError(f"dataset {name!r}: source.archive must be one of {ARCHIVE_KINDS}, got {source['archive']!r}")
    expect = source.get("expect", [])
    if not isinstance(expect, list) or not all(isinstance(p, str) and p for p in expect):
        raise ValueError(f"dataset {name!r}: source.expect must be a list of glob patterns, got {expect!r}")
    if source.get("sha256") is not None:
        digest = str(source["sha256"]).strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"dataset {name!r}: source.sha256 must be 64 hex digits, got {source['sha256']!r}")
        source["sha256"] = digest
    if source.get("url") and expect and not source.get("archive") and not source.get("gated"):
        raise ValueError(f"dataset {name!r}: a folder dataset ('expect') downloads an archive: set source.archive")
    return source


def _is_folder(source: Mapping[str, Any], path: Path) -> bool:
    return bool(source.get("archive") or source.get("expect")) or path.is_dir()


def _folder_present(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _archive_path(source: Mapping[str, Any], path: Path) -> Path | None:
    return path.with_name(f"{path.name}.{source['archive']}") if source.get("archive") else None


def _manual_reason(source: Mapping[str, Any]) -> str | None:
    if source.get("gated"):
        return ("the source is gated (a licence agreement or a login is required), "
                "so it is never downloaded automatically")
    if not source.get("url"):
        return "no direct download link is known for it"
    return None


def _places(source: Mapping[str, Any], path: Path, archive: Path | None) -> list[str]:
    where = os.path.abspath(path)
    patterns = source.get("expect", [])
    matching = f" so that these patterns match under it: {', '.join(patterns)}" if patterns else ""
    if archive is not None:
        return [f"the {source['archive']} archive as {os.path.abspath(archive)} (it is verified, then extracted "
                f"into {where}/)", f"or its extracted contents in the folder {where}/{matching}"]
    if _is_folder(source, path):
        return [f"the files in the folder {where}/{matching}"]
    return [f"the file {where}"]


def _match_expect(folder: Path, patterns: list[str]) -> dict[str, int]:
    return {pattern: sum(1 for _ in folder.glob(pattern)) for pattern in patterns}


# ---------------------------------------------------------------------------------------------
# Checksums


def _known_published(file: Path) -> str | None:
    """MMSA's published SHA-256 when ``file`` ends with one of its feature-file paths."""
    from mmrepro.data.mmsa import PUBLISHED_SHA256  # lazy: converters may import this module

    posix = Path(file).as_posix()
    for rel, digest in PUBLISHED_SHA256.items():
        if posix == rel or posix.endswith("/" + rel):
            return digest
    return None


def _checksum(name: str, source: Mapping[str, Any], file: Path, registry: ChecksumRegistry | None,
              *, record_as: Path | None = None) -> dict[str, Any]:
    """Hash ``file`` and compare (recording on first use); ``record_as`` names it in the registry
    and the published table when ``file`` is a ``.part`` not yet in place."""
    named = record_as or file
    found = sha256_file(file)
    check: dict[str, Any] = {"file": str(named), "sha256": found, "key": None}
    expected = source.get("sha256")
    if expected:
        check.update(expected=expected, origin="published: source.sha256 in the config", status="published")
    elif (expected := _known_published(named)) is not None:
        check.update(expected=expected, origin="published in the MMSA README", status="published")
    elif registry is not None:
        key = check["key"] = registry.key(name, named)
        recorded = registry.get(key)
        if recorded is None:
            recorded = registry.record(key, found)  # a concurrent writer may have won: compare below
            status = "newly recorded" if recorded == found else "recorded"
        else:
            status = "recorded"
        check.update(expected=recorded, origin=f"recorded on first use in {registry.path} as {key!r}", status=status)
    else:
        check.update(expected=None, origin="no checksum published and no registry given", status="unchecked")
    check["checksum"] = "mismatch" if check["expected"] not in (None, found) else check["status"]
    return check


def _public(check: Mapping[str, Any]) -> dict[str, Any]:
    return {"file": check["file"], "sha256": check["sha256"], "checksum": check["checksum"]}


def _result(name: str, path: Path, kind: str, *, file: str | None = None, sha256: str | None = None,
            checksum: str | None = None, expect: dict[str, int] | None = None) -> dict[str, Any]:
    return {"dataset": name, "path": str(path), "kind": kind, "file": file, "sha256": sha256,
            "checksum": checksum, "expect": expect or {}}


def _describe_check(check: Mapping[str, Any]) -> str:
    short = check["sha256"][:12]
    return {"published": f"SHA-256 {short}... matches the published checksum",
            "recorded": f"SHA-256 {short}... matches the one recorded on first use",
            "newly recorded": f"SHA-256 {short}... recorded (no published checksum; enforced from now on)",
            "unchecked": f"SHA-256 {short}... not checked (no published checksum, no registry)"}[check["checksum"]]


def _registry_advice(check: Mapping[str, Any], registry: ChecksumRegistry | None) -> str:
    if check["status"] in ("recorded", "newly recorded") and registry is not None:
        return (f" If the source has legitimately changed, remove the entry {check['key']!r} from {registry.path} "
                "and re-run.")
    return ""


def _mismatch_in_place(file: Path, check: Mapping[str, Any], registry: ChecksumRegistry | None) -> ChecksumMismatch:
    return ChecksumMismatch(file, check["expected"], check["sha256"], origin=check["origin"],
                            advice=f"The file was left in place (nothing is deleted). To download it again, move it "
                                   f"away (for example to {file}.old) and re-run." + _registry_advice(check, registry))


# ---------------------------------------------------------------------------------------------
# Download with resume


def _download(url: str, part: Path, *, desc: str, timeout: float) -> str:
    """Fetch ``url`` into ``part``, continuing an existing ``part``; return "downloaded" or "resumed"."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    part.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    if offset:
        log.info("%s: resuming %s from byte %d", desc, url, offset)
    if scheme == "file":
        return _copy_file_url(url, part, offset, desc)
    if scheme in ("http", "https"):
        return _download_http(url, part, offset, desc, timeout)
    raise ValueError(f"unsupported URL scheme {scheme!r} in {url} (use http://, https:// or file://)")


def _download_http(url: str, part: Path, offset: int, desc: str, timeout: float) -> str:
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise ConnectionError(f"{url}: the server answered HTTP {e.code} {e.reason}") from e
        total = _content_range(e.headers.get("Content-Range", ""))[1]
        e.close()
        if total == offset:  # the .part was already complete: an earlier run stopped before verifying
            return "resumed (nothing left to fetch)"
        log.info("%s: the server cannot resume from byte %d (size %s); starting over", desc, offset, total)
        return _download_http(url, part, 0, desc, timeout)
    except urllib.error.URLError as e:
        raise ConnectionError(f"{url}: cannot connect ({e.reason}); check the link and the network, then re-run")\
            from e
    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != offset:
                raise DownloadIncomplete(f"{url}: asked to resume at byte {offset}, the server sent bytes from "
                                         f"{start}; move {part} away to download from the start")
            how, mode = "resumed the download of", "ab"
        else:  # 200: the server ignored the Range header (or there was none): start over
            length = response.headers.get("Content-Length")
            offset, total = 0, int(length) if length is not None else None
            how, mode = "downloaded", "wb"
        with open(part, mode) as out:
            try:
                written = _copy(response, out, total=total, initial=offset, desc=desc)
            except OSError as e:  # timeout or reset mid-way: what arrived is in the .part
                raise DownloadIncomplete(f"{url}: the transfer failed after {out.tell()} bytes "
                                         f"({e}); the partial file is kept as {part}: re-run to resume") from e
    if total is not None and offset + written != total:
        raise DownloadIncomplete(f"{url}: the connection ended after {offset + written} of {total} bytes; the partial "
                                 f"file is kept as {part}: re-run to resume")
    return how


def _content_range(header: str) -> tuple[int | None, int | None]:
    """``(start, total)`` of ``bytes START-END/TOTAL`` or ``bytes */TOTAL`` (None where unknown)."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _copy_file_url(url: str, part: Path, offset: int, desc: str) -> str:
    src = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    size = src.stat().st_size
    if offset > size:  # longer than the source: not a prefix of it, start over
        offset = 0
    with open(src, "rb") as f, open(part, "ab" if offset else "wb") as out:
        f.seek(offset)
        written = _copy(f, out, total=size, initial=offset, desc=desc)
    if offset + written != size:
        raise DownloadIncomplete(f"{url}: copied {offset + written} of {size} bytes; {part} is kept: re-run to resume")
    return "resumed the copy of" if offset else "copied"


def _copy(src: BinaryIO, out: BinaryIO, *, total: int | None, initial: int, desc: str) -> int:
    written = 0
    # read1 returns whatever has arrived (at most one raw read), so a timeout loses no received bytes
    read = getattr(src, "read1", src.read)
    with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
              leave=False, disable=progress_disabled()) as bar:
        while block := read(_CHUNK):
            out.write(block)
            written += len(block)
            bar.update(len(block))
    return written


# ---------------------------------------------------------------------------------------------
# Archives


def _unsafe_name(name: str) -> bool:
    posix = PurePosixPath(name.replace("\\", "/"))
    return not name or posix.is_absolute() or ".." in posix.parts or bool(PureWindowsPath(name).drive)


def _extract(archive: Path, kind: str, path: Path, expect: list[str]) -> dict[str, int]:
    """Extract into a temporary sibling of ``path``, check ``expect``, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.extract.", dir=path.parent))
    try:
        (_extract_tar if kind == "tar" else _extract_zip)(archive, tmp)
        counts = _match_expect(tmp, expect)
        missing = [pattern for pattern, n in counts.items() if n == 0]
        if missing:
            raise DatasetIncomplete(archive, missing, advice=f"the archive does not hold the expected files; nothing "
                                    f"was put at {path}")
        if path.is_dir():  # only an empty folder can be here: a non-empty one counts as present
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def _extract_tar(archive: Path, into: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            if _unsafe_name(m.name):
                raise UnsafeArchive(f"{archive}: refused member {m.name!r} (absolute path or '..'); nothing extracted")
            if (m.issym() or m.islnk()) and _unsafe_name(m.linkname):
                raise UnsafeArchive(f"{archive}: refused link {m.name!r} -> {m.linkname!r}; nothing extracted")
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise UnsafeArchive(f"{archive}: refused special member {m.name!r} (device or FIFO); nothing extracted")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the standard library checks again
            tar.extractall(into, members=members, filter="data")
        else:
            tar.extractall(into, members=members)


def _extract_zip(archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if _unsafe_name(info.filename):
                raise UnsafeArchive(f"{archive}: refused member {info.filename!r} (absolute path or '..'); "
                                    "nothing extracted")
        zf.extractall(into)
