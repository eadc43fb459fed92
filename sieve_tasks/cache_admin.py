"""Upkeep of a caption cache (``sieve cache compact|prune|stats``, and the task at the end of ``sieve_refilter``).

Compaction merges each partition's files into one (sorted by ``h``, deduplicated by SHA-256), folds the hit
logs into ``last_used`` and, for ``prune``, drops entries not used for N days. It writes the merged file
first and deletes what it merged afterwards, so a run reading the cache meanwhile sees either the old files
or the new one (a file deleted under it is a miss, never a wrong caption). Unreadable files are logged,
counted and deleted: they hold nothing usable.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections import defaultdict
from typing import Any

import duckdb
import pyarrow.parquet as pq

from sieve_tasks import storage
from sieve_tasks.caption_cache import HISTORY_DIR, ROW_GROUP_ROWS, Fingerprinted, namespaces, partition_of_file

log = logging.getLogger(__name__)

DAY_SECONDS = 86_400
MERGE = """
    SELECT h, sha256, captions, seconds, created, last_used FROM (
        SELECT any_value(e.h) AS h, e.sha256, arg_min(e.captions, e.created) AS captions,
               arg_min(e.seconds, e.created) AS seconds, min(e.created) AS created,
               greatest(max(e.last_used), coalesce(max(u.last_hit), 0)) AS last_used
        FROM read_parquet(?) AS e LEFT JOIN used AS u ON e.sha256 = u.sha256
        GROUP BY e.sha256)
    WHERE last_used >= ?
    ORDER BY h
"""


def _connect(uri: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET memory_limit = ?", [os.environ.get("SIEVE_DUCKDB_MEMORY", "1GB")])
    con.execute("SET temp_directory = ?", [os.path.join(tempfile.gettempdir(), "sieve-duckdb")])
    con.execute("SET enable_progress_bar = false")
    if not storage.is_local(uri):
        con.register_filesystem(storage.filesystem(uri)[0])
    return con


def compact(uri: str, max_age_days: float | None = None) -> dict[str, Any]:
    """Merge every partition of every fingerprint under ``uri``; with ``max_age_days``, also drop entries not
    used (created or hit) for that long. Returns what it did."""
    if max_age_days is not None and not max_age_days > 0:  # NaN too
        raise ValueError(f"prune --days must be a positive number of days, not {max_age_days} (it would drop every "
                         "entry, those used today too)")
    cutoff = int(time.time() - max_age_days * DAY_SECONDS) if max_age_days is not None else 0
    report = {"fingerprints": 0, "files_before": 0, "files_after": 0, "entries_before": 0, "entries_after": 0,
              "hit_logs_folded": 0, "corrupt_files_removed": 0}
    for space in namespaces(uri):
        report["fingerprints"] += 1
        con = _connect(uri)
        hits = _load_hits(con, space, report)
        compacted = True
        for part, files in sorted(_by_partition(space.entries).items()):
            if len(files) == 1 and not hits and cutoff == 0 and (rows := _rows(files[0])) is not None:
                if rows:  # already one readable file, nothing to fold in: left as it is
                    report["files_before"] += 1
                    report["files_after"] += 1
                    report["entries_before"] += rows
                    report["entries_after"] += rows
                continue
            compacted &= _compact_partition(con, space, part, files, cutoff, report)
        if compacted:  # else the logs stay: they hold the last use of entries in a partition left as it was
            _fold_history(space, hits, report)
    return report


def _by_partition(files: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for file in files:
        groups[partition_of_file(file)].append(file)
    return groups


def _broken(exc: BaseException) -> bool:
    """Whether a read failed on the file's content (not parquet, a cut footer, a page that does not decode) rather
    than on the request (a storage error, raised again: a failed request is no reason to delete a live entry)."""
    cause = exc.__cause__ if isinstance(exc, storage.StorageError) and exc.__cause__ is not None else exc
    return not isinstance(cause, OSError)


def _rows(uri: str) -> int | None:
    """The file's row count from its footer; None if it is broken, 0 if it is gone (merged away meanwhile)."""
    try:
        with storage.open_file(uri) as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except FileNotFoundError:
        return 0
    except Exception as exc:  # noqa: BLE001
        if not _broken(exc):
            raise
        log.warning("caption cache file %s is unreadable: %s", uri, exc)
        return None


def _load_hits(con: duckdb.DuckDBPyConnection, space: Fingerprinted, report: dict[str, Any]) -> dict[str, Any]:
    """The hit logs as a ``used`` table (last hit per SHA-256) and their totals; unreadable logs are removed."""
    readable, lookups, hits, saved = [], 0, 0, 0.0
    for uri in space.hits:
        try:
            with storage.open_file(uri) as handle:
                meta = pq.ParquetFile(handle).metadata
            extra = meta.metadata or {}
            lookups += int(extra.get(b"sieve.lookups", b"0"))
            saved += float(extra.get(b"sieve.seconds_saved", b"0"))
            hits += meta.num_rows
            readable.append(uri)
        except FileNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001
            if not _broken(exc):
                raise
            log.warning("caption cache hit log %s is unreadable, removed: %s", uri, exc)
            storage.remove(uri)
            report["corrupt_files_removed"] += 1
    if readable:
        con.execute("CREATE OR REPLACE TEMP TABLE used AS SELECT sha256, max(used) AS last_hit "
                    "FROM read_parquet(?) GROUP BY sha256", [[storage.glob_literal(f) for f in readable]])
    else:
        con.execute("CREATE OR REPLACE TEMP TABLE used (sha256 BLOB, last_hit BIGINT)")
    return {"logs": readable, "lookups": lookups, "hits": hits, "seconds_saved": saved} if readable else {}


