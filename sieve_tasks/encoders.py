"""Sentence encoder (sentence-transformers) and CLIP (open_clip) wrappers returning unit vectors."""

from __future__ import annotations

import os
from pickle import UnpicklingError

import numpy as np
import torch
from PIL import Image

from sieve_tasks.int8 import quantize_linears
from sieve_tasks.models import Device, materialize
from sieve_tasks.test_models import is_test_model, tiny_model_dir


def _encode_unique(texts: list[str], encode) -> np.ndarray:
    """Encode each distinct text once (captions repeat a lot) and spread the vectors back."""
    unique, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True)
    return np.asarray(encode(list(unique)), dtype=np.float32)[inverse.reshape(-1)]


class TextEncoder:
    """Normalised sentence embeddings through sentence-transformers; one length-sorted pass over a shard.

    ``int8=True`` swaps the model's linear layers for :class:`sieve_tasks.int8.Int8Linear` (CPU only)."""

    def __init__(self, ref: str, device: Device, batch_size: int, *, int8: bool = False):
        from sentence_transformers import SentenceTransformer

        if ref.startswith("onnx-int8:"):
            raise ValueError(f"text encoder {ref!r}: the int8 ONNX route was replaced by --int8 (faster here)")
        self.model = SentenceTransformer(materialize(ref), device=device.device)
        if device.dtype != torch.float32:
            self.model = self.model.to(device.dtype)
        if int8:
            quantize_linears(self.model)
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        return _encode_unique(texts, lambda unique: self.model.encode(
            unique, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False))


def open_clip_name(ref: str) -> tuple[str, str | None]:
    """An open_clip (model name, pretrained) pair for a CLIP reference.

    ``ViT-B-32:openai`` (name:pretrained tag or checkpoint file), a local directory or ``s3://`` prefix
    holding ``open_clip_config.json`` + weights, or the ``test:tiny-clip`` model.
    """
    if is_test_model(ref):
        return f"local-dir:{tiny_model_dir(ref)}", None
    if ref.startswith("s3://"):
        return f"local-dir:{materialize(ref)}", None
    if os.path.isdir(ref):
        return f"local-dir:{ref}", None
    name, sep, pretrained = ref.partition(":")
    if not sep or not name:
        raise ValueError(f"CLIP reference {ref!r} must be NAME:PRETRAINED (e.g. ViT-B-32:openai), a directory, "
                         "an s3:// prefix or 'none'")
    return name, pretrained


class ClipEncoder:
    def __init__(self, ref: str, device: Device, batch_size: int):
        import open_clip

        name, pretrained = open_clip_name(ref)
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device.device, weights_only=True
            )
        except UnpicklingError:
            raise ValueError(f"CLIP checkpoint {pretrained or name} refused: it holds pickled objects, and only plain "
                             "tensors are loaded (weights_only)") from None
        self.model = self.model.to(device.dtype).eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device = device
        self.batch_size = batch_size

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            features = self.model.encode_image(pixels.to(self.device.device, self.device.dtype))
        return _unit(features)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start : start + self.batch_size]).to(self.device.device)
            with torch.inference_mode():
                chunks.append(_unit(self.model.encode_text(tokens)))
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

    def transform(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess(image)


def _unit(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    return (features / features.norm(dim=-1, keepdim=True)).cpu().numpy()
