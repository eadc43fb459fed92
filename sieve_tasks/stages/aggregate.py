"""Aggregate step: DuckDB over every score file of the run (local or S3) → ``RUN/thresholds.json``.

The pool is never loaded into Python memory and never fully sorted: counts and min/max come from one
scan, duplicate uids from sorting the uids' first 64 bits in bounded partitions, and the fraction
threshold from a histogram scan followed by an exact look inside the one bin that holds the cut. DuckDB
runs under a memory limit (``SIEVE_DUCKDB_MEMORY``, default 1GB) and spills, so 100M+ rows fit a small
machine. Values coming from
the user are bound parameters, never SQL text; score columns come from a fixed list.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import duckdb
import numpy as np

from sieve_tasks import storage
from sieve_tasks.pool import pool_shards
from sieve_tasks.settings import Settings, fingerprint
from sieve_tasks.shards import Shard
from sieve_tasks.stages.base import marker_uri

SCORE_COLUMNS = {"sieve": "sieve_score", "clip": "clip_score"}
HISTOGRAM_BINS = 1 << 20
DUPLICATE_PARTITION_ROWS = 25_000_000


def thresholds_uri(run: str) -> str:
    return storage.join(run, "thresholds.json")


def duplicates_uri(run: str) -> str:
    return storage.join(run, "duplicates.parquet")


def connect(run: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET memory_limit = ?", [os.environ.get("SIEVE_DUCKDB_MEMORY", "1GB")])
    con.execute("SET temp_directory = ?", [os.path.join(tempfile.gettempdir(), "sieve-duckdb")])
    con.execute("SET preserve_insertion_order = false")
    con.execute("SET enable_progress_bar = false")
    if not storage.is_local(run):
        fs, _ = storage.filesystem(run)
        con.register_filesystem(fs)
    return con


def score_files(run: str, shards: list[Shard]) -> tuple[list[str], list[dict[str, Any]]]:
    """Every shard's score file and completion marker (each read once); an error naming the shards not
    scored yet."""
    markers, missing = [], []
    for shard in shards:
        try:
            markers.append(storage.read_json(marker_uri(run, "scores", shard.shard_id)))
        except FileNotFoundError:
            missing.append(shard.shard_id)
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(shards)} shards have no scores yet: {missing[:10]}")
    return [storage.join(run, "scores", f"{s.shard_id}.parquet") for s in shards], markers


def define_views(con: duckdb.DuckDBPyConnection, files: list[str], duplicates: str | None = None) -> None:
    """``scores`` (every row read) and ``unique_ok`` (scored rows, each uid once: first shard, first position).

    ``duplicates`` is the parquet of later occurrences written by :func:`find_duplicates`.
    """
    con.read_parquet(files).create_view("scores")
    if duplicates is None:
        con.execute("CREATE OR REPLACE TEMP VIEW unique_ok AS SELECT * FROM scores WHERE status = 'ok'")
    else:
        con.read_parquet(duplicates).create_view("later_duplicates")
        con.execute("""
            CREATE OR REPLACE TEMP VIEW unique_ok AS
            SELECT * FROM scores s WHERE status = 'ok'
            AND NOT EXISTS (SELECT 1 FROM later_duplicates d WHERE d.shard = s.shard AND d.position = s.position)
        """)


def find_duplicates(con: duckdb.DuckDBPyConnection, run: str, rows: int) -> tuple[int, str | None]:
    """Later occurrences of repeated uids (→ ``RUN/duplicates.parquet``).

    The first 64 bits of every scored uid are fetched in a few partitions (≤ 25M values, 200 MB each)
    and sorted with numpy, which is far cheaper than a hash aggregation over the pool; the repeated
    values found are then checked on the full uids in SQL.
    """
    partitions = max(1, -(-rows // DUPLICATE_PARTITION_ROWS))
    bits = max(1, int(np.ceil(np.log2(partitions)))) if partitions > 1 else 0
    repeated: list[np.ndarray] = []
    for part in range(1 << bits):
        where = "status = 'ok'" + (f" AND (uid_hi >> {64 - bits}) = ?" if bits else "")
        values = con.execute(f"SELECT uid_hi FROM scores WHERE {where}", [part] if bits else []).fetchnumpy()["uid_hi"]
        values = np.asarray(values, dtype=np.uint64)
        values.sort()
        repeated.append(np.unique(values[1:][values[1:] == values[:-1]]))
        del values
    candidates = np.concatenate(repeated)
    if candidates.size == 0:
        return 0, None
    con.register("repeated_uid_hi", {"uid_hi": candidates})
    con.execute("""
        CREATE OR REPLACE TEMP TABLE later AS
        SELECT uid, shard, position FROM scores
        WHERE status = 'ok' AND uid_hi IN (SELECT uid_hi FROM repeated_uid_hi)
        QUALIFY row_number() OVER (PARTITION BY uid ORDER BY shard, position) > 1
    """)
    (count,) = con.execute("SELECT count(*) FROM later").fetchall()[0]
    if count == 0:
        return 0, None
    uri = duplicates_uri(run)
    with storage.LocalStaging(uri) as staged:
        con.execute("COPY (SELECT * FROM later ORDER BY shard, position) TO ? (FORMAT parquet)", [staged.path])
    return count, uri


def score_expression(selection: dict[str, Any]) -> tuple[str, list[Any]]:
    """SQL for the selected score (columns from a fixed list, numbers as parameters)."""
    score = selection["score"]
    if score in SCORE_COLUMNS:
        return SCORE_COLUMNS[score], []
    terms, params = [], []
    for name, weight in sorted(selection["weights"].items()):
        column = SCORE_COLUMNS[name]
        low, high = selection["minmax"][column]["min"], selection["minmax"][column]["max"]
        terms.append(f"CAST(? AS DOUBLE) * CASE WHEN ? = ? THEN 0.0 ELSE ({column} - ?) / (? - ?) END")
        params += [weight, high, low, low, high, low]
    return " + ".join(terms), params


def candidate_filter(selection: dict[str, Any]) -> str:
    names = selection["weights"] if selection["score"] == "fused" else [selection["score"]]
    clauses = [f"{SCORE_COLUMNS[n]} IS NOT NULL" for n in names]
    if selection["basic_filter"]:
        clauses.append("passes_basic_filter")
    return " AND ".join(clauses)


def aggregate(run: str, settings: Settings) -> dict[str, Any]:
    """Compute counts, min/max and the keep threshold for the whole pool; skip when already done."""
    files, markers = score_files(run, pool_shards(run))
    prints = [marker["fingerprint"] for marker in markers]
    request = settings.subset("score", "weights", "fraction", "threshold", "thresholds_from", "basic_filter")
    if settings.thresholds_from is not None:
        request["reference"] = storage.read_json(thresholds_uri(settings.thresholds_from))["selection"]
    expected = fingerprint({"request": request, "scores": prints})
    uri = thresholds_uri(run)
    if not settings.overwrite and storage.exists(uri):
        done = storage.read_json(uri)
        if done.get("fingerprint") == expected:
            return done
    started = time.perf_counter()
    con = connect(run)
    define_views(con, files)
    by_status = con.execute("""
        SELECT status, reason, count(*), min(sieve_score), max(sieve_score), min(clip_score), max(clip_score)
        FROM scores GROUP BY status, reason ORDER BY status, reason
    """).fetchall()
    scored = sum(row[2] for row in by_status if row[0] == "ok")
    failed = sum(row[2] for row in by_status if row[0] != "ok")
    duplicates, duplicates_file = find_duplicates(con, run, scored)
    if duplicates_file is not None:
        define_views(con, files, duplicates_file)
        minmax = _minmax(con.execute("SELECT min(sieve_score), max(sieve_score), min(clip_score), max(clip_score) "
                                     "FROM unique_ok").fetchall()[0])
    else:
        ok = [row[3:] for row in by_status if row[0] == "ok"]
        minmax = _minmax(ok[0] if ok else (None,) * 4)
    result = {
        "fingerprint": expected,
        "selection": _selection(con, settings, minmax),
        "counts": {"read": scored + failed, "scored": scored, "failed": failed, "duplicates": duplicates},
        "failed_by_reason": {row[1]: row[2] for row in by_status if row[0] != "ok"},
        "duplicates_file": duplicates_file,
        "pool_minmax": minmax,
        "seconds": round(time.perf_counter() - started, 3),
    }
    storage.write_json_atomic(uri, result)
    return result


def _minmax(values: tuple) -> dict[str, dict[str, float | None]]:
    return {"sieve_score": {"min": values[0], "max": values[1]}, "clip_score": {"min": values[2], "max": values[3]}}


def _selection(con: duckdb.DuckDBPyConnection, settings: Settings, minmax: dict[str, Any]) -> dict[str, Any]:
    if settings.thresholds_from is not None:
        reference = storage.read_json(thresholds_uri(settings.thresholds_from))["selection"]
        return {**reference, "rule": "reference", "reference_run": settings.thresholds_from,
                "reference_rule": reference["rule"]}
    selection: dict[str, Any] = {
        "score": settings.score,
        "weights": dict(sorted(settings.weights.items())) if settings.score == "fused" else None,
        "basic_filter": settings.basic_filter,
        "minmax": minmax,
    }
    if settings.threshold is not None:
        return {**selection, "rule": "threshold", "threshold": settings.threshold}
    candidates, n, threshold = fraction_threshold(con, selection, settings.fraction)
    return {**selection, "rule": "fraction", "fraction": settings.fraction, "candidates": candidates, "n": n,
            "threshold": threshold}


def fraction_threshold(con: duckdb.DuckDBPyConnection, selection: dict[str, Any], fraction: float
                       ) -> tuple[int, int, float]:
    """DataComp's rule without a full sort: n = int(N·F); the threshold is element n of the descending order.

    Scores have a known range (cosines in [-1, 1], a fused score in [0, 1]): one scan counts them in
    2^20 bins, which finds the bin holding rank n; a second scan sorts only that bin.
    """
    expression, params = score_expression(selection)
    where = candidate_filter(selection)
    low, high = (0.0, 1.0) if selection["score"] == "fused" else (-1.0, 1.0)
    bin_of = (f"least(greatest(CAST(floor((({expression}) - ?) * ?) AS BIGINT), 0), {HISTOGRAM_BINS - 1})")
    bin_params = params + [low, HISTOGRAM_BINS / (high - low)]
    counts = con.execute(f"SELECT {bin_of} AS b, count(*) AS c FROM unique_ok WHERE {where} GROUP BY b",
                         bin_params).fetchnumpy()
    if len(counts["b"]) == 0:
        raise RuntimeError(f"no sample has a {selection['score']} score to threshold (all failed or filtered out)")
    order = np.argsort(-np.asarray(counts["b"]))  # bins from the top score down
    bins, sizes = np.asarray(counts["b"])[order], np.asarray(counts["c"], dtype=np.int64)[order]
    candidates = int(sizes.sum())
    n = min(int(candidates * fraction), candidates - 1)
    cumulative = np.cumsum(sizes)
    index = int(np.searchsorted(cumulative, n, side="right"))
    above = int(cumulative[index - 1]) if index else 0
    (threshold,) = con.execute(
        f"SELECT {expression} AS s FROM unique_ok WHERE {where} AND {bin_of} = ? ORDER BY s DESC LIMIT 1 OFFSET ?",
        params + bin_params + [int(bins[index]), n - above],
    ).fetchall()[0]
    return candidates, n, threshold
