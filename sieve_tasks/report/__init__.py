"""``RUN/manifest/report.html``: one self-contained page per run (score histograms with the threshold, sample
grids with thumbnails, failures with example keys, the per-shard table, the health verdict), written by
publish and by ``sieve report RUN``."""

from __future__ import annotations

from typing import Any

import duckdb

from sieve_tasks import storage
from sieve_tasks.pool import pool_shards
from sieve_tasks.report import page, plots
from sieve_tasks.report.health import histogram_mean
from sieve_tasks.report.samples import SampleGrids
from sieve_tasks.report.shards import kept_by_shard, shard_table
from sieve_tasks.shards import Shard
from sieve_tasks.stages.aggregate import connect, define_views, score_files, thresholds_uri, use_joined_selectable
from sieve_tasks.stages.base import marker_uri

EXAMPLES_PER_REASON = 5


def report_uri(run: str) -> str:
    return storage.join(run, "manifest", "report.html")


def stage_markers(run: str, shards: list[Shard], scores: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every shard's completion marker of the three per-shard stages (the score markers already read)."""
    return {"captions": [storage.read_json(marker_uri(run, "captions", s.shard_id)) for s in shards],
            "embeddings": [storage.read_json(marker_uri(run, "embeddings", s.shard_id)) for s in shards],
            "scores": scores}


class RunReport:
    """Renders one published run. ``con`` has the run's ``scores``, ``unique_ok`` and ``selectable`` views (publish's own)."""

    def __init__(self, run: str, con: duckdb.DuckDBPyConnection, summary: dict[str, Any],
                 thresholds: dict[str, Any], shard_rows: list[dict[str, Any]]):
        self.run, self.con, self.summary, self.thresholds, self.shard_rows = run, con, summary, thresholds, shard_rows

    @classmethod
    def load(cls, run: str) -> "RunReport":
        """Everything from the run directory (``sieve report RUN``); the run must be published."""
        summary_file = storage.join(run, "manifest", "summary.json")
        if not storage.exists(summary_file):
            raise FileNotFoundError(f"{summary_file} is missing: publish the run first (sieve publish {run})")
        summary, thresholds = storage.read_json(summary_file), storage.read_json(thresholds_uri(run))
        shards = pool_shards(run)
        files, scores = score_files(run, shards)
        con = connect(run)
        define_views(con, files, thresholds["duplicates_file"])
        use_joined_selectable(con, thresholds.get("sources"))  # as publish has it
        return cls(run, con, summary, thresholds, shard_table(stage_markers(run, shards, scores),
                                                               kept_by_shard(con, run)))

    def write(self) -> tuple[str, int]:
        """Write the page; returns its URI and size in bytes."""
        data = self.render().encode("utf-8")
        uri = report_uri(self.run)
        storage.write_bytes_atomic(uri, data)
        return uri, len(data)

    def render(self) -> str:
        summary, selection = self.summary, self.thresholds["selection"]
        histograms = self.thresholds.get("histograms") or {}
        score_mean = histogram_mean(histograms.get(selection["score"]))
        drawn = [(name, plots.histogram_png(name, h, selection["threshold"] if name == selection["score"] else None))
                 for name, h in sorted(histograms.items(), key=lambda kv: kv[0] != selection["score"]) if h["counts"]]
        grids = SampleGrids(self.con, self.run, pool_shards(self.run), selection,
                            histograms.get(selection["score"])).grids()
        body = [f"<h1>SIEVE run <code>{page.e(self.run)}</code></h1>"]
        if summary.get("warning"):
            body.append(f"<div class='warn'>{page.e(summary['warning'])}</div>")
        body += ["<h2>Health</h2>", page.verdict_section(summary.get("health")),
                 "<h2>Counts and selection</h2>", page.counts_section(summary, score_mean),
                 "<h2>Score histograms</h2>", page.histograms_section(drawn),
                 "<h2>Samples</h2>", page.grids_section(grids),
                 "<h2>Failures by reason</h2>", page.failures_section(self._failure_examples(),
                                                                      summary.get("failed_by_reason") or {}),
                 "<h2>Shards</h2>", page.shards_section(self.shard_rows),
                 page.details_section(summary)]
        return page.page(f"SIEVE report {self.run}", "".join(body))

    def _failure_examples(self) -> dict[str, list[str]]:
        rows = self.con.execute("""
            SELECT reason, shard, key FROM (
                SELECT reason, shard, key, row_number() OVER (PARTITION BY reason ORDER BY shard, position) AS r
                FROM scores WHERE status <> 'ok') WHERE r <= ? ORDER BY reason, r
        """, [EXAMPLES_PER_REASON]).fetchall()
        examples: dict[str, list[str]] = {}
        for reason, shard, key in rows:
            examples.setdefault(reason, []).append(f"{shard}/{key}")
        return examples
