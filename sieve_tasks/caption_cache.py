"""A content-addressed cache of captions shared by runs (``--caption-cache URI``), so a fresh crawl only
captions the images it has not seen before.

Layout under ``URI/captions-v1/<fingerprint>/`` (the fingerprint covers every setting that decides a
caption, so another setting never hits)::

    <p>/<uuid>.parquet        entries: h (first 8 bytes of the image's SHA-256, uint64), sha256, captions,
                              seconds (captioning time it cost), created, last_used (unix seconds); sorted by h
    _hits/<uuid>.parquet      one per shard looked up: the sha256 of its hits and when (metadata: lookups, saved)
    _history/<uuid>.json      what a compaction folded in from the hit logs (for ``stats``)

``<p>`` is the first hex digit of the SHA-256 (16 partitions). Every file is written once, atomically, under a
new name by the task that made it, and never rewritten: concurrent tasks and pods cannot collide. Compaction
writes a partition's merged file and only then deletes the files it merged; a key present twice (two runs
captioned the same new image at once) is harmless and merged away.

A lookup reads the ``h`` column of every entry file once per shard (files are immutable, so a process keeps
what it has read), answers "maybe cached" from that in memory while the tar streams, and fetches the captions
of the candidates in batches, reading only the row groups that hold them, the full SHA-256 compared.
Unreadable files are logged, counted and skipped: their samples are captioned as if missing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sieve_tasks import storage
from sieve_tasks.settings import Settings, fingerprint

log = logging.getLogger(__name__)
T = TypeVar("T")

LAYOUT = "captions-v1"
PARTITION_DIGITS = 1  # 16 partitions: a shard's ~10k hashes touch all of them whatever the count
ROW_GROUP_ROWS = 512  # a fetch reads whole row groups: small ones keep that close to the rows it needs
FETCH_BATCH = 1024  # candidate hits whose captions the caption stage fetches together
READ_THREADS = min(8, os.cpu_count() or 1)  # cache files read at once (pyarrow decodes without the GIL)
HITS_DIR, HISTORY_DIR = "_hits", "_history"
# What decides a caption besides the image (the compute dtype and a BLIP checkpoint's SHA-256 are added): the
# captioner, the prompt, every decoding setting, the image size, the number of captions, int8. The batch size
# only regroups images.
CAPTION_KEY_SETTINGS = ("captioner", "prompt", "top_p", "min_length", "max_length", "repetition_penalty",
                        "image_size", "num_captions", "seed", "fast_decode", "int8")
ENTRY_SCHEMA = pa.schema([
    ("h", pa.uint64()), ("sha256", pa.binary()), ("captions", pa.list_(pa.string())), ("seconds", pa.float32()),
    ("created", pa.int64()), ("last_used", pa.int64()),
])
HITS_SCHEMA = pa.schema([("sha256", pa.binary()), ("used", pa.int64())])


def cache_fingerprint(settings: Settings, identity: dict[str, str]) -> str:
    """The namespace of the entries a run may reuse: captioner and decoding settings, plus ``identity`` (the
    compute dtype; a BLIP checkpoint file's SHA-256)."""
    return fingerprint({"layout": LAYOUT, "settings": settings.subset(*CAPTION_KEY_SETTINGS), **identity})


def image_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def prefix_key(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big")


@dataclass
class CacheCounts:
    """What one shard's lookups and writes did; goes to the caption marker and ``summary.json``."""

    hits: int = 0
    misses: int = 0
    written: int = 0
    errors: int = 0
    seconds_saved: float = 0.0
    lookup_seconds: float = 0.0

    def as_facts(self) -> dict[str, Any]:
        facts = asdict(self)
        facts["seconds_saved"] = round(self.seconds_saved, 3)
        facts["lookup_seconds"] = round(self.lookup_seconds, 3)
        return facts


@dataclass
class Cached:
    captions: list[str]
    seconds: float


class CaptionCache:
    """One fingerprint's entries under a cache URI: per-shard indexes, new entries, hit logs."""

    def __init__(self, uri: str, key: str):
        self.uri = uri
        self.root = storage.join(uri, LAYOUT, key)
        self._keys: dict[str, np.ndarray] = {}  # entry file → its sorted h column (files never change)

    def index(self, counts: CacheCounts) -> "CacheIndex":
        """Everything in the cache now, as one in-memory key set (read once per shard; new files in parallel)."""
        started = time.perf_counter()
        try:
            files = entry_files(self.root)
        except OSError as exc:
            log.warning("caption cache %s cannot be listed, captioning without it: %s", self.root, exc)
            counts.errors += 1
            files = []
        new = [uri for uri in files if uri not in self._keys]
        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="cache-read") as pool:
            for uri, keys in zip(new, pool.map(storage.carrying_options(lambda u: _guarded(read_keys, u)), new)):
                if isinstance(keys, np.ndarray):
                    self._keys[uri] = keys
                elif keys is not None:  # unreadable (a vanished file, merged away by a compaction, is not counted)
                    log.warning("caption cache file %s is unreadable, skipped: %s", uri, keys)
                    counts.errors += 1
        self._keys = {uri: self._keys[uri] for uri in files if uri in self._keys}
        counts.lookup_seconds += time.perf_counter() - started
        return CacheIndex(dict(self._keys), counts)

    def add(self, entries: list[tuple[bytes, list[str], float]], counts: CacheCounts) -> None:
        """Write new entries (digest, captions, captioning seconds), one immutable file per partition; a
        failed write is logged and counted, never raised."""
        if not entries:
            return
        digests, captions, seconds = (list(column) for column in zip(*entries))
        now = int(time.time())
        table = pa.table({
            "h": pa.array([prefix_key(d) for d in digests], pa.uint64()), "sha256": pa.array(digests, pa.binary()),
            "captions": pa.array(captions, pa.list_(pa.string())), "seconds": pa.array(seconds, pa.float32()),
            "created": pa.array([now] * len(digests), pa.int64()), "last_used": pa.array([now] * len(digests), pa.int64()),
        }, schema=ENTRY_SCHEMA)
        table = table.sort_by("h")
        parts = np.array([partition(d) for d in table.column("sha256").to_pylist()])
        for part in sorted(set(parts.tolist())):
            rows = table.filter(pa.array(parts == part))
            try:
                write_entries(storage.join(self.root, part, f"{uuid.uuid4().hex}.parquet"), rows)
                counts.written += rows.num_rows
            except Exception as exc:  # noqa: BLE001 - the run's own output does not depend on the cache
                log.warning("caption cache: writing %d entries to %s failed: %s", rows.num_rows, self.root, exc)
                counts.errors += 1

    def record_hits(self, digests: list[bytes], counts: CacheCounts) -> None:
        """One hit log per shard: compaction turns it into ``last_used``, ``stats`` into a hit rate."""
        if counts.hits + counts.misses == 0:  # nothing was looked up
            return
        now = int(time.time())
        table = pa.table({"sha256": pa.array(digests, pa.binary()), "used": pa.array([now] * len(digests), pa.int64())},
                         schema=HITS_SCHEMA)
        table = table.replace_schema_metadata({"sieve.lookups": str(counts.hits + counts.misses),
                                               "sieve.seconds_saved": repr(counts.seconds_saved)})
        try:
            storage.write_parquet_atomic(storage.join(self.root, HITS_DIR, f"{uuid.uuid4().hex}.parquet"), table)
        except Exception as exc:  # noqa: BLE001
            log.warning("caption cache: writing the hit log under %s failed: %s", self.root, exc)
            counts.errors += 1


class CacheIndex:
    """The keys of one listing of the cache: ``maybe`` in memory per sample, ``fetch`` in batches."""

    def __init__(self, keys_by_file: dict[str, np.ndarray], counts: CacheCounts):
        self.keys_by_file = keys_by_file
        self.counts = counts
        self.keys = np.sort(np.concatenate(list(keys_by_file.values()))) if keys_by_file else np.empty(0, np.uint64)

    def maybe(self, digest: bytes) -> bool:
        """Whether some entry has this digest's first 8 bytes (thread-safe: read-only)."""
        if not len(self.keys):
            return False
        key = np.uint64(prefix_key(digest))
        at = int(np.searchsorted(self.keys, key))
        return at < len(self.keys) and self.keys[at] == key

    def fetch(self, digests: Iterable[bytes]) -> dict[bytes, Cached]:
        """The entries of these digests, reading only the row groups that hold them; absent ones are missing."""
        started = time.perf_counter()
        wanted = set(digests)
        found: dict[bytes, Cached] = {}
        keys = np.array([prefix_key(d) for d in wanted], np.uint64)
        jobs = [(uri, rows) for uri, file_keys in self.keys_by_file.items() if len(rows := _rows_of(file_keys, keys))]
        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="cache-read") as pool:
            results = pool.map(storage.carrying_options(lambda job: _guarded(_read_rows, job[0], job[1], wanted)), jobs)
            for (uri, _), result in zip(jobs, results):
                if isinstance(result, dict):
                    for digest, cached in result.items():
                        found.setdefault(digest, cached)
                elif result is not None:
                    log.warning("caption cache file %s is unreadable, skipped: %s", uri, result)
                    self.counts.errors += 1
        self.counts.lookup_seconds += time.perf_counter() - started
        return found


