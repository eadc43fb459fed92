"""--caption-cache over a two-day crawl of real photos: day 2 repeats 60 % of day 1's images under new keys,
uids and alt-texts, and only its new 40 % is captioned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sieve_tasks import cache_admin, caption_cache
from sieve_tasks.cli import main
from sieve_tasks.sample_pool import SAMPLES, _jpeg
from tests.shardmaker import write_photo_day

pytestmark = pytest.mark.slow

DAY1 = list(range(10))  # indexes into the demo photos
REPEATED = [0, 2, 3, 5, 7, 9]  # 60 % of day 1, again on day 2
NEW = [10, 11, 12, 13]  # 40 % never seen
ARGS = ["--profile", "test", "--no-progress", "--fraction", "0.5"]


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("crawl")
    write_photo_day(base / "day1", "1", DAY1)
    write_photo_day(base / "day2", "2", REPEATED + NEW)
    return base


@pytest.fixture(scope="module")
def day1(crawl, tmp_path_factory) -> tuple[Path, Path]:
    """Day 1 run with a fresh cache: (run, cache)."""
    root = tmp_path_factory.mktemp("day1")
    run, cache = root / "run", root / "cache"
    assert main(["run", str(crawl / "day1"), str(run), "--caption-cache", str(cache), *ARGS]) == 0
    return run, cache


@pytest.fixture
def captioner_calls(monkeypatch) -> list[int]:
    """Images the captioner is asked to caption, one entry per call."""
    from sieve_tasks.captioner import BlipCaptioner

    calls: list[int] = []
    original = BlipCaptioner.launch

    def counting(self, pixel_values, seed):
        calls.append(int(pixel_values.shape[0]))
        return original(self, pixel_values, seed)

    monkeypatch.setattr(BlipCaptioner, "launch", counting)
    return calls


def _captions_by_photo(run: Path, photos: list[int]) -> dict[int, tuple[list[str], str]]:
    """photo index → (captions, caption_source), matched through the shard/position order the day was written in."""
    rows = sorted(pq.read_table(run / "captions").to_pylist(), key=lambda r: (r["shard"], r["position"]))
    return {photo: (row["captions"], row["caption_source"]) for photo, row in zip(photos, rows)}


def _summary(run: Path) -> dict:
    return json.loads((run / "manifest" / "summary.json").read_text())


def _copy_cache(cache: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(cache, target)
    return target


def test_day2_captions_only_new_images_and_reuses_day1_captions(crawl, day1, tmp_path, captioner_calls):
    day1_run, day1_cache = day1
    cache = _copy_cache(day1_cache, tmp_path / "cache")
    run = tmp_path / "day2"
    assert main(["run", str(crawl / "day2"), str(run), "--caption-cache", str(cache), *ARGS]) == 0

    assert sum(captioner_calls) == len(NEW)  # the captioner saw only the new 40 %
    first, second = _captions_by_photo(day1_run, DAY1), _captions_by_photo(run, REPEATED + NEW)
    for photo in REPEATED:
        assert second[photo] == (first[photo][0], "cache")
    assert {second[photo][1] for photo in NEW} == {"captioner"}
    figures = _summary(run)["captioning"]["cache"]
    assert (figures["hits"], figures["misses"], figures["written"], figures["errors"]) == (6, 4, 4, 0)
    assert figures["seconds_saved"] > 0 and figures["hit_rate"] == 0.6
    assert _summary(run)["captioning"]["captioned"] == 4

    # the same captions given as --captions to a run without the cache score the same
    given = tmp_path / "given.parquet"
    pq.write_table(pq.read_table(run / "captions", columns=["uid", "captions"]), given)
    plain = tmp_path / "plain"
    assert main(["run", str(crawl / "day2"), str(plain), "--captions", str(given), *ARGS]) == 0
    assert pq.read_table(plain / "scores").equals(pq.read_table(run / "scores"))
    assert (plain / "manifest" / "subset.npy").read_bytes() == (run / "manifest" / "subset.npy").read_bytes()


def test_another_decoding_setting_never_hits(crawl, day1, tmp_path, captioner_calls):
    cache = _copy_cache(day1[1], tmp_path / "cache")
    run = tmp_path / "day2"
    assert main(["run", str(crawl / "day2"), str(run), "--caption-cache", str(cache), "--top-p", "0.8", *ARGS]) == 0
    assert sum(captioner_calls) == len(REPEATED + NEW)
    figures = _summary(run)["captioning"]["cache"]
    assert (figures["hits"], figures["misses"]) == (0, 10)
    assert len(cache_admin.stats(str(cache))["fingerprints"]) == 2  # a namespace per caption setting


def test_a_truncated_cache_file_is_survived_and_counted(crawl, day1, tmp_path, captioner_calls):
    cache = _copy_cache(day1[1], tmp_path / "cache")
    (space,) = caption_cache.namespaces(str(cache))
    broken = space.entries[0]
    lost = pq.read_metadata(broken).num_rows
    data = Path(broken).read_bytes()
    Path(broken).write_bytes(data[: len(data) // 2])
    lost_repeated = sum(caption_cache.partition(caption_cache.image_digest(_jpeg(SAMPLES[p][0]())[0]))
                        == caption_cache.partition_of_file(broken) for p in REPEATED)
    run = tmp_path / "day2"
    assert main(["run", str(crawl / "day2"), str(run), "--caption-cache", str(cache), *ARGS]) == 0
    figures = _summary(run)["captioning"]["cache"]
    assert figures["errors"] == 2  # met once by each of the day's two shards
    assert figures["hits"] == len(REPEATED) - lost_repeated and lost >= 1
    assert sum(captioner_calls) == len(NEW) + lost_repeated
    # compaction removes the broken file and keeps every readable entry
    report = cache_admin.compact(str(cache))
    assert report["corrupt_files_removed"] == 1
    assert not Path(broken).exists()
    stats = cache_admin.stats(str(cache))["fingerprints"][0]
    assert stats["unreadable_files"] == 0 and stats["entries"] == report["entries_after"]


def test_two_runs_writing_the_same_cache_at_once_both_succeed(crawl, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    runs = [subprocess.Popen([sys.executable, "-m", "sieve_tasks.cli", "caption", str(crawl / "day1"),
                              str(tmp_path / name), "--caption-cache", str(cache), "--profile", "test"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in ("a", "b")]
    for process in runs:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]
    (space,) = caption_cache.namespaces(str(cache))
    assert all(pq.read_metadata(uri).num_rows > 0 for uri in space.entries)  # every file whole and readable
    again = tmp_path / "c"
    assert main(["caption", str(crawl / "day1"), str(again), "--caption-cache", str(cache), "--profile", "test"]) == 0
    sources = pq.read_table(again / "captions", columns=["caption_source"]).column(0).to_pylist()
    assert sources == ["cache"] * len(DAY1)
    report = cache_admin.compact(str(cache))  # keys both runs wrote are merged to one entry each
    assert report["entries_after"] == len(DAY1) and report["files_after"] <= len(space.entries)
    assert cache_admin.stats(str(cache))["fingerprints"][0]["hits"] >= len(DAY1)


def test_prune_drops_entries_not_used_for_n_days(tmp_path, monkeypatch):
    cache = caption_cache.CaptionCache(str(tmp_path / "cache"), "fp")
    counts = caption_cache.CacheCounts()
    digests = [caption_cache.image_digest(bytes([i])) for i in range(4)]
    old = time.time() - 40 * cache_admin.DAY_SECONDS
    monkeypatch.setattr(caption_cache.time, "time", lambda: old)
    cache.add([(d, [f"caption {i}"], 0.5) for i, d in enumerate(digests)], counts)
    monkeypatch.undo()
    counts.hits = 1
    cache.record_hits([digests[1]], counts)  # used today: kept
    cache.add([(caption_cache.image_digest(b"new"), ["fresh"], 0.5)], counts)  # created today: kept
    report = cache_admin.compact(str(tmp_path / "cache"), max_age_days=30)
    assert (report["entries_before"], report["entries_after"], report["hit_logs_folded"]) == (5, 2, 1)
    index = cache.index(caption_cache.CacheCounts())
    found = index.fetch(digests + [caption_cache.image_digest(b"new")])
    assert {d: c.captions for d, c in found.items()} == {digests[1]: ["caption 1"],
                                                         caption_cache.image_digest(b"new"): ["fresh"]}


def test_cli_cache_commands(day1, tmp_path, capsys):
    cache = _copy_cache(day1[1], tmp_path / "cache")
    assert main(["cache", "stats", str(cache)]) == 0
    stats = json.loads(capsys.readouterr().out)["fingerprints"][0]
    assert stats["entries"] == len(DAY1) and stats["hits"] == 0 and stats["lookups"] == len(DAY1)
    assert main(["cache", "compact", str(cache)]) == 0
    assert json.loads(capsys.readouterr().out)["entries_after"] == len(DAY1)
    assert main(["cache", "prune", str(cache), "--days", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["entries_after"] == len(DAY1)


def test_cache_on_s3(s3_server, sample_pool, tmp_path):
    """The same cache on an S3-compatible server (moto): the second run's captions all come from it."""
    cache = "s3://sieve-test/caption-cache"
    for name in ("first", "second"):
        assert main(["caption", sample_pool, str(tmp_path / name), "--caption-cache", cache, "--profile", "test"]) == 0
    first = pq.read_table(tmp_path / "first" / "captions").to_pylist()
    second = pq.read_table(tmp_path / "second" / "captions").to_pylist()
    ok = [i for i, row in enumerate(first) if row["status"] == "ok"]
    assert [second[i]["caption_source"] for i in ok] == ["cache"] * 16
    assert [second[i]["captions"] for i in ok] == [first[i]["captions"] for i in ok]
    assert cache_admin.compact(cache)["entries_after"] == 16
    assert cache_admin.stats(cache)["fingerprints"][0]["hits"] == 16


