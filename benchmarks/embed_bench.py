"""Embed stage: sentences/s of our text encoding vs the official code's pattern.

    .venv/bin/python benchmarks/embed_bench.py [--samples 2000 --repeat-rate 0.5 --repeats 3]

Baseline, as SIEVE's official code embeds: one `SentenceTransformer.encode` call per batch of samples
(its alt-texts, then its 8 captions each), every text encoded as it comes. Ours: the embed stage's
encoder over the whole shard at once — identical texts encoded once, one length-sorted pass — in fp32
and with int8 linear layers (`sieve --int8`), whose deviation from fp32 is printed: |cosine - fp32| of every
alt-text/caption pair, and how much of the top 20 % by SIEVE score (max over captions) stays the same.
Captions are drawn from a pool of distinct sentences; `--repeat-rate` is the share of captions that
repeat an earlier one (BLIP's 8 samples of one image often coincide; real rates depend on the captioner,
so the figure is printed for several rates). Same process, same machine; medians of repeated runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SUBJECTS = ["a man", "a woman", "a dog", "a cat", "two children", "a red car", "an old building", "a bowl of soup",
            "a mountain", "a group of people", "a bird", "a wooden table", "a bicycle", "a plate of food", "a boat"]
ACTIONS = ["standing next to", "sitting on", "walking along", "in front of", "on top of", "near", "behind",
           "looking at", "holding", "under"]
OBJECTS = ["a river", "the beach", "a white wall", "a city street", "a green field", "a kitchen counter",
           "a snowy road", "the sky", "a tree", "a wooden fence", "a large window", "a stone bridge"]


def sentences(count: int, rng: random.Random) -> list[str]:
    out = []
    while len(out) < count:
        text = f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(OBJECTS)}"
        if rng.random() < 0.5:
            text += f" with {rng.choice(OBJECTS)}"
        out.append(text + f" {len(out)}")  # the counter keeps them distinct
    return out


def workload(samples: int, captions: int, repeat_rate: float, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    fresh = iter(sentences(samples * (captions + 1), rng))
    alts = [next(fresh) for _ in range(samples)]
    seen: list[str] = []
    caps = []
    for _ in range(samples):
        row = []
        for _ in range(captions):
            text = rng.choice(seen) if seen and rng.random() < repeat_rate else next(fresh)
            seen.append(text)
            row.append(text)
        caps.append(row)
    return alts, caps


def baseline(model, alts, caps, batch: int) -> None:
    for start in range(0, len(alts), batch):
        model.encode(alts[start:start + batch], normalize_embeddings=True, batch_size=batch, show_progress_bar=False)
        flat = [c for row in caps[start:start + batch] for c in row]
        model.encode(flat, normalize_embeddings=True, batch_size=batch, show_progress_bar=False)


def ours(encoder, alts, caps):
    return encoder.encode(alts + [c for row in caps for c in row])


def cosines(vectors, samples: int):
    """alt-text vs each of its 8 captions, as the score stage compares them."""
    import numpy as np

    alt, caps = vectors[:samples], vectors[samples:].reshape(samples, 8, -1)
    return np.einsum("sd,scd->sc", alt, caps)


def top_overlap(reference, other, fraction: float = 0.2) -> float:
    """Share of the top ``fraction`` of samples by SIEVE score (max over captions) that both scorings keep."""
    import numpy as np

    keep = int(len(reference) * fraction)
    top = [set(np.argsort(-scores.max(1), kind="stable")[:keep]) for scores in (reference, other)]
    return len(top[0] & top[1]) / keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat-rate", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    from sieve_tasks.encoders import TextEncoder
    from sieve_tasks.models import DEFAULT_TEXT_ENCODER, Device

    encoder = TextEncoder(DEFAULT_TEXT_ENCODER, Device.choose("cpu"), args.batch)
    int8 = TextEncoder(DEFAULT_TEXT_ENCODER, Device.choose("cpu"), args.batch, int8=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; all-MiniLM-L6-v2 fp32 on CPU")
    for rate in args.repeat_rate:
        alts, caps = workload(args.samples, 8, rate)
        texts = args.samples * 9
        times = {"baseline": [], "ours": [], "int8": []}
        outputs = {}
        for _ in range(args.repeats):
            for name, run in (("baseline", lambda: baseline(encoder.model, alts, caps, args.batch)),
                              ("ours", lambda: ours(encoder, alts, caps)), ("int8", lambda: ours(int8, alts, caps))):
                started = time.perf_counter()
                outputs[name] = run()
                times[name].append(time.perf_counter() - started)
        base, mine, quant = (texts / statistics.median(times[k]) for k in ("baseline", "ours", "int8"))
        reference, quantised = cosines(outputs["ours"], args.samples), cosines(outputs["int8"], args.samples)
        deviation = abs(reference - quantised)
        print(f"repeat rate {rate:.1f}: baseline {base:6.0f}/s   ours fp32 {mine:6.0f}/s ({mine / base:.2f}x)   "
              f"ours int8 {quant:6.0f}/s ({quant / base:.2f}x; |cosine - fp32| mean {deviation.mean():.4f}, "
              f"max {deviation.max():.4f}; top-20 % kept set {100 * top_overlap(reference, quantised):.1f} % the same)"
              f"   [{texts} sentences, median of {args.repeats}]")


if __name__ == "__main__":
    main()
