"""Does the image pass overlap the model? Measured without a GPU, through the library's API.

    .venv/bin/python benchmarks/overlap_bench.py [--samples 4096 --shards 1 --batch 32 --workers N]

A stand-in captioner with a fixed cost per batch (it sleeps: like a GPU kernel it holds neither a core nor the
GIL) replaces BLIP in the caption stage (``CaptionStage(run, settings, captioner=...)``, CLIP off). For real
photos (≤ 512 px JPEGs, as benchmarks/gpu_pipeline_bench.py builds them) it measures:
  data time   the image pass alone (read, validate, decode, resize, batch) over the shards, no model;
  model time  batches × the stand-in's cost;
  end to end  the caption stage over the same shards with the stand-in, as ``sieve run`` drives it
              (``runner.caption_shards``: the next shard's images are decoded while one is captioned).
Overlap efficiency = max(data, model) / end to end: 1.0 when the two run entirely side by side, about 0.5 when
they take turns and cost the same. The stand-in's cost is set to 0.5×, 1× and 2× the measured data time per
batch; 1× is the hard case (a sum would double the time). Each repeat times the image pass alone and then the
caption stage with the stand-in set from that time, so both halves of a ratio come from the same minute of a
machine whose speed drifts (±10–15 % here between minutes); the median of the repeats' ratios is printed. At 1×
the model never waits only if the data never falls behind its average pace: the first batch's wait, and any
stretch where decoding runs slower than average, are lost for good (the model cannot go faster to catch up), so
the shorter the run, the lower its figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_pipeline_bench import write_shard  # noqa: E402

from sieve_tasks.image_pass import ImagePass, Need, default_workers  # noqa: E402
from sieve_tasks.pool import register_pool  # noqa: E402
from sieve_tasks.runner import SWITCH_INTERVAL, caption_shards  # noqa: E402
from sieve_tasks.settings import Settings  # noqa: E402
from sieve_tasks.stages.caption import CaptionStage  # noqa: E402


class FixedCostCaptioner:
    """Stands in for BLIP: ``seconds`` per batch whatever its size, one caption per image."""

    oom_splits = 0

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.batches = 0

    def launch(self, pixel_values, seed: int) -> Future[list[list[str]]]:
        time.sleep(self.seconds)
        self.batches += 1
        captions: Future[list[list[str]]] = Future()
        captions.set_result([["a stand-in caption"] for _ in range(pixel_values.shape[0])])
        return captions

    def start_text(self) -> None:
        pass

    def close(self) -> None:
        pass


def data_time(shards, batch: int, workers: int) -> tuple[float, int]:
    """Seconds of the image pass alone over ``shards`` (the next shard started while one is consumed, as the
    caption stage does), and the number of batches it made."""
    images = ImagePass((224,), Settings.max_pixels, batch, workers)
    started, batches = time.perf_counter(), 0
    streams = [images.start(shards[0], lambda item: Need.PIXELS)]
    for index in range(len(shards)):
        if index + 1 < len(shards):
            streams.append(images.start(shards[index + 1], lambda item: Need.PIXELS))
        for made in streams[index]:
            batches += bool(made.pixels)
        streams[index].close()
    return time.perf_counter() - started, batches


def end_to_end(run: str, shards, batch: int, workers: int, seconds: float) -> tuple[float, int]:
    """The caption stage over the shards as ``sieve run`` drives it (the next shard's images decoded while the
    current one is captioned), into a fresh run directory."""
    settings = Settings(clip="none", caption_batch_size=batch, decode_workers=workers, device="cpu")
    captioner = FixedCostCaptioner(seconds)
    stage = CaptionStage(tempfile.mkdtemp(dir=run), settings, captioner=captioner)
    started = time.perf_counter()
    for _ in caption_shards(stage, shards):
        pass
    return time.perf_counter() - started, captioner.batches


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4096,
                    help="a DataComp shard holds ~10,000; a shorter run weighs the first batch's wait more")
    ap.add_argument("--shards", type=int, default=1, help="1: one DataComp-like shard (its per-shard costs amortised)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="decode threads (default: one per core)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ratios", default="0.5,1,2", help="stand-in cost per batch, as multiples of the data time")
    args = ap.parse_args(argv)
    workers = args.workers or default_workers()
    sys.setswitchinterval(SWITCH_INTERVAL)  # as `sieve run` sets it
    with tempfile.TemporaryDirectory(prefix="sieve-overlap-") as work:
        pool = Path(work, "pool")
        pool.mkdir()
        for shard in range(args.shards):
            write_shard(str(pool), shard, args.samples // args.shards, seed=0)
        runs = Path(work, "runs")
        runs.mkdir()
        shards = register_pool(str(pool), str(runs / "pool"))
        batches = data_time(shards, args.batch, workers)[1]  # warm-up: imports, allocator, page cache
        print(f"{os.cpu_count()} cpus, {workers} decode workers, {args.samples} photos in {args.shards} shards, "
              f"batch {args.batch} ({batches} batches)")
        worst, alone = 1.0, []
        for ratio in (float(r) for r in args.ratios.split(",")):
            efficiencies, totals, models = [], [], []
            for _ in range(args.repeats):
                seconds = data_time(shards, args.batch, workers)[0]
                cost = ratio * seconds / batches
                total, launched = end_to_end(str(runs), shards, args.batch, workers, cost)
                efficiencies.append(max(seconds, launched * cost) / total)
                totals.append(total)
                models.append(launched * cost)
                alone.append(seconds)
            efficiency = statistics.median(efficiencies)
            worst = min(worst, efficiency)
            print(f"model {ratio:g}x data: model {statistics.median(models):.2f} s, end to end "
                  f"{statistics.median(totals):.2f} s -> overlap efficiency {efficiency:.2f} "
                  f"(repeats {min(efficiencies):.2f}-{max(efficiencies):.2f})")
        data = statistics.median(alone)
        print(f"image pass alone: {data:.2f} s, {args.samples / data:.0f} img/s (median of the {len(alone)} runs above; "
              f"{min(alone):.2f}-{max(alone):.2f} s)")
        print(f"overlap efficiency (worst of the ratios): {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