def _guarded(read: Callable[..., T], *args: Any) -> T | Exception | None:
    """``read(*args)``, or the exception that makes a cache file unusable (None: the file is gone), so that a
    broken cache file never fails a run."""
    try:
        return read(*args)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - any failure to read a cache file means: not cached
        return exc


def read_keys(uri: str) -> np.ndarray:
    """A file's ``h`` column (``ParquetFile.read``: several times faster than ``read_table`` on many row groups)."""
    with storage.open_file(uri) as handle:
        return pq.ParquetFile(handle).read(columns=["h"], use_threads=False).column("h").to_numpy()


def _rows_of(file_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Row numbers in a file (sorted by h) whose h is one of ``keys``."""
    lo = np.searchsorted(file_keys, keys, side="left")
    hi = np.searchsorted(file_keys, keys, side="right")
    spans = [np.arange(a, b) for a, b in zip(lo, hi) if b > a]
    return np.unique(np.concatenate(spans)) if spans else np.empty(0, np.int64)


def _read_rows(uri: str, rows: np.ndarray, wanted: set[bytes]) -> dict[bytes, Cached]:
    """The wanted entries among ``rows`` of one file, read with the row groups holding them in one call (an
    8-byte prefix match is checked on all 32 bytes)."""
    with storage.open_file(uri) as handle:
        parquet = pq.ParquetFile(handle)
        sizes = np.array([parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)])
        starts = np.concatenate([[0], np.cumsum(sizes)])
        group_of_row = np.searchsorted(starts, rows, side="right") - 1
        groups = np.unique(group_of_row)
        table = parquet.read_row_groups(groups.tolist(), columns=["sha256", "captions", "seconds"])
    # where each group begins in the concatenation of the groups read
    read_starts = np.concatenate([[0], np.cumsum(sizes[groups])])[np.searchsorted(groups, group_of_row)]
    picked = table.take(pa.array(read_starts + rows - starts[group_of_row]))
    out: dict[bytes, Cached] = {}
    for digest, captions, seconds in zip(picked.column("sha256").to_pylist(), picked.column("captions").to_pylist(),
                                         picked.column("seconds").to_pylist()):
        if digest in wanted and captions:
            out[digest] = Cached(captions, float(seconds or 0.0))
    return out


def partition(digest: bytes) -> str:
    return digest.hex()[:PARTITION_DIGITS]


def partition_of_file(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 2)[-2]


def entry_files(root: str) -> list[str]:
    """The entry files of one fingerprint (not hit logs, not a writer's staging file)."""
    return namespace(root).entries


def write_entries(uri: str, table: pa.Table) -> None:
    with storage.LocalStaging(uri) as staged:
        pq.write_table(table, staged.path, compression="zstd", row_group_size=ROW_GROUP_ROWS,
                       use_dictionary=False)


@dataclass
class Fingerprinted:
    """One fingerprint's directory, for ``stats`` and compaction."""

    root: str
    entries: list[str] = field(default_factory=list)
    hits: list[str] = field(default_factory=list)
    history: list[str] = field(default_factory=list)


def namespace(root: str) -> Fingerprinted:
    """The files of one fingerprint's directory, by kind (one recursive listing)."""
    space = Fingerprinted(root)
    for file in storage.find_files(root, ""):
        folder, name = file.rstrip("/").rsplit("/", 2)[-2:]
        if folder == storage.TEMPORARY_DIR:  # a writer's staging file, or one left by a killed writer
            continue
        if folder == HITS_DIR and name.endswith(".parquet"):
            space.hits.append(file)
        elif folder == HISTORY_DIR and name.endswith(".json"):
            space.history.append(file)
        elif name.endswith(".parquet"):
            space.entries.append(file)
    return space


def namespaces(uri: str) -> list[Fingerprinted]:
    """Every fingerprint's directory under a cache URI."""
    base = storage.join(uri, LAYOUT)
    with storage.naming("listing", base):
        fs, path = storage.filesystem(base)
        keys = sorted(storage.basename(p) for p in fs.ls(path, detail=False)) if fs.exists(path) else []
    return [namespace(storage.join(base, key)) for key in keys]
