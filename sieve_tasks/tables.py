"""Per-uid tables joined to the pool by uid in DuckDB: DataComp's ``metadata/`` (``--metadata``) and published score
tables (``--external-score NAME=URI:COLUMN``).

A uid is matched on its two 64-bit halves parsed from the hex text, so upper- and lower-case spellings are one uid
(outputs write lower case). Tables are read from an explicit list of parquet files and streamed, never loaded into
Python. A uid listed twice in one table is refused: which of its rows would count is ambiguous.

``selectable`` is the view the selection reads: the unique scored samples with the joined columns (population
``scored``), or the union of them and every uid of the joined tables (population ``metadata``: DataComp's N, where a
uid whose download or decode failed still counts and can be kept).
"""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from sieve_tasks import storage
from sieve_tasks.settings import METADATA_CLIP_COLUMNS, Settings, split_external_spec
from sieve_tasks.stages.score import basic_filter_features

SCORE_COLUMNS = {"sieve": "sieve_score", "clip": "clip_score"}
UID_HALVES = ("try_cast('0x' || substr(uid, 1, 16) AS UBIGINT) AS uid_hi",
              "try_cast('0x' || substr(uid, 17, 16) AS UBIGINT) AS uid_lo")
VALID_UID = "length(uid) = 32 AND uid_hi IS NOT NULL AND uid_lo IS NOT NULL"
BASIC_FILTER_COLUMNS = ["uid", "text", "original_width", "original_height"]
SCAN_BATCH = 1 << 18


def score_column(name: str) -> str:
    """The column of score ``name`` in ``selectable`` (external names are validated identifiers)."""
    return SCORE_COLUMNS.get(name, f"score_{name}")


def basic_filter_uri(run: str) -> str:
    return storage.join(run, "metadata_basic_filter.parquet")


def plan_sources(run: str, settings: Settings, names: list[str], basic_filter: bool) -> dict[str, Any]:
    """What to join for the scores ``names`` (and the basic filter), as JSON: publish rebuilds the same views from it."""
    tables: dict[str, dict[str, Any]] = {}
    if settings.metadata_clip and "clip" in names:
        tables["metadata"] = {"uri": settings.metadata, "files": parquet_files(settings.metadata),
                              "columns": {METADATA_CLIP_COLUMNS[settings.clip_from_metadata]: "clip_score"}}
    if settings.metadata is not None and basic_filter:
        tables["metadata_basic_filter"] = {"uri": basic_filter_uri(run), "files": [basic_filter_uri(run)],
                                           "columns": {"passes_basic_filter": "passes_basic_filter"},
                                           "uid_halves": True, "from": settings.metadata}
    for name in names:
        if name in settings.external_scores:
            uri, column = split_external_spec(name, settings.external_scores[name])
            tables[f"external_{name}"] = {"uri": uri, "files": parquet_files(uri), "columns": {column: score_column(name)}}
    unknown = [n for n in names if n not in SCORE_COLUMNS and f"external_{n}" not in tables]
    if unknown:
        raise ValueError(f"the selection uses the scores {unknown}: give them with --external-score NAME=URI:COLUMN")
    return {"population": settings.population, "tables": tables}


def check_sources(settings: Settings) -> None:
    """Fail before any GPU time when ``--metadata`` or an ``--external-score`` table has no parquet file."""
    for uri in [settings.metadata] if settings.metadata else []:
        parquet_files(uri)
    for name, spec in settings.external_scores.items():
        parquet_files(split_external_spec(name, spec)[0])


def parquet_files(uri: str) -> list[str]:
    """The parquet files of a table given as one file, a dir/prefix or a glob (sorted, explicit)."""
    files = [uri] if uri.endswith(".parquet") and not any(c in uri for c in "*?[") else storage.list_files(uri, ".parquet")
    if not files:
        raise FileNotFoundError(f"no .parquet files in {uri}")
    return files


