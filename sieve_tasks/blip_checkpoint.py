"""BLIP's original checkpoints (``model_base_14M.pth`` and kin) as a ``BlipForConditionalGeneration``.

SIEVE's official code captions with salesforce/BLIP's ``blip_decoder(pretrained=<.pth>, image_size=224)``: a
``torch.save``d ``{"model": state_dict}`` in BLIP's own naming (``visual_encoder.*`` from its ``models/vit.py``,
``text_decoder.*`` from its ``models/med.py``) that also holds pretraining-only entries. Here such a file becomes a
normal transformers model plus tokenizer, so the fast decoder and ``generate`` run it unchanged:

* the file is read with ``torch.load(weights_only=True)`` (a pickled object is refused);
* ``visual_encoder.*`` is renamed to transformers' ``vision_model.*`` (the names of transformers' own BLIP conversion
  script), ``text_decoder.*`` keeps its names; everything else (text encoder, momentum encoders, queues, ITM/ITC
  heads) is ignored and listed in the log;
* the position embeddings are resized to the input grid the way BLIP's ``interpolate_pos_embed`` does, and only when
  the checkpoint's grid differs;
* the architecture is BLIP base (BLIP's ``configs/med_config.json`` and ViT-B/16 with LayerNorm eps 1e-6) unless a
  ``config.json`` (a ``BlipConfig``) sits beside the file; the tokenizer is BERT-base-uncased (the vocabulary shipped
  with the packaged all-MiniLM-L6-v2) plus BLIP's ``[DEC]`` and ``[ENC]`` unless tokenizer files sit beside it.

Remote files (``s3://``, ``https://`` and the presets) are copied once into ``$SIEVE_CACHE/checkpoints/`` with
their SHA-256 recorded beside them (``<name>.sha256``, ``sha256sum`` format).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError  # the exception only: files are read with torch.load(weights_only=True)
from typing import TYPE_CHECKING, Any

from sieve_tasks import storage
from sieve_tasks.models import DEFAULT_TEXT_ENCODER, cache_dir, materialize

if TYPE_CHECKING:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BLIP_MODELS_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models"
CHECKPOINT_SUFFIXES = (".pth", ".pt")
# Files that, beside a checkpoint, replace the BLIP-base architecture (config.json) or the default tokenizer.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "special_tokens_map.json")
COMPANION_FILES = ("config.json", *TOKENIZER_FILES)
_CHUNK = 16 << 20  # bytes hashed at a time


@dataclass(frozen=True)
class Preset:
    """A checkpoint salesforce/BLIP publishes. Its README gives no hashes or sizes and none could be verified from
    another source, so both are None: the SHA-256 is computed on first download, logged and recorded beside the
    cached file. Set them here once known; a download that does not match is then refused."""

    url: str
    sha256: str | None = None
    size: int | None = None


PRESETS = {
    # SIEVE's captioner (its README's --model_url): BLIP w/ ViT-B pretrained on 14M pairs.
    "blip-base-14m": Preset(f"{BLIP_MODELS_URL}/model_base_14M.pth"),
    # Named by SIEVE's scripts/slurm_inference.sh: BLIP w/ ViT-B pretrained on 129M pairs.
    "blip-base-129m": Preset(f"{BLIP_MODELS_URL}/model_base.pth"),
    # BLIP w/ ViT-B and CapFilt-L, 129M pairs (the pretraining checkpoint, not the COCO-finetuned captioner).
    "blip-base-capfilt-large": Preset(f"{BLIP_MODELS_URL}/model_base_capfilt_large.pth"),
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is one line and names the file."""


def is_blip_checkpoint(ref: str) -> bool:
    """True for a preset name or a ``.pth``/``.pt`` file reference (local, ``s3://``, ``https://``)."""
    return ref in PRESETS or ref.lower().endswith(CHECKPOINT_SUFFIXES)


# ---------------------------------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint on local disk and its SHA-256 (part of the caption fingerprint)."""

    path: Path
    sha256: str


