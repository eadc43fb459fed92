"""Publish step: ``RUN/manifest/`` with DataComp's ``subset.npy``, ``kept.parquet``, ``summary.json`` (with the
health verdict) and ``report.html``, and the completion marker ``_SUCCESS`` written last, only when the verdict
is not ``failed``. Re-publishing a run gives byte-identical files."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.lib import format as npy_format

from sieve_tasks import storage
from sieve_tasks.buckets import RadixBuckets
from sieve_tasks.pool import pool_shards
from sieve_tasks.report import RunReport, stage_markers
from sieve_tasks.report.health import HealthRules, assess, histogram_mean
from sieve_tasks.report.shards import kept_by_shard, shard_table
from sieve_tasks.stages.aggregate import (candidate_filter, check_score_files, connect, define_views, manifest_uri,
                                         score_expression, score_files, scores_fingerprint, thresholds_uri,
                                         use_joined_selectable, withdraw_publication)
from sieve_tasks.stages.base import InconsistentRun, check_one_result
from sieve_tasks.test_models import is_test_model

SUBSET_DTYPE = np.dtype("u8,u8")
KEPT_COLUMNS = ("shard", "key", "url", "sieve_score", "sieve_mean", "clip_score", "best_caption")
ROWS_PER_BATCH = 1 << 18
MANIFEST_FILES = ("subset.npy", "kept.parquet", "duplicates.parquet", "summary.json", "report.html", "_SUCCESS")
DICTIONARY_COLUMNS = ["shard"]  # the other columns are (nearly) unique per row: a dictionary only costs time
DUPLICATES_NOTE = (
    "subset.npy lists each uid once, but DataComp's resharder copies every sample carrying a listed uid: a kept uid "
    "that occurs k times in the pool is copied k times (and the resharder reports a negative number of images "
    "'not found'). duplicates.parquet lists every occurrence (uid, shard, key, position, occurrence; occurrence 1 "
    "is the one scored); drop the extra samples from the shards, or accept the copies."
)
TEST_PROFILE_WARNING = (
    "TEST PROFILE: the captioner and CLIP are tiny randomly initialised models built offline; the scores "
    "and the kept set exercise the pipeline but mean nothing about data quality."
)


def publish(run: str, rules: HealthRules | None = None, scheduled: bool = False) -> dict[str, Any]:
    """Write the manifest and report of an aggregated run and return its summary (``health.verdict`` says
    whether it may be used; ``scheduled``: a scheduled DAG run, where the test profile is not expected)."""
    # _SUCCESS goes first and comes back last: whatever a killed publish leaves, it never vouches for it (nor does
    # a report of the last publish stay to be shown as this one's)
    withdraw_publication(run)
    for name in MANIFEST_FILES:
        storage.sweep_temporaries(manifest_uri(run, name))
    thresholds = storage.read_json(thresholds_uri(run))
    selection = thresholds["selection"]
    shards = pool_shards(run)
    files, score_markers = score_files(run, shards)
    markers = stage_markers(run, shards, score_markers)
    check_one_result(markers, {shard.shard_id: shard.identity for shard in shards})
    if thresholds.get("scores_fingerprint") != scores_fingerprint(score_markers):
        raise InconsistentRun(f"{thresholds_uri(run)} was computed from other scores than the run holds now "
                              "(shards were re-scored since): run aggregate again")
    con = connect(run)
    check_score_files(con, files, score_markers)
    define_views(con, files, thresholds["duplicates_file"])
    sources = thresholds.get("sources") or {"population": "scored", "tables": {}}
    duplicated = _write_duplicates(con, run, thresholds["duplicates_file"] is not None)
    expression, params = score_expression(selection)
    external = tuple(c for t in sources["tables"].values() for c in t["columns"].values() if c.startswith("score_"))
    pool_rows = thresholds["counts"]["scored"] + thresholds.get("missing_scores", {}).get("unscored_uids", 0)
    if use_joined_selectable(con, sources):  # the joined rows (the report's too), in pool order, then uids without
        columns = ", ".join(("shard", "position", "sieve_score", "clip_score") + external)
        query = f"""
            SELECT uid_hi, uid_lo, {columns}, {expression} AS selection_score
            FROM selectable_file WHERE {candidate_filter(selection)} AND ({expression}) >= ?
            ORDER BY shard NULLS LAST, position, uid_hi, uid_lo
        """
        reader = con.sql(query, params=params + params + [selection["threshold"]]).to_arrow_reader(ROWS_PER_BATCH)
        kept_rows = PoolColumns(run, external).reader(reader)
    else:
        # Pool order (shard, position) without a sort: DuckDB streams the files in the given (shard) order when
        # told to keep it; the anti-join that drops duplicates does not keep it, so then the rows are sorted.
        order = " ORDER BY shard, position" if thresholds["duplicates_file"] else ""
        con.execute("SET preserve_insertion_order = true")
        query = f"""
            SELECT uid_hi, uid_lo, {', '.join(KEPT_COLUMNS)}, {expression} AS selection_score
            FROM unique_ok WHERE {candidate_filter(selection)} AND ({expression}) >= ?{order}
        """
        kept_rows = con.sql(query, params=params + params + [selection["threshold"]]).to_arrow_reader(ROWS_PER_BATCH)
    kept = _write_manifest_files(kept_rows, run, pool_rows)
    shard_rows = shard_table(markers, kept_by_shard(con, run))
    summary = _summary(run, thresholds, kept, markers)
    summary["duplicates"] = {**duplicated, "note": DUPLICATES_NOTE}  # the file: summary["manifest"]
    summary["health"] = assess(run, summary, thresholds.get("histograms") or {}, shard_rows, rules or HealthRules(),
                               scheduled)
    storage.write_json_atomic(manifest_uri(run, "summary.json"), summary)
    RunReport(run, con, summary, thresholds, shard_rows).write()
    if summary["health"]["verdict"] != "failed":  # a failed run is never marked complete
        storage.write_json_atomic(manifest_uri(run, "_SUCCESS"), {"kept": kept, "fingerprint": thresholds["fingerprint"]})
    return summary


def _write_duplicates(con: duckdb.DuckDBPyConnection, run: str, any_duplicates: bool) -> dict[str, int]:
    """``manifest/duplicates.parquet``: every occurrence of each uid scored more than once (empty when none)."""
    if not any_duplicates:
        con.execute("CREATE OR REPLACE TEMP VIEW later_duplicates AS SELECT uid FROM scores WHERE false")
    with storage.LocalStaging(manifest_uri(run, "duplicates.parquet")) as staged:
        con.execute("""
            COPY (SELECT uid, shard, key, position,
                         row_number() OVER (PARTITION BY uid ORDER BY shard, position) AS occurrence
                  FROM scores WHERE status = 'ok' AND uid IN (SELECT uid FROM later_duplicates)
                  ORDER BY uid, occurrence) TO ? (FORMAT parquet, COMPRESSION zstd)
        """, [staged.path])
        (uids, samples) = con.execute("SELECT count(DISTINCT uid), count(*) FROM read_parquet(?)",
                                      [storage.glob_literal(staged.path)]).fetchall()[0]
    return {"uids": uids, "samples": samples}


class PoolColumns:
    """Completes joined rows sorted by (shard, position) with the score files' key, url, sieve_mean and best_caption,
    reading one shard's file at a time: the pool side of the join without a second join."""

    FROM_SCORES = ("key", "url", "sieve_mean", "best_caption")

    def __init__(self, run: str, external: tuple[str, ...]):
        self.run, self.external = run, external
        self._shard: str | None = None
        self._table: pa.Table | None = None

    def reader(self, joined: pa.RecordBatchReader) -> pa.RecordBatchReader:
        names = ["uid_hi", "uid_lo", *KEPT_COLUMNS, *self.external, "selection_score"]
        types = {**{f.name: f.type for f in joined.schema}, "key": pa.string(), "url": pa.string(),
                 "sieve_mean": pa.float64(), "best_caption": pa.string()}
        schema = pa.schema([(name, types[name]) for name in names])
        return pa.RecordBatchReader.from_batches(schema, (self.complete(b, schema) for b in joined))

    def complete(self, batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
        shards = np.asarray(batch.column("shard").to_pylist(), dtype=object)
        positions = batch.column("position").to_numpy(zero_copy_only=False)
        starts = np.concatenate([[0], np.flatnonzero(shards[1:] != shards[:-1]) + 1, [len(shards)]])
        pieces = [self.rows_of(shards[a], positions[a:b]) for a, b in zip(starts[:-1], starts[1:]) if b > a]
        pool = pa.concat_tables(pieces) if pieces else pa.table({c: pa.array([], schema.field(c).type)
                                                                  for c in self.FROM_SCORES})
        columns = {**{name: batch.column(name) for name in batch.schema.names},
                   **{name: pool.column(name).combine_chunks() for name in self.FROM_SCORES}}
        return pa.RecordBatch.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)

    def rows_of(self, shard: str | None, positions: np.ndarray) -> pa.Table:
        if shard is None:  # uids of a joined table without a scored sample
            return pa.table({"key": pa.nulls(len(positions), pa.string()), "url": pa.nulls(len(positions), pa.string()),
                             "sieve_mean": pa.nulls(len(positions), pa.float64()),
                             "best_caption": pa.nulls(len(positions), pa.string())})
        if shard != self._shard:
            self._shard = shard
            self._table = storage.read_parquet(storage.join(self.run, "scores", f"{shard}.parquet"),
                                               columns=["position", *self.FROM_SCORES])
        rows = np.searchsorted(self._table.column("position").to_numpy(), positions)
        return self._table.select(list(self.FROM_SCORES)).take(pa.array(rows))


