"""One storage layer over fsspec for local paths and ``s3://`` URIs.

Every stage reads and writes through these helpers, so a run directory can live on a laptop disk or in a
bucket. Writes are atomic: a temporary name plus rename locally, a single PUT on object stores (a reader
never sees a partial object), which is what lets completion markers make reruns safe.
"""

from __future__ import annotations

import contextvars
import copy
import fcntl
import hashlib
import json
import os
import re
import posixpath
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.spec import AbstractFileSystem


# Transient object-store faults (5xx, SlowDown/throttling, connection resets, timeouts) are retried with
# exponential backoff by botocore (standard mode: 6 attempts) and around that by s3fs (5 tries of its own
# for connection errors, timeouts and SlowDown), within a bounded budget. Set
# fsspec.config.conf["s3"] (or FSSPEC_S3_* variables) to change it.
S3_DEFAULTS = {
    "config_kwargs": {"retries": {"max_attempts": 6, "mode": "standard"}, "connect_timeout": 10, "read_timeout": 60},
}
fsspec.config.conf.setdefault("s3", copy.deepcopy(S3_DEFAULTS))  # botocore edits the dict it is given


R = TypeVar("R")


class StorageError(OSError):
    """An object could not be read or written (after retries); the message names the object and the cause."""


@contextmanager
def naming(action: str, uri: str, errors: tuple[type[BaseException], ...] = (Exception,)) -> Iterator[None]:
    """Re-raise ``errors`` as a :class:`StorageError` that names the object and the cause."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        if uri in str(exc):
            raise
        raise FileNotFoundError(f"{action} {uri}: not found ({exc})") from exc
    except errors as exc:
        raise StorageError(f"{action} {uri} failed: {type(exc).__name__}: {exc}") from exc


#: fsspec options per protocol for the current context (see :func:`storage_options`); a ContextVar, so each
#: thread and each asyncio task sees its own: concurrent tasks in one worker never share credentials.
_OPTIONS: contextvars.ContextVar[Mapping[str, Mapping[str, Any]]] = contextvars.ContextVar(
    "sieve_storage_options", default={})


@contextmanager
def storage_options(protocol: str, options: Mapping[str, Any]) -> Iterator[None]:
    """Open every ``protocol`` URI in this block with these fsspec options (e.g. s3fs ``key``, ``secret``,
    ``endpoint_url``) instead of the process environment's. Threads started inside the block see them only
    when started with :func:`contextvars.copy_context` (as the lease renewal is)."""
    token = _OPTIONS.set({**_OPTIONS.get(), protocol: dict(options)})
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def carrying_options(fn: Callable[..., R]) -> Callable[..., R]:
    """``fn`` called with this context's storage options from whichever thread runs it (the workers of a
    ``ThreadPoolExecutor`` do not inherit context variables)."""
    options = _OPTIONS.get()

    def call(*args: Any, **kwargs: Any) -> R:
        with restored_options(options):
            return fn(*args, **kwargs)

    return call


def options_snapshot() -> Mapping[str, Mapping[str, Any]]:
    """This context's storage options, to hand to another process (see :func:`restored_options`)."""
    return {protocol: dict(options) for protocol, options in _OPTIONS.get().items()}


@contextmanager
def restored_options(snapshot: Mapping[str, Mapping[str, Any]]) -> Iterator[None]:
    """The storage options of :func:`options_snapshot`, in this context for the block."""
    token = _OPTIONS.set(snapshot)
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def current_options(protocol: str) -> dict[str, Any]:
    """The options :func:`storage_options` set for ``protocol`` in this context (empty: the environment's)."""
    return dict(_OPTIONS.get().get(protocol, {}))