def fetch_checkpoint(ref: str) -> CheckpointFile:
    """The local file behind ``ref``: a preset's URL, ``s3://`` and ``http(s)://`` files are downloaded once into the
    cache (with ``config.json``/tokenizer files found beside remote non-preset files); local files are used in place."""
    preset = PRESETS.get(ref)
    if preset is not None:
        return _cached_download(preset.url, preset, companions=False)
    if not storage.is_local(ref):
        return _cached_download(ref, Preset(ref), companions=True)
    path = Path(ref.removeprefix("file://")).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"captioner checkpoint not found: {ref}")
    stat = path.stat()
    return CheckpointFile(path, _file_sha256(path, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """SHA-256 of a local file, once per process for a given size and modification time."""
    return _sha256(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_download(uri: str, preset: Preset, *, companions: bool) -> CheckpointFile:
    directory = cache_dir() / "checkpoints" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = directory / storage.basename(uri)
    record = target.with_name(target.name + ".sha256")
    if target.is_file() and record.is_file():
        recorded = record.read_text().split()[0]
        if preset.sha256 is None or recorded == preset.sha256:
            return CheckpointFile(target, recorded)
    directory.mkdir(parents=True, exist_ok=True)
    if companions:
        for name in COMPANION_FILES:
            beside = uri.rsplit("/", 1)[0] + "/" + name
            if storage.exists(beside):
                _download(beside, directory / name)
    log.info("downloading captioner checkpoint %s into %s", uri, directory)
    sha256, size = _download(uri, target, preset)
    storage.write_bytes_atomic(str(record), f"{sha256}  {target.name}\n".encode())
    log.info("captioner checkpoint %s: %d bytes, sha256 %s (recorded in %s)", uri, size, sha256, record)
    return CheckpointFile(target, sha256)


def _download(uri: str, target: Path, expected: Preset | None = None) -> tuple[str, int]:
    """Copy ``uri`` to ``target`` atomically; refuse a size or SHA-256 other than expected (nothing is kept then)."""
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix="-" + target.name)
    os.close(fd)
    try:
        storage.download(uri, partial)
        sha256, size = _sha256(Path(partial)), os.path.getsize(partial)
        if expected is not None and expected.size is not None and size != expected.size:
            raise CheckpointError(f"{uri}: downloaded {size} bytes, expected {expected.size}; nothing was cached")
        if expected is not None and expected.sha256 is not None and sha256 != expected.sha256:
            raise CheckpointError(f"{uri}: sha256 {sha256} does not match the expected {expected.sha256}; "
                                  "nothing was cached")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return sha256, size


# ---------------------------------------------------------------------------------------------------- reading


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")  # torch's weights_only refusal


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of a BLIP checkpoint (a bare state dict is accepted too), tensors only."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as exc:
        if found := _UNSAFE_GLOBAL.search(str(exc)):
            raise CheckpointError(f"{path}: refused, it holds a pickled Python object ({found.group(1)}), not only "
                                  "tensors (checkpoints are read with weights_only=True)") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint (unpickling failed)") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from None
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected {{'model': state_dict}} or a state dict of tensors")
    return state


# ---------------------------------------------------------------------------------------------------- conversion

_VISION_NAMES = {  # BLIP's models/vit.py → transformers' BlipVisionModel
    "visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
    "visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
    "visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual_encoder.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    "visual_encoder.norm.weight": "vision_model.post_layernorm.weight",
    "visual_encoder.norm.bias": "vision_model.post_layernorm.bias",
}
_BLOCK = re.compile(r"visual_encoder\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_BLOCK_PARTS = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
POSITION_EMBEDDING = "vision_model.embeddings.position_embedding"


@dataclass
class Converted:
    """A state dict in transformers' names, what was ignored, and what was not understood."""

    weights: dict[str, torch.Tensor]
    ignored: list[str]
    unknown: list[str]


def to_transformers_names(state: dict[str, torch.Tensor]) -> Converted:
    """Rename the captioner's entries (vision encoder, text decoder); set aside everything else."""
    converted = Converted({}, [], [])
    for key, value in state.items():
        if key in _VISION_NAMES:
            converted.weights[_VISION_NAMES[key]] = value
        elif match := _BLOCK.fullmatch(key):
            layer, part, kind = match.groups()
            converted.weights[f"vision_model.encoder.layers.{layer}.{_BLOCK_PARTS[part]}.{kind}"] = value
        elif key.startswith("text_decoder.") and not key.endswith(".position_ids"):
            converted.weights[key] = value  # BLIP's med.py and transformers' BlipTextLMHeadModel share names
        elif key.startswith("visual_encoder."):
            converted.unknown.append(key)
        else:  # pretraining-only: text_encoder, *_m momentum copies, queues, vision/text projections, itm_head, temp
            converted.ignored.append(key)
    return converted


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """BLIP's ``interpolate_pos_embed``: the class position is kept, the patch positions are resized from the
    checkpoint's square grid to ``grid``×``grid`` (bicubic, ``align_corners=False``); unchanged when the grids match."""
    import torch

    positions, dim = pos_embed.shape[-2] - 1, pos_embed.shape[-1]
    old = math.isqrt(positions)
    if old * old != positions:
        raise CheckpointError(f"position embedding of {positions} patches is not a square grid")
    if old == grid:
        return pos_embed
    log.info("interpolating the position embedding from %dx%d to %dx%d patches", old, old, grid, grid)
    patches = pos_embed[:, 1:].float().reshape(-1, old, old, dim).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat((pos_embed[:, :1], patches), dim=1)


def blip_base_config() -> BlipConfig:
    """BLIP w/ ViT-B: BLIP's configs/med_config.json for the decoder (12 heads, where transformers defaults to 8) and
    its ViT-B/16 (LayerNorm eps 1e-6, where transformers defaults to 1e-5)."""
    from transformers import BlipConfig

    text = {"vocab_size": 30524, "hidden_size": 768, "encoder_hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 512,
            "layer_norm_eps": 1e-12, "hidden_act": "gelu", "bos_token_id": 30522, "pad_token_id": 0,
            "sep_token_id": 102, "eos_token_id": 102}
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "patch_size": 16, "image_size": 224, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
    return BlipConfig(text_config=text, vision_config=vision)


def blip_tokenizer() -> PreTrainedTokenizerBase:
    """BLIP's ``init_tokenizer``: BERT-base-uncased plus ``[DEC]`` (bos) and ``[ENC]``, from the packaged vocabulary."""
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(materialize(DEFAULT_TEXT_ENCODER))
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


# ---------------------------------------------------------------------------------------------------- loading


class BlipCheckpointLoader:
    """Loads a BLIP original-format checkpoint for images of ``image_size`` pixels."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def load(self, ref: str, dtype: torch.dtype) -> tuple[BlipForConditionalGeneration, PreTrainedTokenizerBase]:
        import torch
        from transformers import BlipForConditionalGeneration

        checkpoint = fetch_checkpoint(ref)
        path = checkpoint.path
        config = self._config(path)
        converted = to_transformers_names(read_state_dict(path))
        if converted.unknown:
            raise CheckpointError(f"{path}: vision encoder entries BLIP's ViT does not have: {_few(converted.unknown)}")
        patch = config.vision_config.patch_size
        if self.image_size % patch:
            raise CheckpointError(f"{path}: image size {self.image_size} is not a multiple of the patch size {patch}")
        config.vision_config.image_size = self.image_size
        weights = converted.weights
        if POSITION_EMBEDDING in weights:
            weights[POSITION_EMBEDDING] = interpolate_pos_embed(weights[POSITION_EMBEDDING], self.image_size // patch)
        with torch.device("meta"):
            expected = {k: v.shape for k, v in BlipForConditionalGeneration(config).state_dict().items()}
        self._check(path, weights, expected)
        if converted.ignored:
            groups = sorted(Counter(key.split(".")[0] for key in converted.ignored).items())
            log.info("%s: ignored %d pretraining-only entries: %s", path, len(converted.ignored),
                     ", ".join(f"{prefix} ({count})" for prefix, count in groups))
            log.debug("ignored entries: %s", converted.ignored)
        model = BlipForConditionalGeneration.from_pretrained(None, config=config, state_dict=weights, dtype=dtype)
        tokenizer = self._tokenizer(path, config)
        log.info("captioner: BLIP checkpoint %s (sha256 %s) at %d px", path, checkpoint.sha256, self.image_size)
        return model, tokenizer

    @staticmethod
    def _config(path: Path) -> BlipConfig:
        from transformers import AutoConfig, BlipConfig

        if not (path.parent / "config.json").is_file():
            return blip_base_config()
        config = AutoConfig.from_pretrained(path.parent)
        if not isinstance(config, BlipConfig):
            raise CheckpointError(f"{path.parent / 'config.json'} is a {type(config).__name__}, not a BlipConfig")
        return config

    @staticmethod
    def _check(path: Path, weights: dict[str, Any], expected: dict[str, Any]) -> None:
        tied = {k for k in expected if k.startswith("text_decoder.cls.predictions.decoder.")}  # tied to embeddings
        missing = sorted(set(expected) - set(weights) - tied)
        unexpected = sorted(set(weights) - set(expected))
        wrong = sorted(f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k])}" for k in set(weights) & set(expected)
                       if weights[k].shape != expected[k])
        for problem, keys in (("wrong shape", wrong), ("missing", missing), ("unexpected", unexpected)):
            if keys:
                raise CheckpointError(f"{path}: does not fit the BLIP configuration, {problem}: {_few(keys)}")

    @staticmethod
    def _tokenizer(path: Path, config: BlipConfig) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        beside = any((path.parent / name).is_file() for name in TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(path.parent) if beside else blip_tokenizer()
        if len(tokenizer) != config.text_config.vocab_size:
            raise CheckpointError(f"{path}: the tokenizer has {len(tokenizer)} tokens, the decoder "
                                  f"{config.text_config.vocab_size}")
        return tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _few(keys: list[str], shown: int = 5) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