def test_two_compactions_at_once_lose_nothing(tmp_path):
    """Compactions racing over the same files: every entry stays readable, none is lost or counted corrupt."""
    from concurrent.futures import ThreadPoolExecutor

    cache = caption_cache.CaptionCache(str(tmp_path / "cache"), "fp")
    digests = [caption_cache.image_digest(str(i).encode()) for i in range(200)]
    for start in range(0, 200, 20):  # ten writers' worth of small files
        cache.add([(d, [f"caption {i}"], 0.1) for i, d in enumerate(digests[start : start + 20], start)],
                  caption_cache.CacheCounts())
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda _: cache_admin.compact(str(tmp_path / "cache")), range(2)))
    assert all(r["corrupt_files_removed"] == 0 for r in reports)
    found = cache.index(caption_cache.CacheCounts()).fetch(digests)
    assert {d: c.captions for d, c in found.items()} == {d: [f"caption {i}"] for i, d in enumerate(digests)}
    assert cache_admin.compact(str(tmp_path / "cache"))["entries_after"] == 200


@pytest.mark.parametrize("failing", ["a source", "the merged file"])
def test_a_failed_request_during_compaction_deletes_nothing(tmp_path, monkeypatch, failing):
    """One storage error (a connection reset) reading a footer is not a broken file: compaction stops with the error,
    and every entry stays readable."""
    from sieve_tasks import storage

    cache = caption_cache.CaptionCache(str(tmp_path / "cache"), "fp")
    digests = [bytes([0]) + caption_cache.image_digest(str(i).encode())[1:] for i in range(40)]  # one partition
    for start in (0, 20):
        cache.add([(d, [f"caption {i}"], 0.1) for i, d in enumerate(digests[start : start + 20], start)],
                  caption_cache.CacheCounts())
    sources = set(cache_admin.namespaces(str(tmp_path / "cache"))[0].entries)
    real_open, failed = storage.open_file, []

    def flaky_open(uri, mode="rb"):
        chosen = uri == min(sources) if failing == "a source" else uri.endswith(".parquet") and uri not in sources
        if chosen and not failed:
            failed.append(uri)
            raise storage.StorageError(f"opening {uri} failed: ConnectionError: Connection reset by peer")
        return real_open(uri, mode)

    monkeypatch.setattr(cache_admin.storage, "open_file", flaky_open)
    with pytest.raises(storage.StorageError, match="Connection reset"):
        cache_admin.compact(str(tmp_path / "cache"))
    monkeypatch.undo()
    found = cache.index(caption_cache.CacheCounts()).fetch(digests)
    assert failed and {d: c.captions for d, c in found.items()} == {d: [f"caption {i}"] for i, d in enumerate(digests)}


