"""sieve_refilter over two days: a day with shards succeeds with the reference threshold, an empty day skips."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.dags.dagrun_helpers import run_dag, states, xcoms

pytestmark = pytest.mark.slow

DAY_WITH_SHARDS = datetime(2026, 3, 1, tzinfo=timezone.utc)
EMPTY_DAY = datetime(2026, 3, 2, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> Path:
    """<base>/crawl/2026-03-01/ holds the demo pool; 2026-03-02 has a directory but no shards."""
    from sieve_tasks.sample_pool import make_sample_pool

    base = tmp_path_factory.mktemp("crawl-base")
    make_sample_pool(str(base / "crawl" / "2026-03-01"))
    (base / "crawl" / "2026-03-02").mkdir(parents=True)
    (base / "crawl" / "2026-03-02" / "README.txt").write_text("no shards today\n")
    return base


@pytest.fixture(scope="module")
def reference_run(crawl, tmp_path_factory) -> Path:
    """A reference run that keeps 50 % of the same pool: the daily refilter reuses its threshold."""
    from sieve_tasks.runner import run_all
    from sieve_tasks.settings import Settings

    run = tmp_path_factory.mktemp("reference") / "run"
    run_all(str(crawl / "crawl" / "2026-03-01"), str(run), Settings(profile="test", fraction=0.5), progress=False)
    return run


def test_backfill_two_days_one_success_one_skip(airflow_db, crawl, reference_run, monkeypatch):
    # the defaults a deployment sets once: crawl base and reference run as Variables (environment backend here)
    monkeypatch.setenv("AIRFLOW_VAR_SIEVE_CRAWL_BASE", str(crawl))
    monkeypatch.setenv("AIRFLOW_VAR_SIEVE_REFERENCE_RUN", str(reference_run))
    conf = {"profile": "test"}
    results = {day: run_dag("sieve_refilter", conf, logical_date=day) for day in (DAY_WITH_SHARDS, EMPTY_DAY)}

    full, empty = results[DAY_WITH_SHARDS], results[EMPTY_DAY]
    assert full.state == "success", states(full)
    assert set(states(full).values()) <= {"success", "skipped"}
    assert states(full)[("publish", -1)] == "success"

    empty_states = states(empty)
    assert empty.state == "success"  # a skipped day is not a failure
    assert empty_states[("list_shards", -1)] == "skipped"
    assert set(empty_states.values()) == {"skipped"}, empty_states

    runs = Path(os.environ["SIEVE_RUN_BASE"]) / "refilter"
    day_run = runs / "2026-03-01"
    assert (day_run / "manifest" / "_SUCCESS").exists()
    assert not (runs / "2026-03-02").exists()
    summary = json.loads((day_run / "manifest" / "summary.json").read_text())
    reference = json.loads((reference_run / "thresholds.json").read_text())["selection"]
    assert summary["thresholds"]["rule"] == "reference"
    assert summary["thresholds"]["reference_run"] == str(reference_run)
    assert summary["thresholds"]["threshold"] == reference["threshold"]
    # same pool, same models, same threshold: the same kept set as the reference
    assert (day_run / "manifest" / "subset.npy").read_bytes() == \
        (reference_run / "manifest" / "subset.npy").read_bytes()


def test_without_a_reference_the_day_fails_clearly(airflow_db, crawl, monkeypatch):
    monkeypatch.setenv("AIRFLOW_VAR_SIEVE_CRAWL_BASE", str(crawl))
    monkeypatch.delenv("AIRFLOW_VAR_SIEVE_REFERENCE_RUN", raising=False)
    dagrun = run_dag("sieve_refilter", {"profile": "test"}, logical_date=datetime(2026, 3, 3, tzinfo=timezone.utc))
    assert dagrun.state == "failed"
    assert states(dagrun)[("list_shards", -1)] == "failed"


def test_input_template_and_explicit_fraction(airflow_db, crawl, tmp_path, monkeypatch):
    """Params override the Variables: another base and template, and a within-day fraction."""
    day_dir = tmp_path / "drops" / "20260304"
    from sieve_tasks.sample_pool import make_sample_pool

    make_sample_pool(str(day_dir), shards=1, with_bad_sample=False)
    monkeypatch.delenv("AIRFLOW_VAR_SIEVE_REFERENCE_RUN", raising=False)
    dagrun = run_dag("sieve_refilter", {"profile": "test", "crawl_base": str(tmp_path), "fraction": 0.25,
                                        "input_template": "{base}/drops/{ds_nodash}"},
                     logical_date=datetime(2026, 3, 4, tzinfo=timezone.utc))
    assert dagrun.state == "success", states(dagrun)
    summary = json.loads((Path(os.environ["SIEVE_RUN_BASE"]) / "refilter" / "2026-03-04" / "manifest"
                          / "summary.json").read_text())
    assert summary["thresholds"]["rule"] == "fraction" and summary["counts"]["read"] == 16


def test_two_days_with_the_caption_cache(airflow_db, tmp_path, monkeypatch):
    """The Variable sieve_caption_cache is used by default; day 2 repeats day 1's photos under new keys, uids and
    alt-texts, and its summary shows them as cache hits; the cache is compacted after each day."""
    from sieve_tasks import cache_admin
    from tests.shardmaker import write_photo_day

    write_photo_day(tmp_path / "crawl" / "2026-04-01", "1", list(range(8)))
    write_photo_day(tmp_path / "crawl" / "2026-04-02", "2", [0, 1, 2, 3, 4, 10, 11, 12])
    cache = tmp_path / "cache"
    monkeypatch.setenv("AIRFLOW_VAR_SIEVE_CRAWL_BASE", str(tmp_path))
    monkeypatch.setenv("AIRFLOW_VAR_SIEVE_CAPTION_CACHE", str(cache))
    summaries = []
    for day in (datetime(2026, 4, 1, tzinfo=timezone.utc), datetime(2026, 4, 2, tzinfo=timezone.utc)):
        dagrun = run_dag("sieve_refilter", {"profile": "test", "fraction": 0.5}, logical_date=day)
        assert dagrun.state == "success", states(dagrun)
        assert states(dagrun)[("compact_caption_cache", -1)] == "success"
        summaries.append(json.loads((Path(os.environ["SIEVE_RUN_BASE"]) / "refilter" / day.strftime("%Y-%m-%d")
                                     / "manifest" / "summary.json").read_text()))
    first, second = (s["captioning"]["cache"] for s in summaries)
    assert (first["hits"], first["misses"], first["written"]) == (0, 8, 8)
    assert (second["hits"], second["misses"], second["written"]) == (5, 3, 3)
    assert second["seconds_saved"] > 0
    (reported,) = xcoms(dagrun, "compact_caption_cache")  # day 2's compaction reports size and hit rate
    assert reported["fingerprints"][0]["hit_rate"] == 5 / 16 and reported["compaction"]["hit_logs_folded"] == 2
    (stats,) = cache_admin.stats(str(cache))["fingerprints"]
    assert stats["pending_hit_logs"] == 0 and stats["entries"] == 11 and stats["hits"] == 5
    assert stats["files"] <= 16  # one per partition after compaction
