"""Tiny randomly initialised captioner and CLIP for ``--profile test`` and the test suite.

They are built from configs (never downloaded), with real tokenizers: BERT's vocabulary from the packaged
all-MiniLM-L6-v2 for BLIP and open_clip's bundled CLIP BPE. They exercise the real loading and inference
code; their captions and CLIP scores are meaningless, which every output that used them says.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sieve_tasks.models import DEFAULT_TEXT_ENCODER, cache_dir, materialize

TINY_BLIP = "test:tiny-blip"
TINY_CLIP = "test:tiny-clip"
_VERSION = "1"  # bump when the tiny architectures change


def is_test_model(ref: str) -> bool:
    return ref in (TINY_BLIP, TINY_CLIP)


def tiny_model_dir(ref: str) -> Path:
    """Build (once, deterministically) and return the local directory of a tiny test model."""
    builders = {TINY_BLIP: _build_tiny_blip, TINY_CLIP: _build_tiny_clip}
    target = cache_dir() / "test-models" / f"{ref.removeprefix('test:')}-v{_VERSION}"
    if not (target / ".complete").exists():
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        builders[ref](staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        (target / ".complete").touch()
    return target


def _build_tiny_blip(directory: Path) -> None:
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration

    tokenizer = BertTokenizerFast.from_pretrained(materialize(DEFAULT_TEXT_ENCODER))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    text_config = {
        "vocab_size": len(tokenizer), "hidden_size": 32, "encoder_hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
        "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": tokenizer.sep_token_id, "eos_token_id": tokenizer.sep_token_id,
    }
    vision_config = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 384, "patch_size": 32,
    }
    config = BlipConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _build_tiny_clip(directory: Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{directory}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors"))
