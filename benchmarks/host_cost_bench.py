"""What the caption process costs the host per sample when the models cost nothing — the ceiling of a GPU run.

    .venv/bin/python benchmarks/host_cost_bench.py [--samples 4096 --batch 256 --repeats 3]

On a GPU the caption task is bound by its process's one interpreter lock (BENCHMARKS.md §10): the Python that
reads, checks, decodes and resizes each image, turns BLIP's tokens into captions, tokenises alt-texts for CLIP
and builds the rows. This measures that work without a GPU: the caption stage (``CaptionStage(run, settings,
captioner=..., clip=...)``, driven as ``sieve run`` does) over one DataComp-like shard of small JPEGs (their
decode costs little, as on the GPU) with varied web-like alt-texts, where
  * BLIP is the real :class:`~sieve_tasks.captioner.BlipCaptioner` (tiny test model, real BERT tokenizer) whose
    decoder is replaced by one that returns 8 canned 20-token captions per image at no cost;
  * CLIP is the real :class:`~sieve_tasks.encoders.ClipEncoder` (tiny test model, open_clip's tokenizer) whose
    network returns zero vectors at no cost;
  * JPEGs go through torchvision's decoder and the tensor resize (the path nvJPEG takes on CUDA), one worker,
    to views of 32 px (so resizing and normalising cost about what launching their kernels costs on a GPU).
It prints samples/s and CPU µs per sample: the consumer thread (captions, CLIP, rows) and the rest of the
process (reader, decode worker); the CLIP tokenizer processes (as on CUDA; ``--clip-tokenizer-processes 0``: in the
consumer thread, as on CPU) are started before the clock and their CPU time is not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import hashlib
import os
import random
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from sieve_tasks.captioner import BlipCaptioner  # noqa: E402
from sieve_tasks.encoders import ClipEncoder  # noqa: E402
from sieve_tasks.models import Device  # noqa: E402
from sieve_tasks.pool import register_pool  # noqa: E402
from sieve_tasks.runner import caption_shards  # noqa: E402
from sieve_tasks.settings import Settings  # noqa: E402
from sieve_tasks.stages.caption import CLIP_TOKENIZER_PROCESSES, CaptionStage  # noqa: E402
from sieve_tasks.test_models import TINY_BLIP, TINY_CLIP  # noqa: E402

CAPTION_TOKENS = 20
VIEW = 32  # px: both models' views small, so resizing and normalising cost what launching them costs on a GPU


def alt_texts(count: int, seed: int) -> list[str]:
    """Web-like alt-texts: 3–25 words from a Zipf-distributed vocabulary of made-up words (so open_clip's
    per-word cache hits often, but not always), some with HTML entities and capitals."""
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
                  for _ in range(30_000)]
    texts = []
    for index in range(count):
        words = [vocabulary[min(int(rng.paretovariate(0.7)) - 1, len(vocabulary) - 1)] for _ in range(rng.randint(3, 25))]
        text = " ".join(words)
        texts.append(text.title() + " &amp; Co." if index % 7 == 0 else text)
    return texts


def write_shard(directory: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index, text in enumerate(alt_texts(count, seed)):
            image = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40 + index % 9, 48 + index % 5, 3), dtype=np.uint8)).save(image, "JPEG")
            key, url = f"{index:09d}", f"https://example.com/host-cost/{index}.jpg"
            record = {"uid": hashlib.md5(url.encode()).hexdigest(), "key": key, "url": url, "caption": text}
            for ext, payload in (("jpg", image.getvalue()), ("txt", text.encode()), ("json", json.dumps(record).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (directory / "00000000.tar").write_bytes(buffer.getvalue())


class CannedDecoder:
    """Stands in for BLIP's decoder: 8 captions of random vocabulary tokens per image, at no cost."""

    def __init__(self, tokenizer, num_captions: int):
        self.num_captions = num_captions
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(1_000, len(tokenizer) - 1, (4096 * num_captions, CAPTION_TOKENS), generator=generator)
        self.tokens[:, 0] = tokenizer.bos_token_id
        self.tokens[:, CAPTION_TOKENS - 3 :] = tokenizer.pad_token_id

    def generate(self, pixel_values: torch.Tensor, prompt_ids, settings, seed: int) -> torch.Tensor:
        return self.tokens[: pixel_values.shape[0] * self.num_captions]


class FreeClipNetwork(torch.nn.Module):
    """Stands in for CLIP's network: unit vectors at no cost."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.ones((pixels.shape[0], self.dim))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.ones((tokens.shape[0], self.dim))


def models(settings: Settings, tokenizer_processes: int) -> tuple[BlipCaptioner, ClipEncoder]:
    device = Device.choose("cpu", "fp32")
    captioner = BlipCaptioner(TINY_BLIP, device, settings)
    captioner.fast = CannedDecoder(captioner.tokenizer, settings.num_captions)
    clip = ClipEncoder(TINY_CLIP, device, settings.embed_batch_size, tokenizer_processes)
    clip.model = FreeClipNetwork(clip.dim)
    clip.view = dataclasses.replace(clip.view, size=VIEW)
    return captioner, clip


def measure(pool: Path, work: Path, settings: Settings, captioner, clip) -> tuple[float, float, float]:
    """(seconds, consumer CPU seconds, process CPU seconds) of the caption stage over the pool."""
    run = tempfile.mkdtemp(dir=work)
    stage = CaptionStage(run, settings, captioner=captioner, clip=clip)
    shards = register_pool(str(pool), run)
    stage.image_pass = _torchvision_pass(stage.image_pass)
    clip.tokenize(["started"]).result()  # tokenizer processes (if any) running before the clock starts
    wall, main, process = time.perf_counter(), time.thread_time(), time.process_time()
    for _ in caption_shards(stage, shards):
        pass
    return time.perf_counter() - wall, time.thread_time() - main, time.process_time() - process


def _torchvision_pass(make):
    def image_pass():
        images = make()
        images.jpeg_decoder = "torchvision"  # the CUDA path's Python: batched decode call, tensor resize
        return images
    return image_pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clip-tokenizer-processes", type=int, default=CLIP_TOKENIZER_PROCESSES,
                    help=f"0: CLIP tokenises in the consumer thread, as on CPU (default {CLIP_TOKENIZER_PROCESSES}, as on CUDA)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="sieve-host-cost-") as tmp:
        pool, work = Path(tmp, "pool"), Path(tmp)
        pool.mkdir()
        write_shard(pool, args.samples)
        settings = Settings(profile="test", captioner=TINY_BLIP, clip=TINY_CLIP, caption_batch_size=args.batch,
                            image_size=VIEW, decode_workers=1, score="fused")
        captioner, clip = models(settings, args.clip_tokenizer_processes)
        measure(pool, work, settings, captioner, clip)  # warm-up: tokenizer caches, allocator
        runs = [measure(pool, work, settings, captioner, clip) for _ in range(args.repeats)]
    seconds = statistics.median(r[0] for r in runs)
    consumer = statistics.median(r[1] for r in runs) / args.samples * 1e6
    process = statistics.median(r[2] for r in runs) / args.samples * 1e6
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}; {args.samples} samples, batch {args.batch}, "
          f"CLIP tokenizer processes {args.clip_tokenizer_processes}, median of {args.repeats}")
    print(f"caption stage with free models: {args.samples / seconds:.0f} samples/s; CPU per sample: consumer thread "
          f"{consumer:.0f} µs, rest of the process {process - consumer:.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
