"""Caption cache (``--caption-cache``): what a fresh crawl costs with and without it, and what a lookup costs.

    .venv/bin/python benchmarks/caption_cache_bench.py day2   [--images 20 --repeats 2]
    .venv/bin/python benchmarks/caption_cache_bench.py lookup [--entries 10000000 --shard 10000]

``day2``: the caption stage over a day-2 crawl that repeats 60 % of day 1's images (new keys, uids, alt-texts),
without the cache and with the cache day 1 filled, alternating in one process. The captioner is full-size BLIP
base built from ``BlipConfig()`` with seeded random weights (same FLOPs as the real checkpoint; every caption
runs to max_length), saved once as a local checkpoint and loaded by the stage as a user's would be; images are
crops of the demo photos (distinct bytes). Stage wall time includes loading the captioner.

``lookup``: one shard's lookups (60 % present) against a cache of ``--entries`` synthetic entries (16 compacted
partition files, 8 captions each drawn from 100k distinct strings, no dictionary encoding), in a fresh process
per measurement for its peak RSS. Baseline: one DuckDB query per shard joining the shard's digests with every
entry file (what a plain "SELECT ... WHERE sha256 IN shard" costs). Ours: the h columns read once (index), the
per-sample in-memory check, then the batched fetch of the hits' row groups; and a second shard in the same
process (files already read: only a listing).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sieve_tasks import caption_cache  # noqa: E402

REPEAT_SHARE = 0.6


def cpu_model() -> str:
    from benchmarks.caption_bench import cpu_model as model  # imports torch: not in the measuring processes

    return model()


# ------------------------------------------------------------------------------------------------ day 2
def blip_base_checkpoint(directory: Path) -> Path:
    """Full-size BLIP base with random weights and the BERT tokenizer, as ``save_pretrained`` writes it."""
    if (directory / ".complete").exists():
        return directory
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration

    from sieve_tasks.models import DEFAULT_TEXT_ENCODER, materialize

    tokenizer = BertTokenizerFast.from_pretrained(materialize(DEFAULT_TEXT_ENCODER))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig()).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / ".complete").touch()
    return directory


def photo_variants(count: int) -> list[bytes]:
    """``count`` distinct JPEGs: crops of the 16 demo photos at different offsets."""
    from PIL import Image

    from sieve_tasks.sample_pool import SAMPLES

    out = []
    for i in range(count):
        array = SAMPLES[i % len(SAMPLES)][0]()
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).astype(np.uint8)
        image = Image.fromarray(array).convert("RGB")
        shift = 4 * (i // len(SAMPLES))
        image = image.crop((shift, shift, image.width - shift, image.height - shift)).resize((256, 256))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_day(directory: Path, day: str, images: list[bytes]) -> None:
    from tests.shardmaker import ShardBuilder

    builder = ShardBuilder()
    for index, jpeg in enumerate(images):
        builder.sample(f"{day}0{index:07d}", f"day {day} alt-text {index}", jpeg)
    directory.mkdir(parents=True)
    builder.write(directory / "00000000.tar")


def day2(args: argparse.Namespace) -> None:
    import torch

    from sieve_tasks.runner import run_shard_stage
    from sieve_tasks.settings import Settings

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="sieve-cache-bench-"))
    checkpoint = blip_base_checkpoint(Path(args.checkpoint_dir or work / "blip-base-random"))
    repeated = round(args.images * REPEAT_SHARE)
    day2_images = photo_variants(args.images)  # the first `repeated` were on day 1 too
    day1_images = day2_images[:repeated]
    write_day(work / "day1", "1", day1_images)
    write_day(work / "day2", "2", day2_images)
    print(f"machine: {cpu_model()}; {os.cpu_count()} cpus; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"day 1: {len(day1_images)} images; day 2: {len(day2_images)} images, {repeated} of them repeated from day 1")

    base = dict(captioner=str(checkpoint), caption_batch_size=args.batch)
    filled = work / "cache-day1"
    started = time.perf_counter()
    run_shard_stage("caption", str(work / "day1"), str(work / "run-day1"), Settings(**base, caption_cache=str(filled)))
    print(f"day 1 with an empty cache (fills it): {time.perf_counter() - started:.1f}s")

    plain_times, cached_times, facts = [], [], None
    for r in range(args.repeats):
        started = time.perf_counter()
        run_shard_stage("caption", str(work / "day2"), str(work / f"plain-{r}"), Settings(**base))
        plain_times.append(time.perf_counter() - started)
        cache = work / f"cache-{r}"
        shutil.copytree(filled, cache)
        started = time.perf_counter()
        (marker,) = run_shard_stage("caption", str(work / "day2"), str(work / f"cached-{r}"),
                                    Settings(**base, caption_cache=str(cache)))
        cached_times.append(time.perf_counter() - started)
        facts = marker["cache"]
        print(f"repeat {r + 1}: without cache {plain_times[-1]:.1f}s; with cache {cached_times[-1]:.1f}s "
              f"({facts['hits']} hits, {facts['misses']} misses, lookups {facts['lookup_seconds']:.3f}s)", flush=True)
    plain, cached = statistics.median(plain_times), statistics.median(cached_times)
    print(f"\ncaption stage, day 2 ({len(day2_images)} images, batch {args.batch}, fp32 CPU, incl. model load):")
    print(f"without cache: median {plain:.1f}s  ({len(day2_images) / plain:.2f} img/s)")
    print(f"with cache:    median {cached:.1f}s  ({len(day2_images) / cached:.2f} img/s); captioning time saved "
          f"by the hits (as recorded when captioned): {facts['seconds_saved']:.1f}s")
    print(f"ratio {plain / cached:.2f}x (ideal with {REPEAT_SHARE:.0%} repeats and no fixed cost: "
          f"{1 / (1 - REPEAT_SHARE):.2f}x)")
    shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ lookup
def build_cache(root: Path, entries: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """Synthetic compacted cache: 16 partition files sorted by h. Returns every digest (n x 32 bytes)."""
    from sieve_tasks.caption_cache import ENTRY_SCHEMA, write_entries

    rng = np.random.default_rng(seed)
    vocabulary = pa.array([f"a {w} of a {v} on the {u}" for w, v, u in
                           zip(rng.integers(0, 10**6, 100_000), rng.integers(0, 10**6, 100_000),
                               rng.integers(0, 10**6, 100_000))])
    digests = rng.integers(0, 256, (entries, 32), dtype=np.uint8)
    started = time.perf_counter()
    parts = digests[:, 0] >> 4
    space = root / caption_cache.LAYOUT / "bench"
    for part in range(16):
        mine = digests[parts == part]
        h = mine[:, :8].copy().view(">u8").ravel().astype(np.uint64)
        order = np.argsort(h)
        mine, h = mine[order], h[order]
        n = len(mine)
        values = vocabulary.take(pa.array(rng.integers(0, len(vocabulary), n * 8)))
        captions = pa.ListArray.from_arrays(pa.array(np.arange(0, 8 * n + 1, 8, dtype=np.int32)), values)
        sha = pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n, [None, pa.py_buffer(mine.tobytes())])
        now = int(time.time())
        table = pa.table({"h": pa.array(h), "sha256": sha.cast(pa.binary()), "captions": captions,
                          "seconds": pa.array(np.full(n, 0.35, np.float32)),
                          "created": pa.array(np.full(n, now, np.int64)), "last_used": pa.array(np.full(n, now, np.int64))},
                         schema=ENTRY_SCHEMA)
        write_entries(str(space / f"{part:x}" / "compacted.parquet"), table)
    return digests, time.perf_counter() - started


def shard_digests(digests: np.ndarray, size: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    present = digests[rng.choice(len(digests), round(size * REPEAT_SHARE), replace=False)]
    absent = rng.integers(0, 256, (size - len(present), 32), dtype=np.uint8)
    both = np.concatenate([present, absent])
    return [row.tobytes() for row in both[rng.permutation(len(both))]]


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, root: str, shards: list[list[bytes]]) -> dict:
    """One measurement in this (fresh) process: seconds per phase and peak RSS."""
    result: dict = {"rss_start_mb": peak_rss_mb()}
    space = str(Path(root) / caption_cache.LAYOUT / "bench")
    if mode == "duckdb":
        import duckdb

        files = caption_cache.entry_files(space)
        con = duckdb.connect()
        started = time.perf_counter()
        con.register("wanted", pa.table({"sha256": pa.array(shards[0], pa.binary())}))
        found = con.sql("SELECT e.sha256, e.captions, e.seconds FROM read_parquet(?) AS e "
                        "JOIN wanted USING (sha256)", params=[files]).fetch_arrow_table()
        result.update(seconds=time.perf_counter() - started, hits=found.num_rows)
    else:
        cache = caption_cache.CaptionCache(str(root), "bench")
        for number, digests in enumerate(shards):
            counts = caption_cache.CacheCounts()
            started = time.perf_counter()
            index = cache.index(counts)
            indexed = time.perf_counter()
            candidates = [d for d in digests if index.maybe(d)]
            checked = time.perf_counter()
            found = {}
            for at in range(0, len(candidates), caption_cache.FETCH_BATCH):  # as the caption stage fetches
                found.update(index.fetch(candidates[at : at + caption_cache.FETCH_BATCH]))
            done = time.perf_counter()
            result[f"shard{number}"] = {"index": indexed - started, "check": checked - indexed, "fetch": done - checked,
                                        "seconds": done - started, "hits": len(found), "errors": counts.errors}
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def lookup(args: argparse.Namespace) -> None:
    root = Path(args.cache_dir or tempfile.mkdtemp(prefix="sieve-cache-lookup-"))
    print(f"machine: {cpu_model()}; {os.cpu_count()} cpus; pyarrow {pa.__version__}")
    digests, seconds = build_cache(root, args.entries)
    size = sum(f.stat().st_size for f in root.rglob("*.parquet"))
    print(f"built {args.entries:,} entries in 16 files ({size / 1e9:.2f} GB) in {seconds:.1f}s")
    shards = [shard_digests(digests, args.shard, seed) for seed in (1, 2, 3)]
    del digests
    payload = root / "shards.json"
    payload.write_text(json.dumps([[d.hex() for d in shard] for shard in shards]))
    results = {}
    for mode in ("duckdb", "ours") * args.repeats:
        out = subprocess.run([sys.executable, __file__, "measure", mode, str(root), str(payload)],
                             capture_output=True, text=True, check=True)
        results.setdefault(mode, []).append(json.loads(out.stdout.splitlines()[-1]))
    n = args.shard

    def per_sample(times: list[float]) -> str:
        return (f"median {statistics.median(times):.2f}s = {1e6 * statistics.median(times) / n:.0f} us/sample "
                f"(min {min(times):.2f}s, max {max(times):.2f}s)")

    base = [r["seconds"] for r in results["duckdb"]]
    ours = [r["shard0"]["seconds"] for r in results["ours"]]
    warm = [r[f"shard{i}"]["seconds"] for r in results["ours"] for i in (1, 2)]
    phases = {p: statistics.median(r["shard0"][p] for r in results["ours"]) for p in ("index", "check", "fetch")}
    print(f"\none shard of {n:,} lookups ({REPEAT_SHARE:.0%} present) against {args.entries:,} entries; "
          f"{args.repeats} fresh processes per method, alternating")
    print(f"baseline DuckDB join:  {per_sample(base)}; peak RSS "
          f"{max(r['peak_rss_mb'] for r in results['duckdb']):.0f} MB (after imports "
          f"{results['duckdb'][0]['rss_start_mb']:.0f} MB); hits {results['duckdb'][0]['hits']:,}")
    print(f"ours, first shard:     {per_sample(ours)}: index {phases['index']:.2f}s, checks {phases['check']:.3f}s, "
          f"fetch {phases['fetch']:.2f}s; peak RSS {max(r['peak_rss_mb'] for r in results['ours']):.0f} MB (after "
          f"imports {results['ours'][0]['rss_start_mb']:.0f} MB); hits {results['ours'][0]['shard0']['hits']:,}")
    print(f"ours, next shards (same process, files already read): {per_sample(warm)}")
    print(f"ratio of medians (first shard): {statistics.median(base) / statistics.median(ours):.2f}x")
    if not args.cache_dir:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "measure":
        mode, root, payload = sys.argv[2:5]
        shards = [[bytes.fromhex(d) for d in shard] for shard in json.loads(Path(payload).read_text())]
        print(json.dumps(measure(mode, root, shards)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("day2")
    d.add_argument("--images", type=int, default=20, help="day-2 images (60 %% of them repeated from day 1)")
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--repeats", type=int, default=2)
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--checkpoint-dir", help="where the random BLIP base checkpoint is kept (default: a temp dir)")
    lk = sub.add_parser("lookup")
    lk.add_argument("--entries", type=int, default=10_000_000)
    lk.add_argument("--shard", type=int, default=10_000, help="samples per shard")
    lk.add_argument("--repeats", type=int, default=3, help="fresh processes per method (alternating)")
    lk.add_argument("--cache-dir", help="keep the synthetic cache here (default: a temp dir, removed)")
    args = ap.parse_args()
    day2(args) if args.what == "day2" else lookup(args)


if __name__ == "__main__":
    main()
