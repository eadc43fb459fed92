"""Threshold rules and fusion against DataComp's own method, on score files with ties and duplicates."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sieve_tasks import storage
from sieve_tasks.settings import Settings
from sieve_tasks.stages.aggregate import aggregate
from sieve_tasks.stages.base import FINGERPRINT_KEY, marker_uri
from sieve_tasks.stages.publish import publish
from sieve_tasks.stages.score import SCORES_SCHEMA


def write_scored_run(run, shards: dict[str, list[dict]]) -> None:
    """A run directory whose score stage is complete, with the given rows per shard."""
    storage.write_json_atomic(f"{run}/shards.json", {"input": "fixture", "shards": {s: f"/in/{s}.tar" for s in shards}})
    for shard, rows in shards.items():
        full = []
        for position, row in enumerate(rows):
            base = {name: None for name in SCORES_SCHEMA.names}
            base.update(shard=shard, position=position, key=f"{shard}-{position}", status="ok",
                        passes_basic_filter=True)
            base.update(row)
            if base["uid"] is not None:
                base.update(uid_hi=int(base["uid"][:16], 16), uid_lo=int(base["uid"][16:], 16))
            full.append(base)
        (run / "scores").mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(full, schema=SCORES_SCHEMA)
        pq.write_table(table.replace_schema_metadata({FINGERPRINT_KEY: f"fixture-{shard}"}),
                       run / "scores" / f"{shard}.parquet")
        for stage in ("captions", "embeddings", "scores"):
            storage.write_json_atomic(marker_uri(str(run), stage, shard), {
                "stage": stage, "shard": shard, "fingerprint": f"fixture-{shard}", "seconds": 1.0,
                "rows": len(full), "ok": sum(r["status"] == "ok" for r in full),
                "failed": sum(r["status"] != "ok" for r in full),
                "settings": {"captioner": "fixture", "captions": None, "text_encoder": "fixture", "clip": "fixture",
                             "clip_from_metadata": None}})


def uid(i: int) -> str:
    return f"{i:032x}"


def datacomp_threshold(values: np.ndarray, fraction: float) -> float:
    n = int(len(values) * fraction)
    return -np.sort(-values)[n]


@pytest.fixture
def tied_pool(tmp_path):
    rng = np.random.default_rng(7)
    sieve = np.round(rng.uniform(0.0, 1.0, 200), 1)  # only 11 distinct values: many ties
    clip = np.round(rng.uniform(0.1, 0.4, 200), 2)
    rows = [{"uid": uid(i), "sieve_score": float(s), "clip_score": float(c)} for i, (s, c) in enumerate(zip(sieve, clip))]
    run = tmp_path / "run"
    write_scored_run(run, {"00000000": rows[:120], "00000001": rows[120:]})
    return run, sieve, clip


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3, 0.5, 1.0])
def test_fraction_rule_matches_datacomp_with_ties(tied_pool, fraction):
    run, sieve, _ = tied_pool
    result = aggregate(str(run), Settings(fraction=fraction, clip="none"))
    expected = datacomp_threshold(sieve, fraction) if fraction < 1.0 else sieve.min()
    assert result["selection"]["threshold"] == pytest.approx(expected)
    publish(str(run))
    kept = pq.read_table(run / "manifest" / "kept.parquet").column("uid").to_pylist()
    assert kept == sorted(uid(i) for i in np.flatnonzero(sieve >= expected))


def test_fused_score_matches_datacomp(tied_pool):
    run, sieve, clip = tied_pool
    weights = {"sieve": 0.3, "clip": 0.7}
    aggregate(str(run), Settings(score="fused", weights=weights, fraction=0.25, clip="test:tiny-clip"))
    normalised = {k: (v - v.min()) / (v.max() - v.min()) for k, v in (("sieve", sieve), ("clip", clip))}
    fused = weights["sieve"] * normalised["sieve"] + weights["clip"] * normalised["clip"]
    threshold = datacomp_threshold(fused, 0.25)
    summary = publish(str(run))
    assert summary["thresholds"]["threshold"] == pytest.approx(threshold, abs=1e-12)
    kept = pq.read_table(run / "manifest" / "kept.parquet")
    assert kept.column("uid").to_pylist() == sorted(uid(i) for i in np.flatnonzero(fused >= threshold - 1e-12))


def test_weights_must_sum_to_one():
    with pytest.raises(ValueError, match="must sum to 1.0"):
        Settings(score="fused", weights={"sieve": 0.5, "clip": 0.6})


def test_duplicates_kept_once_from_first_shard_and_position(tmp_path):
    run = tmp_path / "run"
    write_scored_run(run, {
        "00000000": [{"uid": uid(1), "sieve_score": 0.1}, {"uid": uid(2), "sieve_score": 0.9},
                     {"uid": uid(2), "sieve_score": 0.2}],
        "00000001": [{"uid": uid(1), "sieve_score": 0.95}, {"uid": uid(3), "sieve_score": 0.5},
                     {"uid": None, "status": "failed", "reason": "missing_uid"}],
    })
    result = aggregate(str(run), Settings(threshold=0.3, clip="none"))
    assert result["counts"] == {"read": 6, "scored": 5, "failed": 1, "duplicates": 2}
    summary = publish(str(run))
    kept = pq.read_table(run / "manifest" / "kept.parquet").to_pylist()
    # uid 1 counts with its first occurrence (0.1), not the later 0.95; uid 2 with 0.9
    assert [(r["uid"], r["shard"], r["key"]) for r in kept] == [(uid(2), "00000000", "00000000-1"),
                                                                 (uid(3), "00000001", "00000001-1")]
    assert summary["counts"]["kept"] == 2 and summary["failed_by_reason"] == {"missing_uid": 1}


def test_thresholds_from_a_reference_run(tied_pool, tmp_path):
    reference, sieve, _ = tied_pool
    aggregate(str(reference), Settings(fraction=0.2, clip="none"))
    bar = json.loads((reference / "thresholds.json").read_text())["selection"]["threshold"]
    fresh = tmp_path / "fresh"
    write_scored_run(fresh, {"00000005": [{"uid": uid(900 + i), "sieve_score": s} for i, s in enumerate([0.1, bar, 0.99])]})
    result = aggregate(str(fresh), Settings(thresholds_from=str(reference), clip="none"))
    assert result["selection"]["rule"] == "reference" and result["selection"]["threshold"] == bar
    kept = pq.read_table(publish(str(fresh))["manifest"]["kept.parquet"]).column("uid").to_pylist()
    assert kept == [uid(901), uid(902)]


def test_basic_filter_restricts_candidates(tmp_path):
    run = tmp_path / "run"
    write_scored_run(run, {"00000000": [{"uid": uid(i), "sieve_score": i / 10, "passes_basic_filter": i % 2 == 0}
                                        for i in range(10)]})
    aggregate(str(run), Settings(threshold=0.0, basic_filter=True, clip="none"))
    kept = pq.read_table(publish(str(run))["manifest"]["kept.parquet"]).column("uid").to_pylist()
    assert kept == [uid(i) for i in range(0, 10, 2)]


def test_missing_scores_stop_aggregation_with_the_shard_named(tmp_path):
    run = tmp_path / "run"
    write_scored_run(run, {"00000000": [{"uid": uid(1), "sieve_score": 0.5}]})
    storage.write_json_atomic(f"{run}/shards.json", {"input": "x", "shards": {"00000000": "a", "00000009": "b"}})
    with pytest.raises(RuntimeError, match="00000009"):
        aggregate(str(run), Settings(clip="none"))


def test_injection_strings_are_data_not_sql(tmp_path):
    evil = tmp_path / "run'; DROP TABLE scores; --"
    write_scored_run(evil, {"00000000": [{"uid": uid(i), "sieve_score": i / 10} for i in range(10)]})
    assert aggregate(str(evil), Settings(fraction=0.5, clip="none"))["counts"]["read"] == 10
    assert publish(str(evil))["counts"]["kept"] == 6  # n = 5, threshold 0.4, keep >=
    with pytest.raises(ValueError, match="unknown score"):
        Settings(score="sieve_score); DROP TABLE scores; --")


def test_duplicates_found_across_partitions(tmp_path, monkeypatch):
    from sieve_tasks import buckets

    monkeypatch.setattr(buckets, "BUCKET_ROWS", 3)  # 10 scored rows -> 4 range files of uid_hi
    bits = _spy_bucket_bits(monkeypatch)
    ids = [1, 2, 3, 2**127 + 5, 2**126 + 9, 7]
    rows = [{"uid": f"{i:032x}", "sieve_score": 0.5} for i in ids]
    run = tmp_path / "run"
    write_scored_run(run, {"00000000": rows, "00000001": rows[3:] + [{"uid": f"{2**127 + 5:032x}", "sieve_score": 0.1}]})
    result = aggregate(str(run), Settings(threshold=0.0, clip="none"))
    assert result["counts"]["duplicates"] == 4  # three repeated in shard 1, one twice more
    assert bits == [2]
    manifest = publish(str(run))["manifest"]
    kept = pq.read_table(manifest["kept.parquet"]).column("uid").to_pylist()
    assert kept == [f"{i:032x}" for i in ids]  # pool order: shard, then position


def test_subset_is_sorted_across_uid_buckets_and_ties_on_the_first_half(tmp_path, monkeypatch):
    from sieve_tasks import buckets

    monkeypatch.setattr(buckets, "BUCKET_ROWS", 2)  # 40 rows -> 32 bucket files
    bits = _spy_bucket_bits(monkeypatch)
    rng = np.random.default_rng(0)
    ids = [int(x) << 64 | int(y) for x, y in zip(rng.integers(0, 2**63, 36, dtype=np.uint64) * 2,
                                                 rng.integers(0, 2**63, 36, dtype=np.uint64))]
    ids += [(ids[0] >> 64 << 64) | 3, (ids[0] >> 64 << 64) | 1, 5, 2**128 - 1]  # equal first halves, extremes
    run = tmp_path / "run"
    write_scored_run(run, {f"{s:08d}": [{"uid": f"{i:032x}", "sieve_score": 0.5} for i in ids[s::3]] for s in range(3)})
    aggregate(str(run), Settings(threshold=0.0, clip="none"))
    subset = np.load(publish(str(run))["manifest"]["subset.npy"])
    assert subset.dtype == np.dtype("u8,u8") and len(subset) == 40
    assert [int(a) << 64 | int(b) for a, b in subset.tolist()] == sorted(ids)
    assert bits == [5, 5]  # aggregate's uid check and publish's sort both split into 32 files


def _spy_bucket_bits(monkeypatch) -> list[int]:
    """The number of top bits (log2 of the file count) of every RadixBuckets opened."""
    from sieve_tasks.buckets import RadixBuckets

    seen: list[int] = []
    enter = RadixBuckets.__enter__

    def spy(self):
        seen.append(self.bits)
        return enter(self)

    monkeypatch.setattr(RadixBuckets, "__enter__", spy)
    return seen


def test_fraction_rule_ignores_later_duplicates(tmp_path):
    """The histogram scan assumes unique uids; with repeats it is redone on the first occurrences only."""
    first = [{"uid": uid(i), "sieve_score": i / 20} for i in range(10)]
    later = [{"uid": uid(i), "sieve_score": 0.99} for i in range(3)]  # would dominate the top if counted
    run = tmp_path / "run"
    write_scored_run(run, {"00000000": first, "00000001": later})
    result = aggregate(str(run), Settings(fraction=0.3, clip="none"))
    values = sorted((r["sieve_score"] for r in first), reverse=True)
    assert result["counts"]["duplicates"] == 3
    assert result["selection"]["candidates"] == 10 and result["selection"]["n"] == 3
    assert result["selection"]["threshold"] == pytest.approx(values[3])
    kept = pq.read_table(publish(str(run))["manifest"]["kept.parquet"]).column("uid").to_pylist()
    assert kept == [uid(i) for i in range(6, 10)]


def test_thresholds_keep_the_scan_histograms_of_every_score_used(tied_pool):
    run, sieve, clip = tied_pool
    result = aggregate(str(run), Settings(score="fused", weights={"sieve": 0.5, "clip": 0.5}, fraction=0.2,
                                          clip="test:tiny-clip"))
    histograms = json.loads((run / "thresholds.json").read_text())["histograms"]
    assert histograms == result["histograms"] and set(histograms) == {"fused", "sieve", "clip"}
    for name, values in (("sieve", sieve), ("clip", clip)):
        h = histograms[name]
        assert h["width"] == pytest.approx(2 / 256)
        fine = np.minimum(np.floor((values + 1.0) * (1 << 19)).astype(int), (1 << 20) - 1)  # the scan's bins
        coarse = np.bincount(fine // 4096)
        first = int(np.flatnonzero(coarse)[0])
        assert h["low"] == pytest.approx(-1 + first * h["width"]) and h["counts"] == coarse[first:].tolist()
    assert sum(histograms["fused"]["counts"]) == 200 and histograms["fused"]["counts"][0] > 0

    by_threshold = aggregate(str(run), Settings(threshold=0.5, clip="none", overwrite=True))
    assert set(by_threshold["histograms"]) == {"sieve"} and sum(by_threshold["histograms"]["sieve"]["counts"]) == 200


def test_a_failed_aggregate_leaves_no_thresholds_beside_its_join(tmp_path):
    """Aggregate rewrites the joined table before its thresholds: one that fails in between (here a table of another
    pool's uids: nothing to threshold) must not leave the last thresholds, which publish would pair with the new join
    — nor may the first request, asked again, find its thresholds and skip rewriting its join."""
    run = tmp_path / "run"
    write_scored_run(run, {"00000000": [{"uid": uid(i), "sieve_score": 0.1} for i in range(10)]})
    ours, theirs = tmp_path / "ours.parquet", tmp_path / "theirs.parquet"
    pq.write_table(pa.table({"uid": [uid(i) for i in range(10)], "s": [float(i) for i in range(10)]}), ours)
    pq.write_table(pa.table({"uid": [uid(100 + i) for i in range(10)], "s": [1.0] * 10}), theirs)
    settings = Settings(external_scores={"ext": f"{ours}:s"}, score="ext", fraction=0.3, clip="none")
    aggregate(str(run), settings)
    kept = publish(str(run))["counts"]["kept"]
    assert kept == 4  # DataComp's rule: scores at least the one at index int(10 × 0.3)
    with pytest.raises(RuntimeError, match="no sample has a ext score"):
        aggregate(str(run), Settings(external_scores={"ext": f"{theirs}:s"}, score="ext", fraction=0.3, clip="none"))
    with pytest.raises(FileNotFoundError):
        publish(str(run))
    aggregate(str(run), settings)
    assert publish(str(run))["counts"]["kept"] == kept
    kept_uids = pq.read_table(run / "manifest" / "kept.parquet", columns=["uid"]).column("uid").to_pylist()
    assert sorted(kept_uids) == [uid(i) for i in (6, 7, 8, 9)]


def test_clip_from_metadata_without_a_table_must_name_what_the_scores_used(tied_pool):
    """Without --metadata, aggregate has no column to join: asking for DataComp's L/14 CLIP over scores that hold the
    model's own CLIP would silently threshold the latter."""
    run, _, _ = tied_pool
    with pytest.raises(ValueError, match="this run's scores read None"):
        aggregate(str(run), Settings(clip_from_metadata="l14", score="clip"))
    for marker_file in (run / "scores" / "_done").glob("*.json"):
        marker = json.loads(marker_file.read_text())
        marker["settings"]["clip_from_metadata"] = "l14"
        marker_file.write_text(json.dumps(marker))
    aggregate(str(run), Settings(clip_from_metadata="l14", score="clip"))


def test_a_table_replaced_at_the_same_path_is_joined_again(tmp_path):
    """The thresholds' request records each table file's identity: new scores at the same path are not skipped as
    'already computed' (a rerun of the same command would publish the old kept set)."""
    import os

    run = tmp_path / "run"
    write_scored_run(run, {"00000000": [{"uid": uid(i), "sieve_score": 0.1} for i in range(10)]})
    table = tmp_path / "ext.parquet"
    settings = Settings(external_scores={"ext": f"{table}:s"}, score="ext", fraction=0.3, clip="none")
    kept = {}
    for version, scores in (("v1", range(10)), ("v2", range(10, 0, -1))):
        pq.write_table(pa.table({"uid": [uid(i) for i in range(10)], "s": [float(s) for s in scores]}), table)
        os.utime(table, ns=(0, (1 if version == "v1" else 2) * 10**18))
        aggregate(str(run), settings)
        publish(str(run))
        kept[version] = sorted(pq.read_table(run / "manifest" / "kept.parquet", columns=["uid"])["uid"].to_pylist())
    assert kept == {"v1": [uid(i) for i in (6, 7, 8, 9)], "v2": [uid(i) for i in (0, 1, 2, 3)]}


def test_new_thresholds_withdraw_the_last_publication(tied_pool):
    """Once aggregate replaces the thresholds, the last publish's _SUCCESS, summary and report go (the UI would show
    them for a rerun that failed or is still running); an aggregate that finds its thresholds done leaves them."""
    run, _, _ = tied_pool
    aggregate(str(run), Settings(fraction=0.2))
    publish(str(run))
    published = {name: run / "manifest" / name for name in ("_SUCCESS", "summary.json", "report.html")}
    aggregate(str(run), Settings(fraction=0.2))
    assert all(path.exists() for path in published.values())
    aggregate(str(run), Settings(fraction=0.5))
    assert not any(path.exists() for path in published.values())
    assert publish(str(run))["counts"]["kept"] >= 100 and all(path.exists() for path in published.values())  # ties


def test_the_report_of_a_run_with_a_joined_table_is_written_again_the_same(tmp_path):
    """`sieve report RUN` reads the joined rows as publish did (it failed on an external score's column)."""
    from sieve_tasks.report import RunReport

    run = tmp_path / "run"
    write_scored_run(run, {"00000000": [{"uid": uid(i), "sieve_score": 0.1} for i in range(10)]})
    table = tmp_path / "ext.parquet"
    pq.write_table(pa.table({"uid": [uid(i) for i in range(10)], "s": [float(i) for i in range(10)]}), table)
    aggregate(str(run), Settings(external_scores={"ext": f"{table}:s"}, score="ext", fraction=0.3, clip="none"))
    publish(str(run))
    published = (run / "manifest" / "report.html").read_bytes()
    RunReport.load(str(run)).write()
    assert (run / "manifest" / "report.html").read_bytes() == published
