"""Run directories and model folders behind a storage URI: ``file://``, ``s3://``, ``gs://``,
``hdfs://`` or ``abfs://``, through pyarrow's file systems (the storage Ray Train persists its
checkpoints to).

A run directory at a URI is worked on through a local mirror (``RunFolder``), the way Ray Tune
stages its experiment folder: a process reads and writes the run's small files (job.yaml,
baseline.json, trial records, the report) in its node's mirror and pushes what it wrote; it
pulls what other processes wrote. Models and checkpoints are never mirrored: Ray Train writes
checkpoints straight to storage, the finished model is copied there from its checkpoint, and a
process that needs a model folder fetches it once per node into the cache (``fetch``). So a
worker on another node reads the baseline model from storage, never from the driver's disk.

A plain path (no ``scheme://``) is a local or shared-file-system folder: ``RunFolder`` then
works on the folder itself and pushing and pulling do nothing.

No Ray, no torch: every layer may use it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from orchestrator.errors import ConfigError, Problem
from orchestrator.files import replace_dir, write_atomic, write_dir_atomic

SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
# A run's records: what a report, a resume or a trial's bookkeeping reads. Anything under a
# folder with one of these names (models, Ray's checkpoints and experiment state) is not.
RECORD_SUFFIXES = (".json", ".yaml", ".parquet", ".png", ".html")
BULK_FOLDERS = ("model", "best", "train", "tune")


class StorageError(OSError):
    """A URI that cannot be opened, read or written (no such bucket, no credentials...)."""


def unreachable(key: str, value: str, error: Exception, source: str = "job") -> ConfigError:
    """The input error for a storage URI that cannot be opened or read, naming its key."""
    return ConfigError(
        Problem(
            key,
            value,
            f"cannot be read ({error})",
            "check the URI, the storage's credentials and that this machine reaches it",
        ),
        source=source,
    )


def is_uri(location: str | os.PathLike[str]) -> bool:
    return "://" in str(location)


def check_uri(uri: str) -> str | None:
    """Why ``uri`` is not a storage URI this tool can use, or None."""
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        return f"its scheme {parts.scheme!r}:// is not one of {', '.join(SCHEMES)}"
    if parts.scheme == "file" and parts.netloc:
        return "a file:// URI needs an absolute path: file:///folder (three slashes)"
    if not parts.path.strip("/") and parts.scheme == "file":
        return "names the root folder"
    if " " in uri:
        return "holds a space; percent-encode it (%20)"
    return None


def join(location: str, *parts: str) -> str:
    """``location``/part/...: a URI keeps its scheme, host and query; a path stays a path."""
    if not is_uri(location):
        return str(Path(location, *parts))
    s = urlsplit(location)
    path = "/".join([s.path.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return urlunsplit((s.scheme, s.netloc, path, s.query, s.fragment))


@functools.lru_cache(maxsize=32)
def _filesystem(root: str) -> tuple[object, str]:
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(root)
    except Exception as e:  # ArrowInvalid, OSError (no network, no credentials)
        raise StorageError(f"cannot open {root}: {e}") from None
    return fs, path.rstrip("/")


def resolve(uri: str) -> tuple[object, str]:
    """(pyarrow file system, path inside it) of a URI; one file system per bucket or host."""
    s = urlsplit(uri)
    fs, root = _filesystem(urlunsplit((s.scheme, s.netloc, "/", s.query, "")))
    path = root + unquote(s.path).rstrip("/") if s.path.strip("/") else root
    return fs, path


def _local_fs() -> object:
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem()


def kind(uri: str) -> str | None:
    """ "file", "dir" or None (nothing there)."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    try:
        t = fs.get_file_info(path).type
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {e}") from None
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t)


def _atomic_rename(fs: object) -> bool:
    """Object stores write an object whole (a PUT); local and HDFS files need a rename."""
    return type(fs).__name__ in ("LocalFileSystem", "HadoopFileSystem")


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {e}") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file: a reader sees the old file or the new one, never a part."""
    fs, path = resolve(uri)
    try:
        if _parent(path):
            fs.create_dir(_parent(path), recursive=True)
        target = path
        if _atomic_rename(fs):
            target = f"{_parent(path)}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:8]}.tmp"
        with fs.open_output_stream(target) as f:
            f.write(data)
        if target != path:
            fs.move(target, path)
    except OSError as e:
        raise StorageError(f"cannot write {uri}: {e}") from None


def upload(local: Path, uri: str) -> None:
    """Copy the local file or folder ``local`` to ``uri``, replacing what is there."""
    local = Path(local)
    if local.is_file():
        write_bytes(uri, local.read_bytes())
    else:
        _copy_tree(_local_fs(), str(local), uri)


def copy_within(fs: object, src: str, uri: str) -> None:
    """Copy the file or folder ``src`` of the file system ``fs`` (a Ray checkpoint's) to
    ``uri`` without a round trip through this machine's disk when both are the same store."""
    import pyarrow.fs as pafs

    if fs.get_file_info(src).type == pafs.FileType.File:
        with fs.open_input_stream(src) as f:
            write_bytes(uri, f.read())
    else:
        _copy_tree(fs, src, uri)