def _compact_partition(con: duckdb.DuckDBPyConnection, space: Fingerprinted, part: str, files: list[str],
                       cutoff: int, report: dict[str, Any]) -> bool:
    """Merge a partition's files into one (pruned); False if it was left as it was."""
    readable = []
    for uri in files:
        rows = _rows(uri)
        if rows is None:
            storage.remove(uri)
            report["corrupt_files_removed"] += 1
        elif rows:  # 0: merged away by another compaction since the listing
            readable.append(uri)
            report["entries_before"] += rows
            report["files_before"] += 1
    target = storage.join(space.root, part, f"{uuid.uuid4().hex}.parquet")
    for attempt in (1, 2):
        if not readable:
            return True
        try:
            with storage.LocalStaging(target) as staged:
                merged = con.sql(MERGE, params=[[storage.glob_literal(f) for f in readable], cutoff])
                merged.write_parquet(staged.path, compression="zstd", row_group_size=ROW_GROUP_ROWS)
            break
        except duckdb.Error as exc:  # a file whose pages do not read, or one another compaction just merged away
            if attempt == 2:
                log.warning("caption cache partition %s/%s not compacted (left as it was): %s", space.root, part, exc)
                return False
            checked = {uri: _fully_readable(uri) for uri in readable}
            for uri in (uri for uri, ok in checked.items() if ok is False):
                storage.remove(uri)
                report["corrupt_files_removed"] += 1
            readable = [uri for uri, ok in checked.items() if ok]
    kept = _rows(target)
    if kept is None:  # the merged file does not read back: the sources stay
        storage.remove(target)
        return False
    if kept:
        report["files_after"] += 1
        report["entries_after"] += kept
    else:  # pruned to nothing
        storage.remove(target)
    for uri in readable:
        storage.remove(uri)
    return True


def _fully_readable(uri: str) -> bool | None:
    """True if every page reads, False if the file is broken, None if it is gone."""
    try:
        storage.read_parquet(uri)
        return True
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001
        if not _broken(exc):
            raise
        log.warning("caption cache file %s is unreadable, removed: %s", uri, exc)
        return False


def _fold_history(space: Fingerprinted, hits: dict[str, Any], report: dict[str, Any]) -> None:
    """Keep the hit logs' totals (for ``stats``) in one history file, then delete the logs."""
    if not hits:
        return
    storage.write_json_atomic(storage.join(space.root, HISTORY_DIR, f"{uuid.uuid4().hex}.json"),
                              {"compacted_at": int(time.time()), "lookups": hits["lookups"], "hits": hits["hits"],
                               "seconds_saved": hits["seconds_saved"], "hit_logs": len(hits["logs"])})
    for uri in hits["logs"]:
        storage.remove(uri)
    report["hit_logs_folded"] += len(hits["logs"])


def stats(uri: str) -> dict[str, Any]:
    """Size and hit rate of every fingerprint under ``uri`` (entries counted per row: before compaction a key
    captioned by two runs at once counts twice)."""
    out = []
    for space in namespaces(uri):
        fs, _ = storage.filesystem(space.root)
        entries = files = size = errors = 0
        for file in space.entries:
            rows = _rows(file)
            if rows is None:
                errors += 1
            if not rows:
                continue
            entries += rows
            files += 1
            size += fs.size(storage.filesystem(file)[1])
        lookups = hits = 0
        saved = 0.0
        for file in space.history:
            record = storage.read_json(file)
            lookups, hits, saved = lookups + record["lookups"], hits + record["hits"], saved + record["seconds_saved"]
        for file in space.hits:
            try:
                with storage.open_file(file) as handle:
                    meta = pq.ParquetFile(handle).metadata
            except Exception:  # noqa: BLE001
                errors += 1
                continue
            extra = meta.metadata or {}
            lookups += int(extra.get(b"sieve.lookups", b"0"))
            saved += float(extra.get(b"sieve.seconds_saved", b"0"))
            hits += meta.num_rows
        out.append({"fingerprint": storage.basename(space.root), "entries": entries, "files": files, "bytes": size,
                    "unreadable_files": errors, "pending_hit_logs": len(space.hits), "lookups": lookups,
                    "hits": hits, "hit_rate": hits / lookups if lookups else None,
                    "seconds_saved": round(saved, 3)})
    return {"cache": uri, "fingerprints": out}
