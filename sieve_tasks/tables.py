"""Per-uid tables joined to the pool by uid in DuckDB: DataComp's ``metadata/`` (``--metadata``) and published score
tables (``--external-score NAME=URI:COLUMN``).

A uid is matched on its two 64-bit halves parsed from the hex text, so upper- and lower-case spellings are one uid
(outputs write lower case). Aggregate imports each table once, streamed from an explicit list of parquet files:
uids parsed into their halves (vectorised), the basic filter computed when asked, repeated uids checked one uid
range at a time (a uid listed twice is refused: which row would count is ambiguous), into
``RUN/tables/<name>.parquet``. The join runs once and is kept as ``RUN/tables/selectable.parquet``, which the
threshold and publish read.

``selectable`` is the view the selection reads: the unique scored samples with the joined columns (population
``scored``), or the union of them and every uid of the joined tables (population ``metadata``: DataComp's N, where a
uid whose download or decode failed still counts and can be kept).
"""

from __future__ import annotations

from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from sieve_tasks import storage
from sieve_tasks.buckets import RadixBuckets
from sieve_tasks.settings import METADATA_CLIP_COLUMNS, Settings, split_external_spec
from sieve_tasks.shards import uid_halves
from sieve_tasks.stages.score import basic_filter_features

SCORE_COLUMNS = {"sieve": "sieve_score", "clip": "clip_score"}
BASIC_FILTER_COLUMNS = ["text", "original_width", "original_height"]
SCAN_BATCH = 1 << 20


def score_column(name: str) -> str:
    """The column of score ``name`` in ``selectable`` (external names are validated identifiers)."""
    return SCORE_COLUMNS.get(name, f"score_{name}")


def plan_sources(run: str, settings: Settings, names: list[str], basic_filter: bool) -> dict[str, Any]:
    """What to join for the scores ``names`` (and the basic filter), as JSON recorded in thresholds.json."""
    tables: dict[str, dict[str, Any]] = {}
    metadata_columns = ({METADATA_CLIP_COLUMNS[settings.clip_from_metadata]: "clip_score"}
                        if settings.metadata_clip and "clip" in names else {})
    if metadata_columns or (settings.metadata is not None and basic_filter):
        tables["metadata"] = {"uri": settings.metadata, **_files_and_identities(settings.metadata),
                              "columns": metadata_columns, "basic_filter": settings.metadata is not None and basic_filter}
    for name in names:
        if name in settings.external_scores:
            uri, column = split_external_spec(name, settings.external_scores[name])
            tables[f"external_{name}"] = {"uri": uri, **_files_and_identities(uri),
                                          "columns": {column: score_column(name)}, "basic_filter": False}
    unknown = [n for n in names if n not in SCORE_COLUMNS and f"external_{n}" not in tables]
    if unknown:
        raise ValueError(f"the selection uses the scores {unknown}: give them with --external-score NAME=URI:COLUMN")
    for view, table in tables.items():
        table["imported"] = storage.join(run, "tables", f"{view}.parquet")
    return {"population": settings.population, "tables": tables,
            "selectable": storage.join(run, "tables", "selectable.parquet") if tables else None}


def _files_and_identities(uri: str) -> dict[str, list]:
    """A table's parquet files and each one's identity (size + mtime, or ETag): recorded in the thresholds'
    request, so a table replaced at the same path is joined again (as a replaced tar is read again)."""
    if _single_file(uri):
        return {"files": [uri], "identities": [storage.file_identity(uri)]}
    found = storage.list_files_with_identity(uri, ".parquet")  # one listing, not a request per file
    if not found:
        raise FileNotFoundError(f"no .parquet files in {uri}")
    return {"files": sorted(found), "identities": [found[file] for file in sorted(found)]}


def check_sources(settings: Settings) -> None:
    """Fail before any GPU time when ``--metadata`` or an ``--external-score`` table has no parquet file."""
    for uri in [settings.metadata] if settings.metadata else []:
        parquet_files(uri)
    for name, spec in settings.external_scores.items():
        parquet_files(split_external_spec(name, spec)[0])


def parquet_files(uri: str) -> list[str]:
    """The parquet files of a table given as one file, a dir/prefix or a glob (sorted, explicit)."""
    files = [uri] if _single_file(uri) else storage.list_files(uri, ".parquet")
    if not files:
        raise FileNotFoundError(f"no .parquet files in {uri}")
    return files


def _single_file(uri: str) -> bool:
    return uri.endswith(".parquet") and not any(c in uri for c in "*?[")