def filesystem(uri: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem serving ``uri`` and the path inside it: options from :func:`storage_options`,
    else the environment (AWS variables and config files). fsspec caches one instance per set of options."""
    return url_to_fs(uri, **current_options(split_protocol(uri)[0] or "file"))


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


def download(uri: str, local_path: str) -> None:
    """Copy one object (local, ``s3://``, ``http(s)://``) to a local file, streamed."""
    with naming("downloading", uri):
        fs, path = filesystem(uri)
        fs.get_file(path, local_path)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


TEMPORARY_DIR = "_tmp"  # beside each target: no reader's glob (``dir/*.parquet``) or dataset scan goes there


class PreconditionFailed(StorageError):
    """A conditional write lost: the object exists (create) or changed since it was read (replace)."""


def _local_path(uri: str) -> str:
    return os.path.abspath(uri.removeprefix("file://"))


def _staging_path(target: str) -> str:
    """``dir/_tmp/<name>.<random>``: on the target's filesystem (so a rename publishes it), out of readers' sight."""
    directory = os.path.join(os.path.dirname(target), TEMPORARY_DIR)
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f"{os.path.basename(target)}.{uuid.uuid4().hex}")


def sweep_temporaries(uri: str) -> int:
    """Remove what killed writers of ``uri`` left behind (local only: object stores get single PUTs)."""
    if not is_local(uri):
        return 0
    target = _local_path(uri)
    directory = os.path.join(os.path.dirname(target), TEMPORARY_DIR)
    if not os.path.isdir(directory):
        return 0
    swept = 0
    for name in os.listdir(directory):
        if name.startswith(os.path.basename(target) + "."):
            os.unlink(os.path.join(directory, name))
            swept += 1
    return swept


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole object (file mode per umask)."""
    if is_local(uri):
        with LocalStaging(uri) as staged, open(staged.path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return
    with naming("writing", uri):
        fs, path = filesystem(uri)
        fs.pipe_file(path, data)  # one PUT (or a completed multipart upload): never a partial object


def write_json_atomic(uri: str, payload: Any) -> None:
    write_bytes_atomic(uri, canonical_json(payload))


def canonical_json(payload: Any) -> bytes:
    """Deterministic JSON (sorted keys, fixed indent) so re-published files are byte-identical."""
    return (json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def remove(uri: str) -> None:
    """Delete ``uri`` if it exists."""
    with naming("removing", uri):
        fs, path = filesystem(uri)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


class LocalStaging:
    """A local path for writers that need one (pyarrow, numpy); published atomically when the block succeeds.

    Local targets are staged in ``_tmp/`` beside the target and renamed; remote ones are staged in a temporary
    directory and uploaded with one ``put_file`` (a single PUT or a completed multipart upload).
    """

    def __init__(self, uri: str):
        self.uri = uri
        if is_local(uri):
            self.path = _staging_path(_local_path(uri))
        else:
            self.path = os.path.join(tempfile.gettempdir(), f"sieve-{uuid.uuid4().hex}-{basename(uri)}")

    def __enter__(self) -> "LocalStaging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if is_local(self.uri):
                    os.replace(self.path, _local_path(self.uri))
                else:
                    with naming("uploading", self.uri):
                        fs, path = filesystem(self.uri)
                        fs.put_file(self.path, path)
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)


def read_versioned(uri: str) -> tuple[bytes, str]:
    """The object's bytes and a version token for :func:`write_if` (the ETag on S3, a content hash locally)."""
    if is_local(uri):
        with open(_local_path(uri), "rb") as handle:
            data = handle.read()
        return data, hashlib.sha256(data).hexdigest()
    with naming("reading", uri):
        fs, path = filesystem(uri)
        fs.invalidate_cache(path)
        # the version first: should the object change before its bytes are read, the stale version makes the
        # conditional write that follows fail (and be retried), never succeed on content not seen
        version = fs.info(path)["ETag"]
        return fs.cat_file(path), version


def write_if(uri: str, data: bytes, version: str | None) -> None:
    """Write ``data`` only if ``uri`` does not exist (``version`` None) or is still at ``version``; else raise
    :class:`PreconditionFailed`. Object stores get a conditional PUT (``If-None-Match: *`` / ``If-Match``);
    local files a check and rename under an exclusive ``flock`` of the file's directory."""
    if is_local(uri):
        target = _local_path(uri)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        lock = os.open(os.path.dirname(target), os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = read_versioned(uri)[1] if os.path.exists(target) else None
            if current != version:
                raise PreconditionFailed(f"{uri} {'exists' if version is None else 'changed'} (conditional write refused)")
            write_bytes_atomic(uri, data)
        finally:
            os.close(lock)  # releases the lock
        return
    fs, path = filesystem(uri)
    bucket, key, _ = fs.split_path(path)
    condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except Exception as exc:
        if _is_precondition_failure(exc):
            raise PreconditionFailed(f"{uri} {'exists' if version is None else 'changed'} (conditional write refused)"
                                     ) from exc
        raise StorageError(f"writing {uri} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        fs.invalidate_cache(path)


PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412"}


def _is_precondition_failure(exc: BaseException | None) -> bool:
    """Whether a conditional PUT was refused (412 PreconditionFailed; 409 ConditionalRequestConflict while another
    conditional write of the key is in flight), from the error response anywhere in the chain (s3fs keeps botocore's
    as the cause), never from message text: a connection error's URL may hold "412"."""
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            if code in PRECONDITION_CODES or (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") == 412:
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def glob_literal(path: str) -> str:
    """``path`` with glob characters escaped (``[`` → ``[[]``), so DuckDB reads that one file and no other."""
    return re.sub(r"([\[\]*?])", r"[\1]", path)


def file_identity(uri: str) -> dict[str, Any]:
    """What identifies a file's content cheaply: size and mtime locally, size and ETag on object stores."""
    with naming("checking", uri):
        fs, path = filesystem(uri)
        return identity_of(fs.info(path), is_local(uri))


def identity_of(info: dict[str, Any], local: bool) -> dict[str, Any]:
    if local:
        return {"size": int(info["size"]), "mtime": info.get("mtime")}
    etag = info.get("ETag") or info.get("etag")
    return {"size": int(info["size"]), "etag": etag.strip('"') if isinstance(etag, str) else etag}


def list_files(pattern_or_dir: str, suffix: str) -> list[str]:
    """Files ending in ``suffix`` under a directory/prefix, or matching a glob, as full URIs, sorted."""
    return sorted(list_files_with_identity(pattern_or_dir, suffix))


def list_files_with_identity(pattern_or_dir: str, suffix: str) -> dict[str, dict[str, Any]]:
    """:func:`list_files` with each file's :func:`file_identity`, from the listing itself (no request per file).

    A directory/prefix, a glob's fixed part, or a bucket that does not exist is a :class:`FileNotFoundError`
    naming it: "nothing there" and "nothing matched" are different answers."""
    local = is_local(pattern_or_dir)
    with naming("listing", pattern_or_dir):
        fs, path = filesystem(pattern_or_dir)
        if any(ch in path for ch in "*?["):
            fixed = path[: min(path.find(ch) for ch in "*?[" if ch in path)].rpartition("/")[0] or "/"
            _require_exists(fs, fixed, pattern_or_dir, local)
            found = {p: info for p, info in fs.glob(path, detail=True).items() if p.endswith(suffix)}
        else:
            _require_exists(fs, path, pattern_or_dir, local)
            found = {p: info for p, info in fs.find(path, maxdepth=1, detail=True).items() if p.endswith(suffix)}
    return {_full_uri(fs, pattern_or_dir, p): identity_of(info, local) for p, info in found.items()}


def _require_exists(fs: AbstractFileSystem, path: str, spec: str, local: bool) -> None:
    if fs.exists(path):
        return
    if not local:
        bucket = path.split("/", 1)[0]
        if not fs.exists(bucket):
            raise FileNotFoundError(f"bucket {bucket!r} does not exist or is not readable (input {spec})")
    raise FileNotFoundError(f"input location does not exist: {fs.unstrip_protocol(path) if not local else path} "
                            f"(input {spec})")


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
        fs, path = filesystem(uri)
        return fs.open(path, mode)


def read_parquet(uri: str, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    with naming("reading", uri):
        fs, path = filesystem(uri)
        return pq.read_table(path, filesystem=fs, columns=columns)


def write_parquet_atomic(uri: str, table, metadata: dict[str, str] | None = None) -> None:
    import pyarrow.parquet as pq

    if metadata:
        # pyarrow keeps metadata keys as bytes: a table derived from another stage's output carries its keys
        ours = {key.encode(): value.encode() for key, value in metadata.items()}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **ours})
    # vectors (lists of floats) are stored plain: zstd gains ~7 % on them at several times the time, and
    # dictionaries and min/max statistics of unit-vector components help no reader
    plain = {f.name for f in table.schema if _is_vector(f.type)}
    others = [name for name in table.column_names if name not in plain]
    with LocalStaging(uri) as staged:
        pq.write_table(table, staged.path, compression={name: "none" if name in plain else "zstd" for name in
                                                         table.column_names},
                       use_dictionary=others, write_statistics=others)


def _is_vector(arrow_type) -> bool:
    """A list (of lists ...) of floats."""
    import pyarrow as pa

    nested = False
    while pa.types.is_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        arrow_type, nested = arrow_type.value_type, True
    return nested and pa.types.is_floating(arrow_type)


def find_files(prefix: str, suffix: str) -> list[str]:
    """Files ending in ``suffix`` anywhere under ``prefix`` (recursive), as full URIs, sorted; none if it is absent."""
    with naming("listing", prefix):
        fs, path = filesystem(prefix)
        if not fs.exists(path):
            return []
        found = [p for p in fs.find(path) if p.endswith(suffix)]
    return sorted(_full_uri(fs, prefix, p) for p in found)

