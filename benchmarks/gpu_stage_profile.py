"""Where a GPU run's time goes, stage part by stage part (a diagnostic for issue 10; runs on CPU with --tiny).

    PYTHONPATH=. python benchmarks/gpu_stage_profile.py --minilm .minilm [--samples 4096 --shards 8]

Builds photos and random full-size models like gpu_pipeline_bench.py, then times, each on its own:
  1. the image pass alone (read, validate, decode, resize, batch) with torchvision's decoder (nvJPEG on CUDA) and
     with PIL, consuming the batches on the device;
  2. the caption stage with a zero-cost stand-in captioner (CLIP, data and Python only);
  3. the caption stage with BLIP and CLIP off; then the embed and score stages on its output;
  4. one decoder batch under torch.profiler (the top kernels).
While 2 and 3 run, a sampler thread records every 5 ms what each thread is executing (its innermost frame in
sieve_tasks, or the library function it is in), and prints the most frequent per thread.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_pipeline_bench import build_blip, build_clip, build_minilm, default_minilm_dir, start_pool_build  # noqa: E402


class StackSampler:
    """Every ``interval`` s, the innermost frame of each thread (inside sieve_tasks if any), counted per thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.counts = interval, collections.defaultdict(collections.Counter)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        names = {}
        while not self.stop.wait(self.interval):
            for thread in threading.enumerate():
                names[thread.ident] = thread.name.split("_")[0].rstrip("-0123456789")
            for ident, frame in sys._current_frames().items():
                if ident == self.thread.ident:
                    continue
                inner, ours = frame, None
                while frame is not None:
                    if ours is None and "sieve_tasks" in frame.f_code.co_filename:
                        ours = frame
                    frame = frame.f_back
                where = f"{Path(inner.f_code.co_filename).name}:{inner.f_code.co_name}:{inner.f_lineno}"
                if ours is not None and ours is not inner:
                    where = f"{Path(ours.f_code.co_filename).name}:{ours.f_code.co_name}:{ours.f_lineno} > {where}"
                self.counts[names.get(ident, str(ident))][where] += 1

    def __enter__(self) -> StackSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        for name, counter in sorted(self.counts.items()):
            total = sum(counter.values())
            print(f"  thread {name}: {total} samples")
            for where, count in counter.most_common(6):
                print(f"    {100 * count / total:5.1f} %  {where}")


def timed(label: str, rows: int, fn, sync) -> None:
    started = time.perf_counter()
    fn()
    sync()
    seconds = time.perf_counter() - started
    print(f"{label}: {rows} in {seconds:.2f} s = {rows / seconds:.0f}/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--shards", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--minilm")
    args = ap.parse_args(argv)
    samples = args.samples or (64 if args.tiny else 4096)
    shards = args.shards or (2 if args.tiny else 8)
    work = Path(tempfile.mkdtemp(prefix="sieve-profile-"))
    minilm = args.minilm or default_minilm_dir()
    with ProcessPoolExecutor(shards) as pool:
        jobs = start_pool_build(pool, work / "pool", samples, shards, 0)
        build_blip(work / "blip", minilm, args.tiny)
        build_clip(work / "clip", args.tiny)
        build_minilm(work / "minilm", minilm, args.tiny)
        for job in jobs:
            job.result()

    import torch

    from overlap_bench import FixedCostCaptioner
    from sieve_tasks.image_pass import ImagePass, Need
    from sieve_tasks.pool import register_pool
    from sieve_tasks.settings import Settings
    from sieve_tasks.stages.caption import CaptionStage
    from sieve_tasks.stages.embed import EmbedStage
    from sieve_tasks.stages.score import ScoreStage

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch = args.batch or (8 if args.tiny else 512)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    pool_shards = register_pool(str(work / "pool"), str(work / "run"))

    def image_pass(decoder: str) -> None:
        for shard in pool_shards:
            for made in ImagePass((224,), Settings.max_pixels, batch, device=device,
                                  jpeg_decoder=decoder).batches(shard, lambda item: Need.PIXELS):
                made.pixels_on(device)

    for decoder in ("torchvision", "pil"):
        image_pass(decoder)  # warm-up: page cache, nvJPEG handles
        with StackSampler():
            timed(f"image pass alone, {decoder}", samples, lambda: image_pass(decoder), sync)

    models = {"clip": str(work / "clip"), "captioner": str(work / "blip"), "text_encoder": str(work / "minilm")}
    common = dict(device=device.type, caption_batch_size=batch, **models)
    stand_in = CaptionStage(str(work / "stand-in"), Settings(**common), captioner=FixedCostCaptioner(0.0))
    stand_in.clip  # loaded before the clock
    with StackSampler():
        timed("caption stage, zero-cost captioner + CLIP", samples,
              lambda: [stand_in.process(shard) for shard in pool_shards], sync)

    settings = Settings(**{**common, "clip": "none"}, score="sieve")
    blip = CaptionStage(str(work / "run"), settings)
    blip.captioner  # loaded before the clock
    blip.process(pool_shards[0])  # warm-up: graph capture
    with StackSampler():
        timed("caption stage, BLIP, CLIP off", samples, lambda: [blip.run_shard(s) for s in pool_shards], sync)
    embed = EmbedStage(str(work / "run"), settings)
    embed.text_encoder
    with StackSampler():
        timed("embed stage", samples, lambda: [embed.run_shard(s) for s in pool_shards], sync)
    score = ScoreStage(str(work / "run"), settings)
    timed("score stage", samples, lambda: [score.run_shard(s) for s in pool_shards], sync)

    from sieve_tasks.fast_blip import FastBlipDecoder
    from torch.profiler import ProfilerActivity, profile

    decoder = FastBlipDecoder(blip.captioner.model)
    pixels = torch.randn(batch, 3, 224, 224, device=device, dtype=blip.captioner.device.dtype)
    prompt = blip.captioner.prompt_ids
    decoder.generate(pixels, prompt, settings, seed=0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        decoder.generate(pixels, prompt, settings, seed=0)
        sync()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