def _copy_tree(src_fs: object, src: str, uri: str) -> None:
    """A folder lands whole where the storage renames (local, HDFS): it is copied beside the
    target and renamed over it. On object stores, readers rely on a marker file written after
    it (a run's metrics.json)."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    try:
        fs.create_dir(_parent(path) or path, recursive=True)
        target = path
        if _atomic_rename(fs):
            target = f"{_parent(path)}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:8]}.tmp"
        elif fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)  # no stale files of an earlier copy
        fs.create_dir(target, recursive=True)  # copy_files makes only the subfolders
        pafs.copy_files(src, target, source_filesystem=src_fs, destination_filesystem=fs)
        if type(fs).__name__ == "LocalFileSystem":
            replace_dir(Path(target), Path(path))  # one atomic swap on Linux
        elif target != path:
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                fs.delete_dir(path)
            fs.move(target, path)
    except OSError as e:
        raise StorageError(f"cannot copy {src} to {uri}: {e}") from None


def walk(uri: str) -> Iterator[tuple[str, int, float]]:
    """(path relative to ``uri``, size, modification time) of every file under ``uri``."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"cannot list {uri}: {e}") from None
    for info in infos:
        if info.type == pafs.FileType.File:
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            yield info.path[len(path) :].lstrip("/"), info.size or 0, mtime


def download(uri: str, local: Path) -> None:
    """Copy the file or folder at ``uri`` to ``local``, replacing it whole."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    what = kind(uri)
    if what is None:
        raise StorageError(f"cannot read {uri}: no such file or folder")
    if what == "file":
        _download_file(uri, local)
        return

    def fill(tmp: Path) -> None:
        try:
            pafs.copy_files(
                path, str(tmp), source_filesystem=fs, destination_filesystem=_local_fs()
            )
        except OSError as e:
            raise StorageError(f"cannot read {uri}: {e}") from None

    write_dir_atomic(local, fill)


def _download_file(uri: str, local: Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(local, read_bytes(uri))


def cache_root() -> Path:
    return Path(os.environ.get("ORCHESTRATOR_CACHE", "~/.cache/orchestrator")).expanduser()


def _local_name(uri: str) -> Path:
    """A readable relative folder for a URI: <scheme>/<host>/<path>. A query (an S3 endpoint,
    say) adds its hash to the host part, so every path of one store shares one tree."""
    s = urlsplit(uri)
    host = s.netloc
    if s.query:
        host = f"{host}-{hashlib.sha256(s.query.encode()).hexdigest()[:8]}"
    name = Path(s.scheme, *([host] if host else []), *unquote(s.path).split("/"))
    if any(p in ("..", ".") for p in name.parts):
        raise StorageError(f"{uri}: '.' and '..' are not allowed in a storage URI")
    return name


def fetch(uri: str) -> Path:
    """A local copy of the folder at ``uri`` in this node's cache, downloaded once: it is
    fetched again only when the files there changed (their names, sizes and times). Processes
    on one node take turns through a lock, so the first downloads and the others reuse it."""
    target = cache_root() / "fetched" / _local_name(uri)
    stamp = json.dumps(sorted(walk(uri)))
    if stamp == "[]":
        raise StorageError(f"cannot read {uri}: no such folder (or it is empty)")
    marker = target.parent / f".{target.name}.stamp"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target.is_dir() and marker.is_file() and marker.read_text() == stamp):
            download(uri, target)
            write_atomic(marker, stamp)
    return target


@dataclass(frozen=True)
class RunFolder:
    """A run directory: ``location`` is a path or a storage URI; ``local`` is where this
    process reads and writes its files (the folder itself, or this node's mirror of the URI)."""

    location: str

    @property
    def remote(self) -> bool:
        return is_uri(self.location)

    @property
    def local(self) -> Path:
        if self.remote:
            return cache_root() / "runs" / _local_name(self.location)
        return Path(self.location)

    def __str__(self) -> str:
        return self.location

    def uri(self, *parts: str) -> str:
        """Where ``parts`` live for everyone: a path, or a URI under the run's."""
        return join(self.location, *parts)

    def exists(self, rel: str) -> bool:
        if self.remote:
            return kind(self.uri(rel)) is not None
        return (self.local / rel).exists()

    def push(self, *rels: str) -> None:
        """Copy these files or folders from the mirror to storage (nothing for a path)."""
        if self.remote:
            for rel in rels:
                upload(self.local / rel, self.uri(rel))

    def write_text(self, rel: str, text: str) -> None:
        """Write a file of the run: locally (atomically), then to storage."""
        path = self.local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
        self.push(rel)

    def pull(self, *rels: str) -> None:
        """Refresh these files from storage into the mirror; one that storage does not have
        is removed from the mirror (nothing for a path)."""
        if not self.remote:
            return
        for rel in rels:
            if kind(self.uri(rel)) == "file":
                _download_file(self.uri(rel), self.local / rel)
            else:
                (self.local / rel).unlink(missing_ok=True)

    def pull_records(self) -> None:
        """Make the mirror hold exactly the run's records as storage has them (models and Ray's
        checkpoints stay in storage). Nothing for a path."""
        if not self.remote:
            return
        files = [
            rel
            for rel, _, _ in walk(self.location)
            if rel.endswith(RECORD_SUFFIXES)
            and not any(part in BULK_FOLDERS for part in rel.split("/")[:-1])
            # Hidden files are temporary; ".." would leave the mirror (a crafted bucket).
            and not any(part.startswith(".") for part in rel.split("/"))
        ]

        def fill(tmp: Path) -> None:
            for rel in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(read_bytes(self.uri(rel)))

        write_dir_atomic(self.local, fill)
