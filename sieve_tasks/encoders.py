"""Sentence encoder (sentence-transformers) and CLIP (open_clip) wrappers returning unit vectors, one tensor
per batch (never a Python float per component)."""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from pickle import UnpicklingError

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sieve_tasks.image_pass import ImageView
from sieve_tasks.int8 import quantize_linears
from sieve_tasks.models import Device, loads_alone, materialize
from sieve_tasks.test_models import is_test_model, tiny_model_dir

PAD_TO = 8  # on CUDA, batch widths are multiples of this: few distinct shapes, tensor-core friendly
# cuDNN's attention builds a plan for every new shape: with one batch width per length bucket that costs more
# than it saves, so the sentence encoder uses the others
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

class TextEncoder:
    """Normalised sentence embeddings through sentence-transformers' modules: each distinct text once, in one
    pass over a shard sorted by token length.

    ``int8=True`` swaps the model's linear layers for :class:`sieve_tasks.int8.Int8Linear` (CPU only)."""

    @loads_alone
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
        self.device = device
        self.dim = self.model.get_embedding_dimension()
        # the fast tokenizer's native part, called directly: transformers' Python conversion of each text's encoding
        # into dicts costs more than the native tokenisation on a many-core machine
        self.word_pieces = copy.deepcopy(self.model.tokenizer.backend_tokenizer)
        self.word_pieces.no_padding()
        self.word_pieces.enable_truncation(self.model.max_seq_length)

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors; repeated texts (captions repeat a lot) are encoded once."""
        first_seen: dict[str, int] = {}  # a dict, not np.unique: sorting Python strings costs more than hashing
        inverse = np.fromiter((first_seen.setdefault(text, len(first_seen)) for text in texts), np.int64, len(texts))
        return self._encode_distinct(list(first_seen))[inverse]

    def _encode_distinct(self, texts: list[str]) -> np.ndarray:
        """All texts tokenised in one call (the fast tokenizer works in native threads without the GIL), then
        batches of similar token length, padded with numpy, through the model: no thread doing Python work
        beside the one launching the model, which would make it wait for the GIL at every operation."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        ids = [encoding.ids for encoding in self.word_pieces.encode_batch_fast(texts)]
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        order = np.argsort(-lengths, kind="stable")
        vectors: list[torch.Tensor] = []
        on_cuda = torch.device(self.device.device).type == "cuda"
        pad_to = PAD_TO if on_cuda else 1  # on CPU every padded token costs its full share of the matmuls
        with torch.inference_mode(), sdpa_kernel(ATTENTION_BACKENDS) if on_cuda else contextlib.nullcontext():
            for start in range(0, len(texts), self.batch_size):
                chosen = order[start : start + self.batch_size]
                width = -(-int(lengths[chosen[0]]) // pad_to) * pad_to
                batch = np.full((len(chosen), width), self.model.tokenizer.pad_token_id, np.int64)
                for row, index in enumerate(chosen):
                    batch[row, : lengths[index]] = ids[index]
                input_ids = torch.from_numpy(batch)
                features = {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids),
                            "attention_mask": torch.from_numpy(np.arange(width) < lengths[chosen, None]).long()}
                features = {k: v.to(self.device.device, non_blocking=True) for k, v in features.items()}
                embedded = self.model(features)["sentence_embedding"]
                vectors.append(torch.nn.functional.normalize(embedded.float(), p=2, dim=1))
        out = np.empty((len(texts), self.dim), np.float32)
        out[order] = torch.cat(vectors).cpu().numpy()  # one copy off the device per shard
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
    """open_clip's image and text towers, unit vectors out. ``tokenizer_processes`` > 0 tokenises alt-texts in that
    many worker processes: open_clip's tokenizer is pure Python (~100 µs a text), which on a GPU run would hold the
    interpreter lock of the process that feeds the accelerator."""

    @loads_alone
    def __init__(self, ref: str, device: Device, batch_size: int, tokenizer_processes: int = 0):
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
        self.tokenizer_name = name
        self.tokenizer_processes = tokenizer_processes
        self._tokenizing: ProcessPoolExecutor | None = None
        if tokenizer_processes:
            self._start_tokenizers()  # they load while the captioner loads
        self.device = device
        self.batch_size = batch_size
        self.view = _image_view(ref, self.model.visual.preprocess_cfg)
        self.dim = int(self.model.visual.output_dim)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit float32 image vectors of uint8 views ``(n, 3, S, S)`` (:attr:`view`), on the model's device."""
        with torch.inference_mode():
            return _unit(self.model.encode_image(self.view.normalize(pixels.to(self.device.device), self.device.dtype)))

    def tokenize(self, texts: list[str]) -> Future[np.ndarray]:
        """open_clip's tokens of ``texts`` ``(n, context_length)``: ready now, or soon from the worker processes
        (ask early, collect when the tokens are needed)."""
        if self.tokenizer_processes == 0:
            done: Future[np.ndarray] = Future()
            done.set_result(self.tokenizer(texts).numpy())
            return done
        if self._tokenizing is None:
            self._start_tokenizers()
        return self._tokenizing.submit(_tokenize, texts)

    def _start_tokenizers(self) -> None:
        self._tokenizing = ProcessPoolExecutor(self.tokenizer_processes, multiprocessing.get_context("spawn"),
                                               initializer=_load_tokenizer, initargs=(self.tokenizer_name,))
        for _ in range(self.tokenizer_processes):  # processes start on demand: ask for all of them now
            self._tokenizing.submit(_tokenize, [])

    def encode_tokens(self, tokens: np.ndarray) -> torch.Tensor:
        """Unit float32 text vectors of :meth:`tokenize`'s tokens, on the model's device."""
        chunks = []
        for start in range(0, len(tokens), self.batch_size):
            chunk = torch.from_numpy(tokens[start : start + self.batch_size]).to(self.device.device, non_blocking=True)
            with torch.inference_mode():
                chunks.append(_unit(self.model.encode_text(chunk)))
        return torch.cat(chunks) if chunks else torch.zeros((0, self.dim))

    def close(self) -> None:
        """Stop the tokenizer processes (they start again when next needed), without waiting for them to exit:
        a process that imported torch takes about a second to, and the task is done with them."""
        if self._tokenizing is not None:
            self._tokenizing.shutdown(wait=False, cancel_futures=True)
            self._tokenizing = None


_PROCESS_TOKENIZER = None  # a tokenizer process's open_clip tokenizer


def _load_tokenizer(name: str) -> None:
    global _PROCESS_TOKENIZER
    import open_clip

    torch.set_num_threads(1)
    _PROCESS_TOKENIZER = open_clip.get_tokenizer(name)


def _tokenize(texts: list[str]) -> np.ndarray:
    return _PROCESS_TOKENIZER(texts).numpy()


def _image_view(ref: str, cfg: dict) -> ImageView:
    """CLIP's preprocessing as an :class:`ImageView`; only open_clip's resize-shortest + centre crop is supported."""
    size = cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    if size[0] != size[1] or cfg.get("resize_mode", "shortest") != "shortest" or cfg.get("interpolation",
                                                                                          "bicubic") != "bicubic":
        raise ValueError(f"CLIP {ref}: preprocessing {cfg} is not supported (square size, resize_mode 'shortest', "
                         "bicubic interpolation)")
    return ImageView(size[0], tuple(cfg["mean"]), tuple(cfg["std"]))


def _unit(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True)
