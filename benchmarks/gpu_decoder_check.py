"""One-shot GPU check of FastBlipDecoder: throughput with CUDA graphs off/on, and bf16-with-graphs vs fp32.

    .venv/bin/python benchmarks/gpu_decoder_check.py            # on the GPU machine (about a minute on one H100)
    .venv/bin/python benchmarks/gpu_decoder_check.py --tiny     # dry run on CPU: tiny model, a couple of images

Full-size BLIP base from ``BlipConfig()`` with seeded random weights (random weights rarely emit [SEP], so captions
run to max_length: the worst case), random 224 px pixels, SIEVE's settings (8 captions, top_p 0.9, min_length 5,
max_length 20, repetition_penalty 1.1, prompt "[CLS] a picture of [SEP]"). Prints img/s of ``generate`` for each batch
size with (a) the step-by-step loop (syncs per step, no graphs), (b) sync-free without graphs, (c) sync-free with CUDA
graphs, (d) with SDPA attention and its sampling candidates from fp32 scores of the whole vocabulary, (e) candidates
from the raw logits with torch's own SDPA kernels, (f) the same with SDPA kept off cuDNN's kernel, (g) the default:
each shape captured with both and the faster replay kept (the replay times and the choice are printed), next to the
vision encoder alone and the decoder alone (total minus vision). Then the total variation distance
between the next-token sampling distributions of bf16 with graphs and of fp32, teacher-forced along fp32 captions.
Every part runs in its own try/except: a failure prints its traceback and the script goes on.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sieve_tasks.fast_blip import (  # noqa: E402
    DecodeConfig,
    FastBlipDecoder,
    auto_caption_batch_size,
    next_token_distributions,
)

PROMPT_IDS = torch.tensor([[101, 1037, 3861, 1997, 102]])
SIEVE = DecodeConfig(num_return_sequences=8, top_p=0.9, min_length=5, max_length=20, repetition_penalty=1.1)
TINY_TEXT = {"vocab_size": 4000, "hidden_size": 96, "encoder_hidden_size": 48, "intermediate_size": 192,
             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 40,
             "bos_token_id": 3999, "pad_token_id": 0, "sep_token_id": 102, "eos_token_id": 102}
TINY_VISION = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 3,
               "image_size": 384, "patch_size": 32}
VARIANTS = {"step-by-step, matmul": dict(sync_free=False, cuda_graphs=False, sdpa_text=False),
            "sync-free, matmul": dict(sync_free=True, cuda_graphs=False, sdpa_text=False),
            "sync-free + graphs, matmul": dict(sync_free=True, cuda_graphs=True, sdpa_text=False),
            # top-k over fp32 scores of the whole vocabulary was ~20 % of a decode on the H100; what it was then:
            "sync-free + graphs + SDPA, fp32 top-k": dict(sync_free=True, cuda_graphs=True, sdpa_text=True,
                                                          candidates_from_logits=False),
            "sync-free + graphs + SDPA": dict(sync_free=True, cuda_graphs=True, sdpa_text=True, attention=("sdpa",)),
            # cuDNN's fused attention took 29 % of a decode on the H100 (BENCHMARKS.md §10): the same without it
            "sync-free + graphs + SDPA, no cuDNN": dict(sync_free=True, cuda_graphs=True, sdpa_text=True,
                                                        attention=("sdpa without cudnn",)),
            "default (faster replay kept)": dict()}


def part(name: str, fn) -> None:
    """Run one part; on failure print its traceback and go on."""
    print(f"\n== {name}", flush=True)
    try:
        fn()
    except Exception:  # noqa: BLE001 -- a one-shot check must report every part it can
        traceback.print_exc(file=sys.stdout)
        print(f"== {name}: FAILED (see traceback above)", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny BLIP config and batches (CPU dry run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default=None, help="comma-separated images per batch (default 256,1024)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per batch size and variant")
    ap.add_argument("--tv-images", type=int, default=None, help="images for the total-variation check (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import BlipConfig, BlipForConditionalGeneration

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    low = torch.bfloat16 if cuda else torch.float32  # the CPU dry run checks the code paths, not bf16 numerics
    batches = [int(b) for b in (args.batches or ("2,4" if args.tiny else "256,1024")).split(",")]
    tv_images = args.tv_images or (2 if args.tiny else 16)
    print(f"torch {torch.__version__}; device {device}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""))

    torch.manual_seed(args.seed)
    config = (BlipConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=32) if args.tiny
              else BlipConfig())
    t0 = time.perf_counter()
    model32 = BlipForConditionalGeneration(config).eval().to(device)
    model = copy.deepcopy(model32).to(low)
    print(f"built {'tiny' if args.tiny else 'BlipConfig()'} model, {low} copy, in {time.perf_counter() - t0:.1f}s")
    gen = torch.Generator().manual_seed(args.seed)
    pixels = torch.randn(max(batches + [tv_images]), 3, 224, 224, generator=gen).to(device, low)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    def auto_batch() -> None:
        free = torch.cuda.mem_get_info(device)[0] if cuda else 16 << 30
        size = auto_caption_batch_size(model, free, SIEVE.num_return_sequences, SIEVE.max_length, 197, low)
        print(f"auto_caption_batch_size for {free / 2**30:.1f} GiB free: {size} images")

    def throughput(batch: int) -> None:
        px = pixels[:batch]
        for name, flags in VARIANTS.items():
            dec = FastBlipDecoder(model, **flags)

            def run(dec=dec):
                return dec.generate(px, PROMPT_IDS, SIEVE, seed=args.seed)

            t_first = timed(run)  # warm-up (and graph capture)
            times = [timed(run) for _ in range(args.repeats)]
            with torch.inference_mode():
                t_vis = min(timed(functools.partial(dec.encode_images, px)) for _ in range(args.repeats))
            best = min(times)
            state = "captured" if dec._graphs and any(s.graph is not None for s in dec._graphs.values()) else "none"
            print(f"batch {batch:4d} {name:<36} {batch / best:8.1f} img/s (best of {args.repeats}; first call "
                  f"{t_first:.2f}s) | vision alone {batch / t_vis:8.1f} img/s | decoder alone "
                  f"{batch / max(best - t_vis, 1e-9):8.1f} img/s | graphs: {state}, enabled {dec.cuda_graphs}",
                  flush=True)
            for shape, step in dec._graphs.items():
                if step.replay_ms:
                    print(f"    step {shape}: kept {step.attention}; replay ms {step.replay_ms}", flush=True)
            del dec
            if cuda:
                torch.cuda.empty_cache()

    def variation() -> None:
        px32, px = pixels[:tv_images].float(), pixels[:tv_images]
        tokens = FastBlipDecoder(model32, cuda_graphs=False).generate(px32, PROMPT_IDS, SIEVE, seed=args.seed)
        plen = PROMPT_IDS.shape[1] - 1
        reference, live = next_token_distributions(model32, px32, tokens, plen, SIEVE)
        dec = FastBlipDecoder(model, cuda_graphs=True)
        _, scores = dec.generate(px, PROMPT_IDS, SIEVE, teacher_tokens=tokens, output_scores=True)
        ours = torch.stack(scores, 1).softmax(-1)
        hf_low, _ = next_token_distributions(model, px, tokens, plen, SIEVE)
        graphs = "with graphs" if dec.cuda_graphs else "graphs DISABLED after a failure"
        for label, probs in ((f"FastBlipDecoder {low} {graphs}", ours), (f"transformers {low} forward", hf_low)):
            probs = probs.float()
            tv = (0.5 * (reference - probs).abs().sum(-1))[live]
            top1 = (reference.argmax(-1) == probs.argmax(-1))[live].float().mean()
            print(f"{label} vs fp32 along {int(live.sum())} fp32 caption steps: total variation mean "
                  f"{float(tv.mean()):.4f}, max {float(tv.max()):.4f}; top-1 token equal at {100 * float(top1):.1f} %")

    part("auto batch size", auto_batch)
    for batch in batches:
        part(f"throughput, batch {batch}", lambda b=batch: throughput(b))
    part(f"total variation, {tv_images} images", variation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
