"""All options of a curation run, in one typed object shared by the CLI, the stages and the DAGs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from sieve_tasks.models import DEFAULT_CAPTIONER, DEFAULT_CLIP, DEFAULT_TEXT_ENCODER
from sieve_tasks.shards import DEFAULT_MAX_PIXELS
from sieve_tasks.test_models import TINY_BLIP, TINY_CLIP

PROFILES = ("default", "test")
SCORES = ("sieve", "clip", "fused")
EMBEDDINGS = ("fp32", "fp16", "none")  # what the caption and embed stages store of their vectors
POPULATIONS = ("scored", "metadata")
EXTERNAL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# The settings that change each per-shard stage's output (its completion-marker fingerprint); the Airflow
# pod check uses them too, to prove a pod receives every one of them.
CAPTION_SETTINGS = (
    "captioner", "captions", "num_captions", "top_p", "min_length", "max_length", "repetition_penalty", "prompt",
    "image_size", "seed", "max_pixels", "clip_from_metadata", "caption_batch_size", "fast_decode",
    "int8", "metadata_joined", "clip", "embeddings",
)
EMBED_SETTINGS = ("text_encoder", "mask_phrases", "mask_mode", "int8", "embeddings")
SCORE_SETTINGS = ("mask_phrases", "mask_mode", "clip_from_metadata", "metadata_joined")
# Options added after runs were first written, with the value that means "as before".
ADDED_OPTIONS = {"int8": False, "metadata_joined": False}
DEFAULT_FRACTION = 0.2  # SIEVE's example: keep the top 20 %
METADATA_CLIP_COLUMNS = {"b32": "clip_b32_similarity_score", "l14": "clip_l14_similarity_score"}


@dataclass
class Settings:
    profile: str = "default"
    # caption stage
    captioner: str = DEFAULT_CAPTIONER
    captions: str | None = None  # parquet (uid, captions); "{shard}" in the path means one file per shard
    num_captions: int = 8
    top_p: float = 0.9
    min_length: int = 5
    max_length: int = 20
    repetition_penalty: float = 1.1
    prompt: str = "a picture of "
    fast_decode: bool = True  # sieve_tasks.fast_blip.FastBlipDecoder instead of transformers' generate
    image_size: int = 224
    caption_batch_size: int | None = None  # None: 8 on CPU, from the GPU's free memory on CUDA
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_workers: int | None = None  # None: one per core
    # captions reused across runs by image content (sieve_tasks.caption_cache); not fingerprinted: a cached
    # caption is a caption the same settings wrote, so finished shards stay valid with or without it
    caption_cache: str | None = None
    # embed stage
    text_encoder: str = DEFAULT_TEXT_ENCODER
    clip: str = DEFAULT_CLIP  # "none" turns CLIP off
    clip_from_metadata: str | None = None  # "b32" | "l14": use DataComp's precomputed column
    metadata: str | None = None  # DataComp's metadata/ (per-uid parquet), joined by uid at aggregate
    mask_phrases: str = "medium"
    mask_mode: str = "substring"
    embed_batch_size: int = 256
    embeddings: str = "fp16"  # the vectors stored beside the scores: fp32, fp16 or none (scores never depend on it)
    device: str = "auto"
    dtype: str = "auto"
    int8: bool = False  # int8 linear layers in the captioner and sentence encoder (CPU): faster, slightly off fp32
    # selection
    score: str = "sieve"
    weights: dict[str, float] = field(default_factory=lambda: {"sieve": 0.5, "clip": 0.5})
    fraction: float | None = None
    threshold: float | None = None
    thresholds_from: str | None = None
    basic_filter: bool = False
    external_scores: dict[str, str] = field(default_factory=dict)  # NAME -> "URI:COLUMN" (per-uid parquet)
    population: str = "scored"  # N of the fraction rule: unique scored samples, or every uid of the score's table
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; choose one of {list(PROFILES)}")
        for name, spec in self.external_scores.items():
            split_external_spec(name, spec)
        if self.score not in self.score_names:
            raise ValueError(f"unknown score {self.score!r}; choose one of {list(self.score_names)}")
        if self.embeddings not in EMBEDDINGS:
            raise ValueError(f"unknown --embeddings {self.embeddings!r}; choose one of {list(EMBEDDINGS)}")
        if self.population not in POPULATIONS:
            raise ValueError(f"unknown population {self.population!r}; choose one of {list(POPULATIONS)}")
        if self.clip_from_metadata is not None and self.clip_from_metadata not in METADATA_CLIP_COLUMNS:
            raise ValueError(f"--clip-from-metadata must be one of {sorted(METADATA_CLIP_COLUMNS)}")
        if self.profile == "test":
            self.captioner = TINY_BLIP
            if self.clip != "none":
                self.clip = TINY_CLIP
        for name in ("fraction", "threshold", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not _finite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        chosen = [x is not None for x in (self.fraction, self.threshold, self.thresholds_from)]
        if sum(chosen) > 1:
            raise ValueError("give only one of --fraction, --threshold, --thresholds-from")
        if not any(chosen):
            self.fraction = DEFAULT_FRACTION
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.score == "fused":
            unknown = set(self.weights) - set(self.score_names) | set(self.weights) & {"fused"}
            if unknown:
                raise ValueError(f"unknown weight names {sorted(unknown)}; use sieve, clip or an --external-score name")
            bad = {name: w for name, w in self.weights.items() if not _finite(w) or not 0.0 <= w <= 1.0}
            if bad:
                raise ValueError(f"fusion weights must be finite numbers in [0, 1], got {bad}")
            if abs(sum(self.weights.values()) - 1.0) > 1e-9:
                raise ValueError(f"fusion weights must sum to 1.0, got {sum(self.weights.values())} from {self.weights}")
        if "clip" in self.selected_scores and not self.clip_enabled:
            raise ValueError(f"--score {self.score} needs CLIP: drop --clip none or use --clip-from-metadata")
        if self.population == "metadata" and self.thresholds_from is None:
            from_tables = set(self.external_scores) | ({"clip"} if self.metadata_clip else set())
            if not set(self.selected_scores) <= from_tables:
                raise ValueError("--population metadata counts the uids of a per-uid table: the selected score must "
                                 "come from --metadata (--clip-from-metadata) or an --external-score, not "
                                 f"{sorted(set(self.selected_scores) - from_tables)}")
        if self.int8 and self.dtype in ("fp16", "bf16"):
            raise ValueError(f"--int8 replaces the linear layers' fp32 math; it cannot be combined with --dtype {self.dtype}")
        for name in ("num_captions", "caption_batch_size", "embed_batch_size", "decode_workers", "max_pixels",
                     "max_length", "image_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        # the ranges transformers' generate accepts: the fast decoder would otherwise decode garbage silently (a
        # penalty of 0 gives empty captions, a negative one rewards repeats, top_p < 0 is greedy)
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be above 0, got {self.repetition_penalty}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.min_length < 0:
            raise ValueError(f"min_length must be at least 0, got {self.min_length}")

    @property
    def score_names(self) -> tuple[str, ...]:
        return SCORES + tuple(sorted(self.external_scores))

    @property
    def selected_scores(self) -> tuple[str, ...]:
        """The score columns the selection reads: the fused weights' names, or the one score."""
        return tuple(sorted(self.weights)) if self.score == "fused" else (self.score,)

    @property
    def metadata_joined(self) -> bool:
        """Per-shard stages leave DataComp's metadata to aggregate's join (the URI itself changes no shard output)."""
        return self.metadata is not None

    @property
    def metadata_clip(self) -> bool:
        return self.metadata is not None and self.clip_from_metadata is not None

    @property
    def clip_enabled(self) -> bool:
        return self.clip != "none" or self.clip_from_metadata is not None

    @property
    def computes_clip(self) -> bool:
        """CLIP runs in the image pass (the caption stage) unless it is off or DataComp's score is used."""
        return self.clip != "none" and self.clip_from_metadata is None

    def required_models(self, stages: tuple[str, ...] = ("caption", "embed")) -> dict[str, str | None]:
        """The models the given stages will load (kind → reference; None where a stage needs none)."""
        return {"captioner": self.captioner if "caption" in stages and self.captions is None else None,
                "text_encoder": self.text_encoder if "embed" in stages else None,
                "clip": self.clip if "caption" in stages and self.computes_clip else None}

    def fingerprinted(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The settings among ``names`` that a stage's fingerprint covers. Options added later are left out while
        they have their old behaviour (``ADDED_OPTIONS``), so upgrading does not recompute finished runs."""
        return {name: value for name, value in self.subset(*names).items()
                if name not in ADDED_OPTIONS or value != ADDED_OPTIONS[name]}

    def subset(self, *names: str) -> dict[str, Any]:
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def split_external_spec(name: str, spec: str) -> tuple[str, str]:
    """``URI:COLUMN`` of an external score table → (URI, COLUMN); the column is after the last ':'."""
    if not EXTERNAL_NAME.match(name) or name in SCORES:
        raise ValueError(f"external score name {name!r} must be lower-case letters, digits and '_' (not {list(SCORES)})")
    uri, _, column = spec.rpartition(":")
    if not uri or not column or "/" in column:
        raise ValueError(f"--external-score {name}={spec!r}: expected NAME=URI:COLUMN")
    return uri, column


def parse_external_scores(items: list[str]) -> dict[str, str]:
    """``["flyt=s3://b/flyt/:score", ...]`` → ``{"flyt": "s3://b/flyt/:score"}`` (each name once)."""
    scores: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            raise ValueError(f"--external-score {item!r}: expected NAME=URI:COLUMN")
        if name in scores:
            raise ValueError(f"--external-score {name} given twice")
        split_external_spec(name, spec)
        scores[name] = spec
    return scores


def fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_weights(spec: str) -> dict[str, float]:
    """``sieve=0.5,clip=0.5`` → ``{"sieve": 0.5, "clip": 0.5}``."""
    weights: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"weights must look like sieve=0.5,clip=0.5, got {spec!r}")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"weight {name!r} is not a number: {value!r}") from None
    return weights
