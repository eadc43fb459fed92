"""Aggregate step: DuckDB over every score file of the run (local or S3) → ``RUN/thresholds.json``.

The pool is never loaded into Python memory and never fully sorted. One DuckDB scan gives counts and min/max;
a second, streamed, gives both the histogram of the selected score (2^20 bins) and the uids' first 64 bits, which
are sorted one range at a time from temporary files to find repeated uids; the fraction threshold is then an exact
look inside the one bin that holds the cut. Repeated uids (rare) are checked on the full uid and the histogram is
recomputed without their later occurrences. DuckDB runs under a memory limit (``SIEVE_DUCKDB_MEMORY``, default 1GB)
and spills, so 100M+ rows fit a small machine. Values coming from the user are bound parameters, never SQL text;
score columns come from a fixed list.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import duckdb
import numpy as np

from sieve_tasks import storage
from sieve_tasks.buckets import RadixBuckets
from sieve_tasks.pool import pool_shards
from sieve_tasks.settings import Settings, fingerprint
from sieve_tasks.shards import Shard
from sieve_tasks.stages.base import FINGERPRINT_KEY, InconsistentRun, marker_uri, output_uri
from sieve_tasks.tables import SCORE_COLUMNS, define_selectable, import_table, plan_sources, score_column
HISTOGRAM_BINS = 1 << 20
SCAN_BATCH = 1 << 20
REPORT_BINS = 256  # the histograms kept in thresholds.json: the 2^20 scan bins summed 4096 at a time
# Bump when thresholds.json gains facts that older runs lack, so they are recomputed once.
THRESHOLDS_FORMAT = 2


def thresholds_uri(run: str) -> str:
    return storage.join(run, "thresholds.json")


def manifest_uri(run: str, name: str = "") -> str:
    return storage.join(run, "manifest", name) if name else storage.join(run, "manifest")


def withdraw_publication(run: str) -> None:
    """Remove what says the run is published (``_SUCCESS`` first) and what reports on it (summary, report), once its
    thresholds are being replaced: a rerun that fails, or is still running, must not show the last run's verdict."""
    for name in ("_SUCCESS", "summary.json", "report.html"):
        storage.remove(manifest_uri(run, name))


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
    return [output_uri(run, "scores", s.shard_id) for s in shards], markers


def scores_fingerprint(markers: list[dict[str, Any]]) -> str:
    """What the pool's scores are: thresholds and manifests name it, so they are never applied to other scores."""
    return fingerprint({"scores": [marker["fingerprint"] for marker in markers]})


def check_score_files(con: duckdb.DuckDBPyConnection, files: list[str], markers: list[dict[str, Any]]) -> None:
    """Every score file holds the data its marker describes (one parallel read of the parquet footers)."""
    found = dict(con.execute(
        "SELECT file_name, decode(value) FROM parquet_kv_metadata(?) WHERE decode(key) = ?",
        [[storage.glob_literal(f) for f in files], FINGERPRINT_KEY.decode()]).fetchall())
    for file, marker in zip(files, markers):
        written = found.get(file)
        if written != marker["fingerprint"]:
            raise InconsistentRun(f"{file} was written under fingerprint {written or 'none'} but its marker says "
                                  f"{marker['fingerprint']} (a write was interrupted): re-run the score stage")


def define_views(con: duckdb.DuckDBPyConnection, files: list[str], duplicates: str | None = None) -> None:
    """``scores`` (every row read) and ``unique_ok`` (scored rows, each uid once: first shard, first position), and
    ``selectable`` as ``unique_ok`` (:func:`sieve_tasks.tables.define_selectable` adds joined tables to it).

    ``duplicates`` is the parquet of later occurrences written by :func:`later_duplicates`.
    """
    con.read_parquet([storage.glob_literal(f) for f in files]).create_view("scores")
    if duplicates is None:
        con.execute("CREATE OR REPLACE TEMP VIEW unique_ok AS SELECT * FROM scores WHERE status = 'ok'")
    else:
        con.read_parquet(storage.glob_literal(duplicates)).create_view("later_duplicates")
        con.execute("""
            CREATE OR REPLACE TEMP VIEW unique_ok AS
            SELECT * FROM scores s WHERE status = 'ok'
            AND NOT EXISTS (SELECT 1 FROM later_duplicates d WHERE d.shard = s.shard AND d.position = s.position)
        """)
    con.execute("CREATE OR REPLACE TEMP VIEW selectable AS SELECT * FROM unique_ok")