def _write_manifest_files(reader: pa.RecordBatchReader, run: str, pool_rows: int) -> int:
    """Stream the kept rows once into kept.parquet (pool order) and subset.npy (uid order); returns their number."""
    kept_schema = pa.schema([pa.field("uid", pa.string())] +
                            [f for f in reader.schema if f.name not in ("uid_hi", "uid_lo")])
    kept = 0
    with storage.LocalStaging(manifest_uri(run, "kept.parquet")) as parquet_out, \
            storage.LocalStaging(manifest_uri(run, "subset.npy")) as npy_out, \
            RadixBuckets(SUBSET_DTYPE, pool_rows) as uids:
        with pq.ParquetWriter(parquet_out.path, kept_schema, compression="zstd",
                              use_dictionary=DICTIONARY_COLUMNS) as writer:
            for table in _rebatch(reader, ROWS_PER_BATCH):
                pairs = np.empty(table.num_rows, SUBSET_DTYPE)
                pairs["f0"], pairs["f1"] = table.column("uid_hi").to_numpy(), table.column("uid_lo").to_numpy()
                uids.add(pairs, pairs["f0"])
                rows = table.drop_columns(["uid_hi", "uid_lo"]).add_column(0, "uid", uid_text(pairs))
                writer.write_table(rows, row_group_size=ROWS_PER_BATCH)
                kept += table.num_rows
        with open(npy_out.path, "wb") as npy:
            npy_format.write_array_header_1_0(npy, {"descr": npy_format.dtype_to_descr(SUBSET_DTYPE),
                                                    "fortran_order": False, "shape": (kept,)})
            for pairs in uids.sorted_buckets(_sorted_pairs):  # ascending uid ranges
                npy.write(pairs.tobytes())
    return kept