def write_metadata_basic_filter(con: duckdb.DuckDBPyConnection, metadata: str, uri: str) -> int:
    """DataComp's basic filter on the metadata's ``text``, ``original_width``, ``original_height`` for every uid
    → ``uri`` (uid_hi, uid_lo, passes_basic_filter), streamed. One language detection per row: the slow part."""
    files = parquet_files(metadata)
    relation = _read_table(con, files, BASIC_FILTER_COLUMNS, {})
    reader = relation.select(*map(duckdb.SQLExpression, UID_HALVES), "text", "original_width", "original_height"
                             ).to_arrow_reader(SCAN_BATCH)
    schema = pa.schema([("uid_hi", pa.uint64()), ("uid_lo", pa.uint64()), ("passes_basic_filter", pa.bool_())])
    rows = 0
    with storage.LocalStaging(uri) as staged, pq.ParquetWriter(staged.path, schema, compression="zstd") as writer:
        for batch in reader:
            verdicts = [_passes(t, w, h) for t, w, h in zip(batch.column(2).to_pylist(), batch.column(3).to_pylist(),
                                                            batch.column(4).to_pylist())]
            writer.write_table(pa.table([batch.column(0), batch.column(1), pa.array(verdicts, pa.bool_())],
                                        schema=schema))
            rows += batch.num_rows
    return rows


def _passes(text: str | None, width: int | None, height: int | None) -> bool:
    if not isinstance(text, str) or not width or not height:
        return False
    return basic_filter_features(text, int(width), int(height))["passes_basic_filter"]


def define_selectable(con: duckdb.DuckDBPyConnection, sources: dict[str, Any]) -> dict[str, dict[str, int]]:
    """The ``selectable`` view over ``unique_ok`` and the joined tables; returns each table's row facts."""
    facts = {}
    for view, table in sources["tables"].items():
        facts[view] = _register(con, view, table)
    if not sources["tables"]:
        con.execute("CREATE OR REPLACE TEMP VIEW selectable AS SELECT * FROM unique_ok")
        return facts
    own = set(con.sql("SELECT * FROM unique_ok LIMIT 0").columns)
    replaced, added = [], []
    for view, table in sources["tables"].items():
        for column in table["columns"].values():
            (replaced if column in own else added).append(f"{view}.{column}" + (f" AS {column}" if column in own else ""))
    star = "unique_ok.* EXCLUDE (uid_hi, uid_lo)"
    if replaced:
        star += f" REPLACE ({', '.join(replaced)})"
    join = "LEFT JOIN" if sources["population"] == "scored" else "FULL JOIN"
    joins = " ".join(f"{join} {view} USING (uid_hi, uid_lo)" for view in sources["tables"])
    con.execute(f"CREATE OR REPLACE TEMP VIEW selectable AS SELECT uid_hi, uid_lo, "
                f"{', '.join([star] + added)} FROM unique_ok {joins}")
    return facts


def _register(con: duckdb.DuckDBPyConnection, view: str, table: dict[str, Any]) -> dict[str, int]:
    """A view (uid_hi, uid_lo, renamed columns) of one table; counts its rows and invalid uids, refuses repeats."""
    keyed = table.get("uid_halves", False)  # a table we wrote, keyed by the halves already
    relation = _read_table(con, table["files"], ["uid_hi", "uid_lo"] if keyed else ["uid"], table["columns"])
    keys = [duckdb.ColumnExpression("uid_hi"), duckdb.ColumnExpression("uid_lo")] if keyed \
        else [*map(duckdb.SQLExpression, UID_HALVES), duckdb.ColumnExpression("uid")]
    columns = [duckdb.ColumnExpression(source).alias(target) for source, target in table["columns"].items()]
    relation.select(*keys, *columns).create_view(f"{view}_raw")
    valid = "uid_hi IS NOT NULL AND uid_lo IS NOT NULL" if keyed else VALID_UID
    (rows, invalid) = con.execute(f"SELECT count(*), count(*) FILTER (WHERE NOT ({valid})) FROM {view}_raw").fetchall()[0]
    con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT uid_hi, uid_lo, "
                f"{', '.join(table['columns'].values())} FROM {view}_raw WHERE {valid}")
    repeated = con.execute(f"SELECT uid_hi, uid_lo, count(*) FROM {view} GROUP BY uid_hi, uid_lo "
                           "HAVING count(*) > 1 LIMIT 1").fetchall()
    if repeated:
        hi, lo, count = repeated[0]
        raise ValueError(f"{table['uri']}: uid {hi:016x}{lo:016x} is listed {count} times (a per-uid table needs "
                         "each uid once)")
    return {"rows": rows, "invalid_uids": invalid}


def _read_table(con: duckdb.DuckDBPyConnection, files: list[str], keys: list[str], columns: dict[str, str]
                ) -> duckdb.DuckDBPyRelation:
    relation = con.read_parquet(files)
    missing = [c for c in [*keys, *columns] if c not in relation.columns]
    if missing:
        raise ValueError(f"{files[0]} (and the other files of its table) has no column {missing}; it has "
                         f"{relation.columns}")
    return relation