def scan_scored(con: duckdb.DuckDBPyConnection, rows: int, selection: dict[str, Any] | None
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One streamed scan of every scored row: the first 64 bits of uids seen more than once (each a candidate
    duplicate, checked on the full uid later) and, when ``selection`` is given, the histograms of the scores it
    uses (:func:`histogram_scores`).

    The uid bits go to range-partitioned temporary files (:class:`RadixBuckets`) that are sorted two at a time,
    so memory stays bounded whatever the pool size.
    """
    columns, params, names = "uid_hi", [], []
    if selection is not None:
        for name, part in histogram_scores(selection).items():
            bin_of, bin_params = _bin_expression(part)
            columns += f", CASE WHEN {candidate_filter(selection)} THEN {bin_of} END"
            params += bin_params
            names.append(name)
    reader = con.sql(f"SELECT {columns} FROM scores WHERE status = 'ok'", params=params).to_arrow_reader(SCAN_BATCH)
    histograms = {name: np.zeros(HISTOGRAM_BINS, np.int64) for name in names}
    with RadixBuckets(np.uint64, rows) as uid_hi:
        for batch in reader:
            uid_hi.add(batch.column(0).to_numpy())
            for index, name in enumerate(names, start=1):
                histograms[name] += np.bincount(batch.column(index).drop_null().to_numpy(), minlength=HISTOGRAM_BINS)
        repeated = [np.unique(v[1:][v[1:] == v[:-1]]) for v in uid_hi.sorted_buckets(np.sort)]
    return np.concatenate(repeated), histograms


def histogram_scores(selection: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The scores a selection uses, each as a selection of its own: the selected one, and for a fused score
    its components too (``{"fused": ..., "sieve": ..., "clip": ...}``)."""
    parts = {selection["score"]: selection}
    if selection["score"] == "fused":
        parts.update({name: {**selection, "score": name} for name in sorted(selection["weights"])})
    return parts


def histograms_of(con: duckdb.DuckDBPyConnection, selection: dict[str, Any]) -> dict[str, np.ndarray]:
    """The histograms of the selection's scores over the candidates (unique rows), streamed."""
    histograms = {}
    for name, part in histogram_scores(selection).items():
        bin_of, params = _bin_expression(part)
        reader = con.sql(f"SELECT {bin_of} FROM selectable WHERE {candidate_filter(selection)}",
                         params=params).to_arrow_reader(SCAN_BATCH)
        histogram = np.zeros(HISTOGRAM_BINS, np.int64)
        for batch in reader:
            histogram += np.bincount(batch.column(0).to_numpy(), minlength=HISTOGRAM_BINS)
        histograms[name] = histogram
    return histograms


def report_histogram(part: dict[str, Any], histogram: np.ndarray) -> dict[str, Any]:
    """A scan histogram of one score (``part``: a selection of it) summed into :data:`REPORT_BINS` bins and trimmed
    to its non-empty span, for thresholds.json: ``low`` (left edge of the first bin), ``width`` and ``counts``."""
    low, high = _score_range(part)
    coarse = histogram.reshape(REPORT_BINS, -1).sum(axis=1)
    width = (high - low) / REPORT_BINS
    filled = np.flatnonzero(coarse)
    if filled.size == 0:
        return {"low": low, "width": width, "counts": []}
    first, last = int(filled[0]), int(filled[-1])
    return {"low": low + first * width, "width": width, "counts": [int(c) for c in coarse[first:last + 1]]}


def later_duplicates(con: duckdb.DuckDBPyConnection, run: str, repeated_uid_hi: np.ndarray) -> tuple[int, str | None]:
    """Later occurrences (by shard, position) of uids repeated in the pool → ``RUN/duplicates.parquet``."""
    if repeated_uid_hi.size == 0:
        return 0, None
    con.register("repeated_uid_hi", {"uid_hi": repeated_uid_hi})
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
    if score != "fused":
        return score_column(score), []
    terms, params = [], []
    for name, weight in sorted(selection["weights"].items()):
        column = score_column(name)
        low, high = selection["minmax"][column]["min"], selection["minmax"][column]["max"]
        terms.append(f"CAST(? AS DOUBLE) * CASE WHEN ? = ? THEN 0.0 ELSE ({column} - ?) / (? - ?) END")
        params += [weight, high, low, low, high, low]
    return " + ".join(terms), params


def candidate_filter(selection: dict[str, Any]) -> str:
    names = selection["weights"] if selection["score"] == "fused" else [selection["score"]]
    clauses = [f"{score_column(n)} IS NOT NULL" for n in names]
    if selection["basic_filter"]:
        clauses.append("passes_basic_filter")
    return " AND ".join(clauses)


def aggregate(run: str, settings: Settings) -> dict[str, Any]:
    """Compute counts, min/max and the keep threshold for the whole pool; skip when already done."""
    files, markers = score_files(run, pool_shards(run))
    if settings.clip_from_metadata is not None and settings.metadata is None:
        used = sorted({str(m["settings"].get("clip_from_metadata")) for m in markers})
        if used != [settings.clip_from_metadata]:  # without a table to join, the option selects nothing here
            raise ValueError(f"--clip-from-metadata {settings.clip_from_metadata} without --metadata names the CLIP "
                             f"score the score stage read, but this run's scores read {', '.join(used)} (None: CLIP "
                             "computed by the model): give --metadata to join DataComp's column, or drop the option")
    request = settings.subset("score", "weights", "fraction", "threshold", "thresholds_from", "basic_filter")
    request["format"] = THRESHOLDS_FORMAT
    reference = None
    if settings.thresholds_from is not None:
        reference = request["reference"] = storage.read_json(thresholds_uri(settings.thresholds_from))["selection"]
    names, basic_filter = _selected(reference or {**settings.subset("score", "weights", "basic_filter")})
    sources = plan_sources(run, settings, names, basic_filter)
    if sources["tables"] or settings.population != "scored":  # runs without them keep their fingerprints
        request["sources"] = {**sources, "clip_from_metadata": settings.clip_from_metadata}
    scores = scores_fingerprint(markers)
    expected = fingerprint({"request": request, "scores": scores})
    uri = thresholds_uri(run)
    if not settings.overwrite and storage.exists(uri):
        done = storage.read_json(uri)
        if done.get("fingerprint") == expected:
            return done
    # the joined tables below are rewritten before the thresholds that describe them: an aggregate that fails or is
    # killed in between must not leave earlier thresholds beside another request's join (publish would use both)
    storage.remove(uri)
    withdraw_publication(run)
    started = time.perf_counter()
    con = connect(run)
    check_score_files(con, files, markers)
    define_views(con, files)
    by_status = con.execute("""
        SELECT status, reason, count(*), min(sieve_score), max(sieve_score), min(clip_score), max(clip_score)
        FROM scores GROUP BY status, reason ORDER BY status, reason
    """).fetchall()
    scored = sum(row[2] for row in by_status if row[0] == "ok")
    failed = sum(row[2] for row in by_status if row[0] != "ok")
    ok = [row[3:] for row in by_status if row[0] == "ok"]
    minmax = _minmax(ok[0] if ok else (None,) * 4)
    selection = _base_selection(settings, minmax)
    # the duplicate check and the histograms share one scan; both assume no duplicates and no joined table, the usual
    # case
    joined = bool(sources["tables"])
    repeated, histograms = scan_scored(con, scored, None if joined else selection or reference)
    duplicates, duplicates_file = later_duplicates(con, run, repeated)
    tables, missing = {}, {}
    if joined:
        define_views(con, files, duplicates_file)
        tables = {view: import_table(con, table) for view, table in sources["tables"].items()}
        define_selectable(con, sources)
        _materialize_selectable(con, sources)
        minmax, missing = _selectable_facts(con, sources, names)
        selection = _base_selection(settings, minmax)
        histograms = histograms_of(con, selection or reference)
    elif duplicates_file is not None:  # min/max and histograms of the unique rows instead
        define_views(con, files, duplicates_file)
        minmax = _minmax(con.execute("SELECT min(sieve_score), max(sieve_score), min(clip_score), max(clip_score) "
                                     "FROM unique_ok").fetchall()[0])
        selection = _base_selection(settings, minmax)
        histograms = histograms_of(con, selection or reference)
    parts = histogram_scores(selection or reference)
    chosen = (selection or reference)["score"]
    result = {
        "fingerprint": expected,
        "scores_fingerprint": scores,
        "selection": _selection(con, settings, selection, histograms.get(chosen)),
        "counts": {"read": scored + failed, "scored": scored, "failed": failed, "duplicates": duplicates},
        "failed_by_reason": {row[1]: row[2] for row in by_status if row[0] != "ok"},
        "duplicates_file": duplicates_file,
        "pool_minmax": minmax,
        "histograms": {name: report_histogram(parts[name], h) for name, h in histograms.items()},
        "population": settings.population,
        "sources": sources,
        "tables": tables,
        "missing_scores": missing,
        "seconds": round(time.perf_counter() - started, 3),
    }
    storage.write_json_atomic(uri, result)
    return result


def use_joined_selectable(con: duckdb.DuckDBPyConnection, sources: dict[str, Any] | None) -> bool:
    """Point ``selectable`` (and ``selectable_file``) at the joined rows aggregate materialised, when the
    thresholds' sources joined tables; False when they did not (``selectable`` stays ``unique_ok``)."""
    if not (sources or {}).get("tables"):
        return False
    con.read_parquet(storage.glob_literal(sources["selectable"])).create_view("selectable_file")
    con.execute("CREATE OR REPLACE TEMP VIEW selectable AS SELECT * FROM selectable_file")
    return True


def _selected(selection: dict[str, Any]) -> tuple[list[str], bool]:
    """The score names a selection reads, and whether it applies the basic filter."""
    names = sorted(selection["weights"]) if selection["score"] == "fused" else [selection["score"]]
    return names, bool(selection["basic_filter"])


def _materialize_selectable(con: duckdb.DuckDBPyConnection, sources: dict[str, Any]) -> None:
    """Run the joins once: ``selectable`` becomes ``sources["selectable"]``, the uids and the columns the selection
    reads, which publish filters without joining again."""
    columns = ["uid_hi", "uid_lo", "shard", "position", *SCORE_COLUMNS.values(), "passes_basic_filter"]
    columns += [c for t in sources["tables"].values() for c in t["columns"].values() if c not in columns]
    with storage.LocalStaging(sources["selectable"]) as staged:
        con.execute("COPY (SELECT " + ", ".join(columns) + " FROM selectable) TO ? (FORMAT parquet)", [staged.path])
    con.read_parquet(storage.glob_literal(sources["selectable"])).create_view("selectable_file")
    con.execute("CREATE OR REPLACE TEMP VIEW selectable AS SELECT * FROM selectable_file")


def _selectable_facts(con: duckdb.DuckDBPyConnection, sources: dict[str, Any], names: list[str]
                      ) -> tuple[dict[str, Any], dict[str, int]]:
    """Min/max of every score column over ``selectable`` (the population), and per selected score the number of
    unique scored samples without it (a uid missing from its table), plus the table uids that have no scored sample."""
    columns = list(SCORE_COLUMNS.values()) + [c for t in sources["tables"].values() for c in t["columns"].values()
                                              if c.startswith("score_")]
    wanted = [score_column(n) for n in names]
    stats = [f"min({c}), max({c})" for c in columns] + ["count(shard)"]
    stats += [f"count({c}) FILTER (WHERE shard IS NOT NULL)" for c in wanted] + ["count(*) FILTER (WHERE shard IS NULL)"]
    row = con.execute("SELECT " + ", ".join(stats) + " FROM selectable").fetchall()[0]
    minmax = {c: {"min": row[2 * i], "max": row[2 * i + 1]} for i, c in enumerate(columns)}
    scored = row[2 * len(columns)]
    missing = {n: scored - row[2 * len(columns) + 1 + i] for i, n in enumerate(names)}
    if sources["population"] == "metadata":
        missing["unscored_uids"] = row[-1]
    return minmax, missing


def _minmax(values: tuple) -> dict[str, dict[str, float | None]]:
    return {"sieve_score": {"min": values[0], "max": values[1]}, "clip_score": {"min": values[2], "max": values[3]}}


def _base_selection(settings: Settings, minmax: dict[str, Any]) -> dict[str, Any] | None:
    """What is thresholded: score, weights, basic filter and the pool's min/max (None for a reference run)."""
    if settings.thresholds_from is not None:
        return None
    return {
        "score": settings.score,
        "weights": dict(sorted(settings.weights.items())) if settings.score == "fused" else None,
        "basic_filter": settings.basic_filter,
        "population": settings.population,
        "minmax": minmax,
    }


def _selection(con: duckdb.DuckDBPyConnection, settings: Settings, selection: dict[str, Any] | None,
               histogram: np.ndarray | None) -> dict[str, Any]:
    if settings.thresholds_from is not None:
        reference = storage.read_json(thresholds_uri(settings.thresholds_from))["selection"]
        return {**reference, "rule": "reference", "reference_run": settings.thresholds_from,
                "reference_rule": reference["rule"]}
    if settings.threshold is not None:
        return {**selection, "rule": "threshold", "threshold": settings.threshold}
    candidates, n, threshold = fraction_threshold(con, selection, settings.fraction, histogram)
    return {**selection, "rule": "fraction", "fraction": settings.fraction, "candidates": candidates, "n": n,
            "threshold": threshold}


def _bin_expression(selection: dict[str, Any]) -> tuple[str, list[Any]]:
    """SQL for the histogram bin of the selected score. Scores have a known range (cosines in [-1, 1], a fused
    score in [0, 1]), cut into 2^20 equal bins."""
    expression, params = score_expression(selection)
    low, high = _score_range(selection)
    return (f"least(greatest(CAST(floor((({expression}) - ?) * ?) AS BIGINT), 0), {HISTOGRAM_BINS - 1})",
            params + [low, HISTOGRAM_BINS / (high - low)])


def _score_range(selection: dict[str, Any]) -> tuple[float, float]:
    """The range a score's histogram covers: cosines [-1, 1], a fused score [0, 1], an external score its pool
    min/max (any range)."""
    score = selection["score"]
    span = (selection.get("minmax") or {}).get(score_column(score), {})
    if score not in SCORE_COLUMNS and span.get("min") is not None:
        return span["min"], max(span["max"], span["min"] + 1e-9)
    return (0.0, 1.0) if score == "fused" else (-1.0, 1.0)


def fraction_threshold(con: duckdb.DuckDBPyConnection, selection: dict[str, Any], fraction: float,
                       histogram: np.ndarray) -> tuple[int, int, float]:
    """DataComp's rule without a full sort: n = int(N·F); the threshold is element n of the descending order.

    The histogram finds the bin holding rank n; one more scan sorts only that bin.
    """
    candidates = int(histogram.sum())
    if candidates == 0:
        raise RuntimeError(f"no sample has a {selection['score']} score to threshold (all failed or filtered out)")
    n = min(int(candidates * fraction), candidates - 1)
    from_top = np.cumsum(histogram[::-1])
    index = int(np.searchsorted(from_top, n, side="right"))  # bins above hold at most n rows
    above = int(from_top[index - 1]) if index else 0
    expression, params = score_expression(selection)
    bin_of, bin_params = _bin_expression(selection)
    (threshold,) = con.execute(
        f"SELECT {expression} AS s FROM selectable WHERE {candidate_filter(selection)} AND {bin_of} = ? "
        "ORDER BY s DESC LIMIT 1 OFFSET ?",
        params + bin_params + [HISTOGRAM_BINS - 1 - index, n - above],
    ).fetchall()[0]
    return candidates, n, threshold
