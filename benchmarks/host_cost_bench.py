"""What the caption process costs the host per sample when the models cost nothing — the ceiling of a GPU run.

    .venv/bin/python benchmarks/host_cost_bench.py [--samples 4096 --shards 2 --batch 256 --repeats 3]

On a GPU the caption task is bound by its process's one interpreter lock (BENCHMARKS.md §10): the Python that
reads, checks, decodes and resizes each image, turns BLIP's tokens into captions, tokenises alt-texts for CLIP
and builds the rows. This measures that work without a GPU: the caption stage (``CaptionStage(run, settings,
captioner=..., clip=...)``, driven as ``sieve run`` drives it) over DataComp-like shards of small JPEGs (their
decode costs little, as on the GPU) with varied web-like alt-texts, where
  * BLIP is the real :class:`~sieve_tasks.captioner.BlipCaptioner` (tiny test model, real BERT tokenizer) whose
    decoder is replaced by one that returns 8 canned 20-token captions per image at no cost;
  * CLIP is the real :class:`~sieve_tasks.encoders.ClipEncoder` (tiny test model, open_clip's tokenizer) whose
    network returns constant vectors at no cost;
  * JPEGs go through torchvision's decoder and the tensor resize (the path nvJPEG takes on CUDA), one worker,
    to views of 32 px (so resizing and normalising cost about what launching their kernels costs on a GPU).
Two layouts, alternated: everything in the caption process (as on CPU), and with the helpers CUDA runs get (CLIP's
tokenizer and the tar reader in processes of their own). It prints samples/s and CPU µs per sample of the
consumer thread (captions, CLIP, rows), the rest of the process (producer, decode worker) and the helper
processes. On a 2-core machine the helpers compete with the process for cores, so samples/s there understates
what a 16-core GPU host gains; the CPU the caption process spends per sample is the figure that carries over.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import hashlib
import multiprocessing
import os
import random
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
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
from sieve_tasks.stages.embed import EmbedStage  # noqa: E402
from sieve_tasks.stages.score import ScoreStage  # noqa: E402
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


def write_shard(directory: Path, shard: int, count: int) -> None:
    rng = np.random.default_rng(shard)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index, text in enumerate(alt_texts(count, shard)):
            image = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40 + index % 9, 48 + index % 5, 3), dtype=np.uint8)).save(image, "JPEG")
            key, url = f"{shard:05d}{index:04d}", f"https://example.com/host-cost/{shard}/{index}.jpg"
            record = {"uid": hashlib.md5(url.encode()).hexdigest(), "key": key, "url": url, "caption": text}
            for ext, payload in (("jpg", image.getvalue()), ("txt", text.encode()), ("json", json.dumps(record).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (directory / f"{shard:08d}.tar").write_bytes(buffer.getvalue())


NOUNS = ["dog", "cat", "man", "woman", "child", "car", "bus", "house", "tree", "table", "plate of food", "bird",
         "horse", "boat", "bicycle", "street sign", "cake", "pizza", "laptop", "phone", "chair", "couch", "bed", "train",
         "clock", "vase of flowers", "sandwich", "kitchen", "bathroom", "living room", "mountain", "beach", "city",
         "baseball player", "skateboarder", "surfer", "group of people", "giraffe", "elephant", "zebra"]
ADJECTIVES = ["", "", "white", "black", "red", "small", "large", "old", "young", "wooden", "yellow", "blue", "brown"]
PLACES = ["", "", "on a table", "in a field", "on a street", "in a room", "next to a building", "on the beach",
          "in front of a house", "with a white background", "at night", "in the snow", "on a plate"]
PHRASES = ["", "", "", "a photo of ", "an image of ", "a close up of ", "a black and white photo of "]


def captions_like_blip(count: int, seed: int) -> list[str]:
    """English captions of ~5–14 words like BLIP's, about 1 in 5 with a phrase that masking removes; each image's
    8 captions drawn from 4 distinct ones (sampling repeats itself)."""
    rng = random.Random(seed)

    def one() -> str:
        adjective = rng.choice(ADJECTIVES)
        return " ".join(filter(None, [rng.choice(PHRASES) + "a", adjective, rng.choice(NOUNS), rng.choice(PLACES)]))

    captions = []
    for _ in range(count // 8):
        distinct = [one() for _ in range(4)]
        captions += [rng.choice(distinct) for _ in range(8)]
    return captions


class CannedDecoder:
    """Stands in for BLIP's decoder at no cost: the tokens BLIP would give for 8 captions per image (the prompt,
    English words, [SEP], padding to 20 tokens), the next images' captions at each call."""

    def __init__(self, tokenizer, prompt: str, num_captions: int):
        texts = [f"{prompt} {caption}" for caption in captions_like_blip(4096 * num_captions, seed=0)]
        ids = tokenizer(texts, add_special_tokens=False).input_ids
        self.tokens = torch.full((len(texts), CAPTION_TOKENS), tokenizer.pad_token_id)
        for row, caption in enumerate(ids):
            caption = [tokenizer.bos_token_id, *caption[: CAPTION_TOKENS - 2], tokenizer.sep_token_id]
            self.tokens[row, : len(caption)] = torch.tensor(caption)
        self.num_captions = num_captions
        self.next = 0

    def generate(self, pixel_values: torch.Tensor, prompt_ids, settings, seed: int) -> torch.Tensor:
        rows = (self.next + torch.arange(pixel_values.shape[0] * self.num_captions)) % len(self.tokens)
        self.next = int(rows[-1]) + 1
        return self.tokens[rows]