def test_hit_logs_stay_while_a_partition_is_left_uncompacted(tmp_path, monkeypatch):
    """A partition whose merge fails keeps its files, and the hit logs stay too: folded away, the last use of its
    entries would be lost and the next prune would drop entries used today."""
    cache = caption_cache.CaptionCache(str(tmp_path / "cache"), "fp")
    digests = [bytes([16 * i]) + caption_cache.image_digest(bytes([i]))[1:] for i in range(4)]  # 4 partitions
    old = time.time() - 40 * cache_admin.DAY_SECONDS
    monkeypatch.setattr(caption_cache.time, "time", lambda: old)
    for i, d in enumerate(digests):
        cache.add([(d, [f"caption {i}"], 0.5)], caption_cache.CacheCounts())
    monkeypatch.undo()
    counts = caption_cache.CacheCounts(hits=1)
    cache.record_hits([digests[1]], counts)  # used today
    real = cache_admin._compact_partition
    monkeypatch.setattr(cache_admin, "_compact_partition",
                        lambda con, space, part, *rest: False if part == "1" else real(con, space, part, *rest))
    assert cache_admin.compact(str(tmp_path / "cache"))["hit_logs_folded"] == 0
    monkeypatch.undo()
    cache_admin.compact(str(tmp_path / "cache"), max_age_days=30)
    found = cache.index(caption_cache.CacheCounts()).fetch(digests)
    assert list(found) == [digests[1]]


@pytest.mark.parametrize("days", ["0", "-3", "nan"])
def test_prune_refuses_a_window_that_would_drop_every_entry(tmp_path, capsys, days):
    cache = caption_cache.CaptionCache(str(tmp_path / "cache"), "fp")
    cache.add([(caption_cache.image_digest(b"x"), ["kept"], 0.5)], caption_cache.CacheCounts())
    assert main(["cache", "prune", str(tmp_path / "cache"), "--days", days]) == 2
    assert "must be a positive number of days" in capsys.readouterr().err
    assert cache.index(caption_cache.CacheCounts()).fetch([caption_cache.image_digest(b"x")])