def import_table(con: duckdb.DuckDBPyConnection, table: dict[str, Any]) -> dict[str, int]:
    """Stream one table into ``table["imported"]``: uid halves, its renamed columns, and DataComp's basic filter on
    ``text``/``original_width``/``original_height`` when asked (one language detection per row: the slow part)."""
    sources = ["uid", *table["columns"], *(BASIC_FILTER_COLUMNS if table["basic_filter"] else [])]
    dataset = _dataset(table["files"], sources)
    rows = dataset.count_rows()
    fields = [pa.field("uid_hi", pa.uint64()), pa.field("uid_lo", pa.uint64())]
    fields += [pa.field(target, dataset.schema.field(source).type) for source, target in table["columns"].items()]
    if table["basic_filter"]:
        fields.append(pa.field("passes_basic_filter", pa.bool_()))
    invalid = non_finite = 0
    with storage.LocalStaging(table["imported"]) as staged, RadixBuckets(np.uint64, rows) as halves:
        with pq.ParquetWriter(staged.path, pa.schema(fields), compression="zstd") as writer:
            for batch in dataset.to_batches(columns=sources, batch_size=SCAN_BATCH):
                hi, lo, valid = uid_halves(batch.column(0))
                invalid += int((~valid).sum())
                keep = pa.array(valid)
                columns = [pa.array(hi[valid]), pa.array(lo[valid])]
                for i in range(len(table["columns"])):  # NaN or ±inf is no score: missing, counted
                    values = batch.column(i + 1).filter(keep)
                    finite = pc.is_finite(values) if pa.types.is_floating(values.type) else None
                    if finite is not None:
                        non_finite += int(pc.sum(pc.invert(finite)).as_py() or 0)
                        values = pc.if_else(finite, values, pa.scalar(None, values.type))
                    columns.append(values)
                if table["basic_filter"]:
                    texts, widths, heights = (batch.column(c).filter(keep).to_pylist() for c in BASIC_FILTER_COLUMNS)
                    columns.append(pa.array([_passes(*row) for row in zip(texts, widths, heights)], pa.bool_()))
                writer.write_table(pa.Table.from_arrays(columns, schema=writer.schema))
                halves.add(hi[valid])
        repeated = np.concatenate([np.unique(v[1:][v[1:] == v[:-1]]) for v in halves.sorted_buckets(np.sort)])
        _refuse_repeats(con, staged.path, table["uri"], repeated)
    return {"rows": rows, "invalid_uids": invalid, "non_finite_scores": non_finite}


def _refuse_repeats(con: duckdb.DuckDBPyConnection, path: str, uri: str, repeated_hi: np.ndarray) -> None:
    if repeated_hi.size == 0:
        return
    con.register("repeated_hi", {"uid_hi": repeated_hi})
    found = con.execute("SELECT uid_hi, uid_lo, count(*) FROM read_parquet(?) WHERE uid_hi IN (SELECT uid_hi FROM "
                        "repeated_hi) GROUP BY uid_hi, uid_lo HAVING count(*) > 1 LIMIT 1", [storage.glob_literal(path)]).fetchall()
    if found:
        hi, lo, count = found[0]
        raise ValueError(f"{uri}: uid {hi:016x}{lo:016x} is listed {count} times (a per-uid table needs each uid once)")


def _passes(text: str | None, width: int | None, height: int | None) -> bool:
    if not isinstance(text, str) or not width or not height:
        return False
    return basic_filter_features(text, int(width), int(height))["passes_basic_filter"]


def define_selectable(con: duckdb.DuckDBPyConnection, sources: dict[str, Any]) -> None:
    """The ``selectable`` view: ``unique_ok`` joined with the imported tables (population scored: left joins;
    metadata: full joins, so every uid of a table is a row)."""
    if not sources["tables"]:
        con.execute("CREATE OR REPLACE TEMP VIEW selectable AS SELECT * FROM unique_ok")
        return
    own = set(con.sql("SELECT * FROM unique_ok LIMIT 0").columns)
    replaced, added = [], []
    for view, table in sources["tables"].items():
        con.read_parquet(storage.glob_literal(table["imported"])).create_view(view)
        columns = list(table["columns"].values()) + (["passes_basic_filter"] if table["basic_filter"] else [])
        for column in columns:
            (replaced if column in own else added).append(f"{view}.{column}" + (f" AS {column}" if column in own else ""))
    star = "unique_ok.* EXCLUDE (uid_hi, uid_lo)"
    if replaced:
        star += f" REPLACE ({', '.join(replaced)})"
    join = "LEFT JOIN" if sources["population"] == "scored" else "FULL JOIN"
    joins = " ".join(f"{join} {view} USING (uid_hi, uid_lo)" for view in sources["tables"])
    con.execute(f"CREATE OR REPLACE TEMP VIEW selectable AS SELECT uid_hi, uid_lo, "
                f"{', '.join([star] + added)} FROM unique_ok {joins}")


def _dataset(files: list[str], columns: list[str]) -> ds.Dataset:
    """The table's files as one pyarrow dataset (read through our fsspec filesystem), its columns checked."""
    fs, _ = storage.filesystem(files[0])
    dataset = ds.dataset([storage.filesystem(f)[1] for f in files], filesystem=fs, format="parquet")
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"{files[0]} (and the other files of its table) has no column {missing}; it has "
                         f"{dataset.schema.names}")
    return dataset