_HEX_DIGIT_PAIRS = np.array([ord(f"{b:02x}"[0]) | ord(f"{b:02x}"[1]) << 8 for b in range(256)], "<u2")


def uid_text(pairs: np.ndarray) -> pa.StringArray:
    """DataComp's 32-hex-digit uids from (first half, second half) pairs, vectorised: a 256-entry table maps each
    byte to its two digits (several times faster than formatting the numbers one by one, even in DuckDB)."""
    raw = np.empty((len(pairs), 2), ">u8")
    raw[:, 0], raw[:, 1] = pairs["f0"], pairs["f1"]
    digits = np.take(_HEX_DIGIT_PAIRS, raw.view(np.uint8).reshape(-1))
    offsets = np.arange(0, 32 * (len(pairs) + 1), 32, dtype=np.int32)
    return pa.StringArray.from_buffers(len(pairs), pa.py_buffer(offsets), pa.py_buffer(digits))


def _sorted_pairs(pairs: np.ndarray) -> np.ndarray:
    """Pairs in ascending (first half, second half) order: a sort on the first half (vectorised), with a full
    two-key sort only when two first halves are equal."""
    pairs = pairs[np.argsort(pairs["f0"])]
    if len(pairs) > 1 and bool((pairs["f0"][1:] == pairs["f0"][:-1]).any()):
        pairs = pairs[np.lexsort((pairs["f1"], pairs["f0"]))]
    return pairs


