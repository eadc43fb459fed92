"""One storage layer over fsspec for local paths and ``s3://`` URIs.

Every stage reads and writes through these helpers, so a run directory can live on a laptop disk or in a
bucket. Writes are atomic: a temporary name plus rename locally, a single PUT on object stores (a reader
never sees a partial object), which is what lets completion markers make reruns safe.
"""

from __future__ import annotations

import copy
import json
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.spec import AbstractFileSystem


# Transient object-store faults (5xx, SlowDown/throttling, connection resets, timeouts) are retried with
# exponential backoff by botocore (standard mode: 6 attempts) and around that by s3fs (5 tries of its own
# for connection errors, timeouts and SlowDown), within a bounded budget. Set
# fsspec.config.conf["s3"] (or FSSPEC_S3_* variables) to change it.
S3_DEFAULTS = {
    "config_kwargs": {"retries": {"max_attempts": 6, "mode": "standard"}, "connect_timeout": 10, "read_timeout": 60},
}
fsspec.config.conf.setdefault("s3", copy.deepcopy(S3_DEFAULTS))  # botocore edits the dict it is given


class StorageError(OSError):
    """An object could not be read or written (after retries); the message names the object and the cause."""


@contextmanager
def naming(action: str, uri: str, errors: tuple[type[BaseException], ...] = (Exception,)) -> Iterator[None]:
    """Re-raise ``errors`` as a :class:`StorageError` that names the object and the cause."""
    try:
        yield
    except (StorageError, FileNotFoundError):
        raise
    except errors as exc:
        raise StorageError(f"{action} {uri} failed: {type(exc).__name__}: {exc}") from exc


def filesystem(uri: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem serving ``uri`` and the path inside it (AWS settings from the environment)."""
    return url_to_fs(uri)


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    if is_local(base):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def exists(uri: str) -> bool:
    with naming("checking", uri):
        fs, path = filesystem(uri)
        return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    with naming("reading", uri):
        fs, path = filesystem(uri)
        return fs.cat_file(path)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole object."""
    if is_local(uri):
        path = uri.removeprefix("file://")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        # created like any normal file (0666 less the umask), not mkstemp's 0600: other users' jobs read outputs
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    with naming("writing", uri):
        fs, path = filesystem(uri)
        fs.pipe_file(path, data)  # one PUT (or a completed multipart upload): never a partial object


def write_json_atomic(uri: str, payload: Any) -> None:
    write_bytes_atomic(uri, canonical_json(payload))


def canonical_json(payload: Any) -> bytes:
    """Deterministic JSON (sorted keys, fixed indent) so re-published files are byte-identical."""
    return (json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


class LocalStaging:
    """A local path for writers that need one (pyarrow, numpy); published atomically when the block succeeds.

    Local targets are staged beside the target and renamed; remote ones are staged in a temporary
    directory and uploaded with one ``put_file`` (a single PUT or a completed multipart upload).
    """

    def __init__(self, uri: str):
        self.uri = uri
        if is_local(uri):
            target = os.path.abspath(uri.removeprefix("file://"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.path = os.path.join(os.path.dirname(target), f".tmp-{uuid.uuid4().hex}-{os.path.basename(target)}")
        else:
            self.path = os.path.join(tempfile.gettempdir(), f"sieve-{uuid.uuid4().hex}-{basename(uri)}")

    def __enter__(self) -> "LocalStaging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if is_local(self.uri):
                    os.replace(self.path, self.uri.removeprefix("file://"))
                else:
                    with naming("uploading", self.uri):
                        fs, path = filesystem(self.uri)
                        fs.put_file(self.path, path)
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)


def list_files(pattern_or_dir: str, suffix: str) -> list[str]:
    """Files ending in ``suffix`` under a directory/prefix, or matching a glob, as full URIs, sorted."""
    with naming("listing", pattern_or_dir):
        fs, path = filesystem(pattern_or_dir)
        if fs.isdir(path):
            found = [p for p in fs.find(path, maxdepth=1) if p.endswith(suffix)]
        else:
            found = [p for p in fs.glob(path) if p.endswith(suffix)]
    return sorted(_full_uri(fs, pattern_or_dir, p) for p in found)


def _full_uri(fs: AbstractFileSystem, original: str, path: str) -> str:
    if is_local(original):
        return path
    return fs.unstrip_protocol(path)


def expand_braces(spec: str) -> list[str]:
    """``a/{00000000..00000002}.tar`` and ``a/{x,y}.tar`` expanded the way webdataset/braceexpand do."""
    start = spec.find("{")
    if start < 0:
        return [spec]
    end = spec.find("}", start)
    if end < 0:
        raise ValueError(f"unbalanced brace in input {spec!r}")
    body, head, tail = spec[start + 1 : end], spec[:start], spec[end + 1 :]
    if ".." in body and "," not in body:
        low, high = body.split("..", 1)
        if not (low.isdigit() and high.isdigit()):
            raise ValueError(f"brace range must be numeric: {{{body}}} in {spec!r}")
        width = len(low)
        options = [str(i).zfill(width) for i in range(int(low), int(high) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def iter_inputs(spec: str) -> Iterable[str]:
    """Split a comma-free list of whitespace-separated inputs, expanding braces."""
    for token in spec.split():
        yield from expand_braces(token)


def open_file(uri: str, mode: str = "rb"):
    with naming("opening", uri):
        return fsspec.open(uri, mode).open()


def read_parquet(uri: str, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    with naming("reading", uri):
        fs, path = filesystem(uri)
        return pq.read_table(path, filesystem=fs, columns=columns)


def write_parquet_atomic(uri: str, table, metadata: dict[str, str] | None = None) -> None:
    import pyarrow.parquet as pq

    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with LocalStaging(uri) as staged:
        pq.write_table(table, staged.path, compression="zstd")