class FreeClipNetwork(torch.nn.Module):
    """Stands in for CLIP's network: unit vectors at no cost."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.ones((pixels.shape[0], self.dim))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.ones((tokens.shape[0], self.dim))


class FreeSentenceNetwork:
    """Stands in for the sentence encoder's network: unit vectors at no cost (the tokenizer stays the real one)."""

    def __init__(self, model, dim: int):
        self.tokenizer = model.tokenizer
        self.dim = dim

    def __call__(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"sentence_embedding": torch.ones((features["input_ids"].shape[0], self.dim))}


_TEXT_ENCODER = None  # the text side process's sentence encoder, loaded once


def text_side(pool: str, run: str, settings: Settings) -> list[float]:
    """[seconds, calling thread's CPU seconds, the process's other threads'] of the embed and score stages over a
    captioned run, in a process of its own as ``sieve run`` has on CUDA (one that never imports open_clip, which
    turns off the tokenizers library's threads)."""
    global _TEXT_ENCODER
    torch.set_num_threads(1)
    embed, score = EmbedStage(run, settings), ScoreStage(run, settings)
    if _TEXT_ENCODER is None:
        _TEXT_ENCODER = embed.text_encoder
        _TEXT_ENCODER.model = FreeSentenceNetwork(_TEXT_ENCODER.model, _TEXT_ENCODER.dim)
    embed._text_encoder = _TEXT_ENCODER
    assert "open_clip" not in sys.modules
    shards = register_pool(pool, run)
    wall, main, process = time.perf_counter(), time.thread_time(), time.process_time()
    for shard in shards:
        embed.run_shard(shard)
        score.run_shard(shard)
    wall, main, process = time.perf_counter() - wall, time.thread_time() - main, time.process_time() - process
    return [wall, main, process - main]


LAYOUTS = {  # name: (CLIP tokenizer processes, tar reader process)
    "all in one process (as on CPU)": (0, False),
    "helper processes (as on CUDA)": (CLIP_TOKENIZER_PROCESSES, True),
}


def models(settings: Settings, tokenizer_processes: int) -> tuple[BlipCaptioner, ClipEncoder]:
    device = Device.choose("cpu", "fp32")
    captioner = BlipCaptioner(TINY_BLIP, device, settings)
    captioner.fast = CannedDecoder(captioner.tokenizer, settings.prompt, settings.num_captions)
    clip = ClipEncoder(TINY_CLIP, device, settings.embed_batch_size, tokenizer_processes)
    clip.model = FreeClipNetwork(clip.dim)
    clip.view = dataclasses.replace(clip.view, size=VIEW)
    return captioner, clip