def _rebatch(reader: pa.RecordBatchReader, size: int) -> Iterator[pa.Table]:
    """Tables of exactly ``size`` rows (the last one shorter) whatever batches DuckDB's threads produced,
    so row groups, and so the files, are reproducible. Slicing a table of batches copies nothing."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in reader:
        pending.append(batch)
        count += batch.num_rows
        if count >= size:
            table = pa.Table.from_batches(pending)
            offset = 0
            while count - offset >= size:
                yield table.slice(offset, size)
                offset += size
            pending = table.slice(offset).to_batches()
            count -= offset
    if count:
        yield pa.Table.from_batches(pending, schema=reader.schema)


def _stage_record(markers: list[dict[str, Any]]) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """(settings, total seconds, extra facts) of a per-shard stage, from its completion markers."""
    facts = {key: sum(m.get(key, 0) or 0 for m in markers) for key in ("captioned", "provided", "oom_splits", "gpu_decode_refused")
             if any(key in m for m in markers)}
    cache = [m["cache"] for m in markers if m.get("cache")]
    if cache:  # --caption-cache: hits, misses, written, errors, seconds_saved, lookup_seconds
        facts["cache"] = {key: round(sum(c[key] for c in cache), 3) for key in cache[0]}
        looked_up = facts["cache"]["hits"] + facts["cache"]["misses"]
        facts["cache"]["hit_rate"] = round(facts["cache"]["hits"] / looked_up, 4) if looked_up else None
    return markers[0]["settings"], round(sum(m["seconds"] for m in markers), 3), facts


def _expected(markers: list[dict[str, Any]]) -> dict[str, Any]:
    """How many samples the pool should hold (img2dataset's sidecars), or None with the shards that do not say."""
    unknown = [m.get("shard") for m in markers if m.get("expected") is None]
    return {"expected": None if unknown else sum(m["expected"] for m in markers),
            "expected_unknown_shards": len(unknown),
            "missing_from_tar": sum(m.get("missing_from_tar", 0) for m in markers)}


def _summary(run: str, thresholds: dict[str, Any], kept: int, markers: dict[str, list[dict[str, Any]]]
             ) -> dict[str, Any]:
    captions, caption_s, caption_facts = _stage_record(markers["captions"])
    embeddings, embed_s, _ = _stage_record(markers["embeddings"])
    scores, score_s, _ = _stage_record(markers["scores"])
    counts = {**thresholds["counts"], "kept": kept, **_expected(markers["captions"])}
    test_profile = is_test_model(captions["captioner"]) or is_test_model(captions.get("clip", ""))
    # the population: the unique scored samples, and with --population metadata the table's uids without one
    unique = counts["scored"] - counts["duplicates"] + thresholds.get("missing_scores", {}).get("unscored_uids", 0)
    return {
        "counts": counts,
        "kept_fraction_of_unique": kept / unique if unique else 0.0,
        "failed_by_reason": thresholds["failed_by_reason"],
        "thresholds": thresholds["selection"],
        "population": thresholds.get("population", "scored"),
        "missing_scores": thresholds.get("missing_scores", {}),
        "tables": thresholds.get("tables", {}),
        "models": {"captioner": captions["captioner"], "captions_file": captions["captions"],
                   "text_encoder": embeddings["text_encoder"], "clip": captions.get("clip", "none"),
                   "clip_from_metadata": captions["clip_from_metadata"],
                   **({"captioner_sha256": captions["captioner_sha256"]} if "captioner_sha256" in captions else {})},
        "profile": "test" if test_profile else "default",
        "warning": TEST_PROFILE_WARNING if test_profile else None,
        "settings": {"captions": captions, "embeddings": embeddings, "scores": scores},
        "captioning": caption_facts,
        "timings_seconds": {"caption": caption_s, "embed": embed_s, "score": score_s,
                            "aggregate": thresholds["seconds"]},
        "manifest": {name: manifest_uri(run, name) for name in MANIFEST_FILES[:5]},
        "score_mean": histogram_mean((thresholds.get("histograms") or {}).get(thresholds["selection"]["score"])),
        "shards": len(markers["scores"]),
    }
