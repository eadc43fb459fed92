"""Publish step: ``RUN/manifest/`` with DataComp's ``subset.npy``, ``kept.parquet`` and ``summary.json``,
and the completion marker ``_SUCCESS`` written last. Re-publishing a run gives byte-identical files."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.lib import format as npy_format

from sieve_tasks import storage
from sieve_tasks.pool import pool_shards
from sieve_tasks.stages.aggregate import candidate_filter, connect, define_views, score_files, score_expression, thresholds_uri
from sieve_tasks.stages.base import marker_uri
from sieve_tasks.test_models import is_test_model

SUBSET_DTYPE = np.dtype("u8,u8")
KEPT_COLUMNS = ("shard", "key", "url", "sieve_score", "sieve_mean", "clip_score", "best_caption")
ROWS_PER_BATCH = 1 << 18
TEST_PROFILE_WARNING = (
    "TEST PROFILE: the captioner and CLIP are tiny randomly initialised models built offline; the scores "
    "and the kept set exercise the pipeline but mean nothing about data quality."
)


def manifest_uri(run: str, name: str = "") -> str:
    return storage.join(run, "manifest", name) if name else storage.join(run, "manifest")


def publish(run: str) -> dict[str, Any]:
    """Write the manifest of an aggregated run and return its summary."""
    thresholds = storage.read_json(thresholds_uri(run))
    selection = thresholds["selection"]
    shards = pool_shards(run)
    files, score_markers = score_files(run, shards)
    con = connect(run)
    define_views(con, files, thresholds["duplicates_file"])
    expression, params = score_expression(selection)
    # the uid text is re-made from its two halves rather than read: a lighter scan
    query = f"""
        SELECT printf('%016x%016x', uid_hi, uid_lo) AS uid, {', '.join(KEPT_COLUMNS)},
               {expression} AS selection_score, uid_hi, uid_lo
        FROM unique_ok WHERE {candidate_filter(selection)} AND ({expression}) >= ?
        ORDER BY uid_hi, uid_lo
    """
    kept = _write_manifest_files(con.sql(query, params=params + params + [selection["threshold"]]), run)
    markers = {"captions": [storage.read_json(marker_uri(run, "captions", s.shard_id)) for s in shards],
               "embeddings": [storage.read_json(marker_uri(run, "embeddings", s.shard_id)) for s in shards],
               "scores": score_markers}
    summary = _summary(run, thresholds, kept, markers)
    storage.write_json_atomic(manifest_uri(run, "summary.json"), summary)
    storage.write_json_atomic(manifest_uri(run, "_SUCCESS"), {"kept": kept, "fingerprint": thresholds["fingerprint"]})
    return summary


def _write_manifest_files(relation, run: str) -> int:
    """Stream the kept rows once, in uid order, into kept.parquet and subset.npy; returns their number.

    The uid pairs go to a body file first; the npy header, which needs the count, is written in front
    of it at the end.
    """
    reader = relation.to_arrow_reader(ROWS_PER_BATCH)
    kept_schema = pa.schema([f for f in reader.schema if f.name not in ("uid_hi", "uid_lo")])
    kept = 0
    with storage.LocalStaging(manifest_uri(run, "kept.parquet")) as parquet_out, \
            storage.LocalStaging(manifest_uri(run, "subset.npy")) as npy_out, \
            tempfile.TemporaryFile() as body:
        with pq.ParquetWriter(parquet_out.path, kept_schema, compression="zstd") as writer:
            for table in _rebatch(reader, ROWS_PER_BATCH):
                pairs = np.empty(table.num_rows, SUBSET_DTYPE)
                pairs["f0"] = table.column("uid_hi").to_numpy()
                pairs["f1"] = table.column("uid_lo").to_numpy()
                body.write(pairs.tobytes())
                writer.write_table(table.select(kept_schema.names), row_group_size=ROWS_PER_BATCH)
                kept += table.num_rows
        body.seek(0)
        with open(npy_out.path, "wb") as npy:
            npy_format.write_array_header_1_0(npy, {"descr": npy_format.dtype_to_descr(SUBSET_DTYPE),
                                                    "fortran_order": False, "shape": (kept,)})
            shutil.copyfileobj(body, npy, 1 << 24)
    return kept


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
    facts = {key: sum(m.get(key, 0) or 0 for m in markers) for key in ("captioned", "provided", "oom_splits")
             if any(key in m for m in markers)}
    return markers[0]["settings"], round(sum(m["seconds"] for m in markers), 3), facts


def _summary(run: str, thresholds: dict[str, Any], kept: int, markers: dict[str, list[dict[str, Any]]]
             ) -> dict[str, Any]:
    captions, caption_s, caption_facts = _stage_record(markers["captions"])
    embeddings, embed_s, _ = _stage_record(markers["embeddings"])
    scores, score_s, _ = _stage_record(markers["scores"])
    counts = {**thresholds["counts"], "kept": kept}
    test_profile = is_test_model(captions["captioner"]) or is_test_model(embeddings["clip"])
    unique = counts["scored"] - counts["duplicates"]
    return {
        "counts": counts,
        "kept_fraction_of_unique": kept / unique if unique else 0.0,
        "failed_by_reason": thresholds["failed_by_reason"],
        "thresholds": thresholds["selection"],
        "models": {"captioner": captions["captioner"], "captions_file": captions["captions"],
                   "text_encoder": embeddings["text_encoder"], "clip": embeddings["clip"],
                   "clip_from_metadata": embeddings["clip_from_metadata"]},
        "profile": "test" if test_profile else "default",
        "warning": TEST_PROFILE_WARNING if test_profile else None,
        "settings": {"captions": captions, "embeddings": embeddings, "scores": scores},
        "captioning": caption_facts,
        "timings_seconds": {"caption": caption_s, "embed": embed_s, "score": score_s,
                            "aggregate": thresholds["seconds"]},
        "manifest": {name: manifest_uri(run, name) for name in ("subset.npy", "kept.parquet", "summary.json")},
        "shards": len(markers["scores"]),
    }