def write_pool(pool: Path, samples: int, shards: int) -> None:
    pool.mkdir()
    for shard in range(shards):
        write_shard(pool, shard, samples // shards)


def bench_settings(batch: int) -> Settings:
    return Settings(profile="test", captioner=TINY_BLIP, clip=TINY_CLIP, caption_batch_size=batch, image_size=VIEW,
                    decode_workers=1, score="fused")


def caption_stage(work: Path, settings: Settings, captioner, clip, reader_process: bool) -> CaptionStage:
    """A caption stage with these models in a fresh run under ``work``, its image pass on the CUDA path's Python
    (batched decode call, tensor resize; the tar reader in a process of its own if ``reader_process``)."""
    stage = CaptionStage(tempfile.mkdtemp(dir=work), settings, captioner=captioner, clip=clip)
    make_pass = stage.image_pass

    def image_pass():
        images = make_pass()
        images.jpeg_decoder, images.reader_process = "torchvision", reader_process
        return images

    stage.image_pass = image_pass
    return stage


def measure(pool: Path, work: Path, settings: Settings, captioner, clip, reader_process: bool, running: frozenset
            ) -> tuple[str, list[float]]:
    """The run and [seconds, consumer thread's CPU seconds, the rest of the process's, the helper processes'] of the
    caption stage over the pool (``running``: child processes that outlive it)."""
    stage = caption_stage(work, settings, captioner, clip, reader_process)
    run = stage.run
    shards = register_pool(str(pool), run)
    clip.tokenize(["started"]).result()  # tokenizer processes (if any) running before the clock starts
    children = _children_cpu(running | set(multiprocessing.active_children()))  # no other child is exiting now
    wall, main, process = time.perf_counter(), time.thread_time(), time.process_time()
    for _ in caption_shards(stage, shards):
        pass
    wall, main, process = time.perf_counter() - wall, time.thread_time() - main, time.process_time() - process
    return run, [wall, main, process - main, _children_cpu(running) - children]


def _children_cpu(running: frozenset = frozenset()) -> float:
    """CPU seconds of the child processes that ended, after waiting for every child but the ``running`` ones to
    exit (the stage's close() does not wait for CLIP's tokenizer processes)."""
    for child in set(multiprocessing.active_children()) - running:
        child.join()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}; {args.samples} samples in {args.shards} "
          f"shards, batch {args.batch}, median of {args.repeats} (layouts alternated)")
    with tempfile.TemporaryDirectory(prefix="sieve-host-cost-") as tmp:
        pool, work = Path(tmp, "pool"), Path(tmp)
        write_pool(pool, args.samples, args.shards)
        settings = bench_settings(args.batch)
        runs: dict[str, list[list[float]]] = {name: [] for name in LAYOUTS}
        texts: list[list[float]] = []
        with ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as text_process:
            text_process.submit(os.getpid).result()  # started before open_clip's import changes the environment
            running = frozenset(multiprocessing.active_children())
            layouts = {name: (*models(settings, processes), reader) for name, (processes, reader) in LAYOUTS.items()}
            for _, clip, _ in layouts.values():
                clip.close()  # each run starts its own tokenizer processes (if any) and stops them
            _children_cpu(running)
            for repeat in range(args.repeats + 1):  # the first round warms caches and allocators
                for name, (captioner, clip, reader) in layouts.items():
                    run, figures = measure(pool, work, settings, captioner, clip, reader, running)
                    if repeat:
                        runs[name].append(figures)
                figures = text_process.submit(text_side, str(pool), run, settings).result()
                if repeat:
                    texts.append(figures)
        starts = _children_cpu()
        models(settings, CLIP_TOKENIZER_PROCESSES)[1].close()  # what starting the tokenizer processes costs alone
        starts = _children_cpu() - starts
    for name, figures in runs.items():
        seconds, consumer, rest, helpers = (statistics.median(f[i] for f in figures) for i in range(4))
        per_sample = 1e6 / args.samples
        print(f"{name}: {args.samples / seconds:.0f} samples/s with free models; CPU per sample: consumer thread "
              f"{consumer * per_sample:.0f} µs, rest of the process {rest * per_sample:.0f} µs; helper processes "
              f"{helpers:.1f} CPU-s a run")
    seconds, caller, others = (statistics.median(f[i] for f in texts) for i in range(3))
    print(f"text side (embed + score, a process of its own): {args.samples / seconds:.0f} samples/s with a free "
          f"sentence encoder network; CPU per sample: calling thread {caller * per_sample:.0f} µs, the tokenizer's "
          f"other threads {others * per_sample:.0f} µs")
    print(f"(of the helpers' CPU, starting the {CLIP_TOKENIZER_PROCESSES} tokenizer processes — spawned, importing "
          f"open_clip — takes {starts:.1f} CPU-s; the stage restarts them for each run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
