"""How much of a caption task would the accelerator spend waiting for the host? Measured without a GPU.

    .venv/bin/python benchmarks/device_idle_bench.py [--samples 4096 --shards 2 --batch 256 --blip-ms 3.0]

A CUDA stream is simulated by one thread that runs the work launched on it in order, each piece sleeping for a
fixed cost per image (like a kernel it holds neither a core nor the GIL); the host launches work without waiting
and waits only where the real code copies a result to the host (``.cpu()``). The caption stage runs as ``sieve
run`` drives it, with host_cost_bench.py's models (the real BLIP captioner and CLIP encoder classes, their networks
free) whose work is launched on the simulated stream:
  * BLIP: ``--blip-ms`` per image; the captioner waits for its tokens (the real decoder syncs with the host every
    few steps and at its end);
  * CLIP: ``--clip-image-ms`` per image and ``--clip-text-ms`` per alt-text, each returned as a handle the stage
    copies to the host when it chooses.
The defaults keep an H100's proportions (BLIP ≈ 3,000 img/s, CLIP B/32 ≈ 32,000 images and ≈ 50,000 texts/s) at a
ninth of its speed, so that this 2-core host (≈ 520 samples/s with the device free) outruns the simulated device. It prints samples/s, the device's
busy share (the work launched / the stage's time) and the ideal (all work back to back). Same pool, CUDA layout
(tar reader and CLIP tokenizer in processes of their own, torchvision's batched decode) as host_cost_bench.py.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from host_cost_bench import bench_settings, caption_stage, models, write_pool  # noqa: E402

from sieve_tasks.pool import register_pool  # noqa: E402
from sieve_tasks.runner import SWITCH_INTERVAL, caption_shards  # noqa: E402
from sieve_tasks.settings import Settings  # noqa: E402
from sieve_tasks.stages.caption import CLIP_TOKENIZER_PROCESSES  # noqa: E402
from sieve_tasks.tar_reader import keep_spare_reader  # noqa: E402


class SimulatedStream:
    """One in-order queue of device work run by a thread of its own; ``busy`` is the seconds of work run."""

    def __init__(self):
        self.work: queue.SimpleQueue[tuple[float, Future] | None] = queue.SimpleQueue()
        self.busy = 0.0
        self.thread = threading.Thread(target=self._run, name="simulated-stream", daemon=True)
        self.thread.start()

    def launch(self, seconds: float, result: torch.Tensor) -> OnDevice:
        done: Future = Future()
        self.work.put((seconds, done))
        return OnDevice(done, result)

    def _run(self) -> None:
        while (job := self.work.get()) is not None:
            seconds, done = job
            time.sleep(seconds)
            self.busy += seconds
            done.set_result(None)

    def close(self) -> None:
        self.work.put(None)
        self.thread.join()


class OnDevice:
    """A result still on the simulated device: ``cpu()`` waits for the work that makes it."""

    def __init__(self, done: Future, result: torch.Tensor):
        self.done, self.result = done, result

    def cpu(self) -> torch.Tensor:
        self.done.result()
        return self.result


class StreamDecoder:
    """The canned BLIP decoder, its work launched on the stream; the captioner's ``.cpu()`` waits for it."""

    def __init__(self, decoder, stream: SimulatedStream, seconds_per_image: float):
        self.decoder, self.stream, self.seconds = decoder, stream, seconds_per_image

    def generate(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> OnDevice:
        tokens = self.decoder.generate(pixel_values, *args, **kwargs)
        return self.stream.launch(self.seconds * pixel_values.shape[0], tokens)


class StreamClip:
    """The CLIP encoder (real host work, free network) whose vectors come back as :class:`OnDevice` handles."""

    def __init__(self, clip, stream: SimulatedStream, image_seconds: float, text_seconds: float):
        self.clip, self.stream = clip, stream
        self.image_seconds, self.text_seconds = image_seconds, text_seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self.clip, name)

    def encode_images(self, pixels: torch.Tensor) -> OnDevice:
        return self.stream.launch(self.image_seconds * len(pixels), self.clip.encode_images(pixels))

    def encode_tokens(self, tokens) -> OnDevice:
        return self.stream.launch(self.text_seconds * len(tokens), self.clip.encode_tokens(tokens))


def caption_task(pool: Path, work: Path, settings: Settings, captioner, clip) -> float:
    """Seconds of the caption stage over the pool, CUDA layout (tar reader process, torchvision decode)."""
    stage = caption_stage(work, settings, captioner, clip, reader_process=True)
    shards = register_pool(str(pool), stage.run)
    # what a CUDA run starts while its models load (seconds), running before the clock starts: the tokenizer
    # processes and the spare tar reader (~0.5 s to start; the stage keeps one on CUDA, here it is started for it)
    clip.tokenize(["started"]).result()
    keep_spare_reader()
    time.sleep(1.0)
    started = time.perf_counter()
    for _ in caption_shards(stage, shards):
        pass
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--blip-ms", type=float, default=3.0, help="simulated BLIP work per image")
    ap.add_argument("--clip-image-ms", type=float, default=0.28, help="simulated CLIP work per image")
    ap.add_argument("--clip-text-ms", type=float, default=0.18, help="simulated CLIP work per alt-text")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sys.setswitchinterval(SWITCH_INTERVAL)
    per_image = (args.blip_ms + args.clip_image_ms + args.clip_text_ms) / 1000
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}; {args.samples} samples in {args.shards} "
          f"shards, batch {args.batch}; simulated device ms per image: BLIP {args.blip_ms}, CLIP image "
          f"{args.clip_image_ms}, CLIP text {args.clip_text_ms} (ideal {1 / per_image:.0f} samples/s); "
          f"median of {args.repeats}")
    with tempfile.TemporaryDirectory(prefix="sieve-device-idle-") as tmp:
        pool, work = Path(tmp, "pool"), Path(tmp)
        write_pool(pool, args.samples, args.shards)
        settings = bench_settings(args.batch)
        captioner, clip = models(settings, CLIP_TOKENIZER_PROCESSES)
        runs = []
        for repeat in range(args.repeats + 1):  # the first round warms caches and allocators
            stream = SimulatedStream()
            captioner.fast = StreamDecoder(captioner.fast if repeat == 0 else captioner.fast.decoder, stream,
                                           args.blip_ms / 1000)
            seconds = caption_task(pool, work, settings, captioner,
                                   StreamClip(clip, stream, args.clip_image_ms / 1000, args.clip_text_ms / 1000))
            stream.close()
            if repeat:
                runs.append((seconds, stream.busy / seconds))
        seconds, busy = (statistics.median(run[i] for run in runs) for i in range(2))
    print(f"caption task: {args.samples / seconds:.0f} samples/s, device busy {busy:.0%} ({seconds:.2f} s; "
          f"the same work back to back {args.samples * per_image:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
