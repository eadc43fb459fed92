"""Aggregate step: DuckDB over every score file of the run (local or S3) → ``RUN/thresholds.json``.

Nothing is loaded into Python memory: min/max, counts and the threshold are SQL over the parquet files,
with DuckDB's memory limit and spilling, so a 100M+ row pool fits a 24 GiB machine. Every value coming
from the user is a bound parameter, never SQL text.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import duckdb

from sieve_tasks import storage
from sieve_tasks.pool import pool_shards
from sieve_tasks.settings import Settings, fingerprint
from sieve_tasks.stages.base import marker_uri

SCORE_COLUMNS = {"sieve": "sieve_score", "clip": "clip_score"}


def thresholds_uri(run: str) -> str:
    return storage.join(run, "thresholds.json")


def connect(run: str, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET memory_limit = ?", [memory_limit or os.environ.get("SIEVE_DUCKDB_MEMORY", "4GB")])
    con.execute("SET temp_directory = ?", [os.path.join(tempfile.gettempdir(), "sieve-duckdb")])
    con.execute("SET preserve_insertion_order = false")
    if not storage.is_local(run):
        fs, _ = storage.filesystem(run)
        con.register_filesystem(fs)
    return con


def score_files(run: str) -> tuple[list[str], list[str]]:
    """Every shard's score file and marker fingerprint; an error naming the shards not scored yet."""
    shards = pool_shards(run)
    missing = [s.shard_id for s in shards if not storage.exists(marker_uri(run, "scores", s.shard_id))]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(shards)} shards have no scores yet: {missing[:10]}")
    files = [storage.join(run, "scores", f"{s.shard_id}.parquet") for s in shards]
    prints = [storage.read_json(marker_uri(run, "scores", s.shard_id))["fingerprint"] for s in shards]
    return files, prints


def define_views(con: duckdb.DuckDBPyConnection, files: list[str]) -> None:
    """``scores`` (every row read) and ``unique_ok`` (scored rows, each uid once: first shard, first position)."""
    con.read_parquet(files).create_view("scores")
    con.execute("""
        CREATE OR REPLACE TEMP VIEW unique_ok AS
        SELECT * FROM scores WHERE status = 'ok'
        QUALIFY row_number() OVER (PARTITION BY uid ORDER BY shard, position) = 1
    """)


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
    columns = [SCORE_COLUMNS[n] for n in (selection["weights"] if selection["score"] == "fused" else [selection["score"]])]
    clauses = [f"{c} IS NOT NULL" for c in columns]
    if selection["basic_filter"]:
        clauses.append("passes_basic_filter")
    return " AND ".join(clauses)


def aggregate(run: str, settings: Settings) -> dict[str, Any]:
    """Compute counts, min/max and the keep threshold for the whole pool; skip when already done."""
    files, prints = score_files(run)
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
    read, scored, failed, unique = con.execute("""
        SELECT count(*), count(*) FILTER (status = 'ok'), count(*) FILTER (status <> 'ok'),
               (SELECT count(*) FROM unique_ok) FROM scores
    """).fetchall()[0]
    reasons = dict(con.execute(
        "SELECT reason, count(*) FROM scores WHERE status <> 'ok' GROUP BY reason ORDER BY reason").fetchall())
    minmax = {
        column: dict(zip(("min", "max"), con.execute(f"SELECT min({column}), max({column}) FROM unique_ok").fetchall()[0]))
        for column in SCORE_COLUMNS.values()
    }
    selection = _selection(con, settings, minmax)
    result = {
        "fingerprint": expected,
        "selection": selection,
        "counts": {"read": read, "scored": scored, "failed": failed, "duplicates": scored - unique},
        "failed_by_reason": reasons,
        "pool_minmax": minmax,
        "seconds": round(time.perf_counter() - started, 3),
    }
    storage.write_json_atomic(uri, result)
    return result


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
    expression, params = score_expression(selection)
    where = candidate_filter(selection)
    (candidates,) = con.execute(f"SELECT count(*) FROM unique_ok WHERE {where}").fetchall()[0]
    if candidates == 0:
        raise RuntimeError(f"no sample has a {settings.score} score to threshold (all failed or filtered out)")
    n = min(int(candidates * settings.fraction), candidates - 1)  # DataComp: sorted descending, [n]
    (threshold,) = con.execute(
        f"SELECT {expression} AS s FROM unique_ok WHERE {where} ORDER BY s DESC LIMIT 1 OFFSET ?", params + [n]
    ).fetchall()[0]
    return {**selection, "rule": "fraction", "fraction": settings.fraction, "candidates": candidates, "n": n,
            "threshold": threshold}
