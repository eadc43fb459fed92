"""The per-shard table of a run (read, expected, ok, failed, kept, seconds), outliers first."""

from __future__ import annotations

from typing import Any

import duckdb

from sieve_tasks import storage


def kept_by_shard(con: duckdb.DuckDBPyConnection, run: str) -> dict[str, int]:
    """Kept rows per shard, from ``manifest/kept.parquet`` (one dictionary-encoded column read)."""
    kept = storage.join(run, "manifest", "kept.parquet")
    rows = con.execute("SELECT shard, count(*) FROM read_parquet(?) GROUP BY shard", [storage.glob_literal(kept)]).fetchall()
    return dict(rows)


def shard_table(markers: dict[str, list[dict[str, Any]]], kept: dict[str, int]) -> list[dict[str, Any]]:
    """One row per shard from the stages' completion markers; ``expected`` is the caption marker's (null when
    the shard has no sidecar parquet / _stats.json, or the run predates it). Sorted by how far each shard is
    from the pool: failure rate, then missing samples, then kept fraction away from the pool's."""
    seconds: dict[str, float] = {}
    for stage_markers in markers.values():
        for marker in stage_markers:
            seconds[marker["shard"]] = seconds.get(marker["shard"], 0.0) + (marker.get("seconds") or 0.0)
    expected = {m["shard"]: m.get("expected") for m in markers["captions"]}
    rows = []
    for marker in markers["scores"]:
        shard = marker["shard"]
        rows.append({"shard": shard, "read": marker.get("rows"), "expected": expected.get(shard),
                     "ok": marker.get("ok"), "failed": marker.get("failed"), "kept": kept.get(shard, 0),
                     "seconds": round(seconds[shard], 3)})
    total_ok = sum(r["ok"] or 0 for r in rows)
    pool_kept = sum(r["kept"] for r in rows) / total_ok if total_ok else 0.0
    for row in rows:
        read, ok = row["read"] or 0, row["ok"] or 0
        missing = (row["expected"] - read) / row["expected"] if isinstance(row["expected"], int) and row["expected"] else 0.0
        row["outlier"] = round((row["failed"] or 0) / read if read else 0.0, 6) + round(max(missing, 0.0), 6) \
            + round(abs(row["kept"] / ok - pool_kept) if ok else 0.0, 6)
    return sorted(rows, key=lambda r: (-r["outlier"], r["shard"]))
