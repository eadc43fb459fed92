"""Score stage: SIEVE's caption-similarity score, CLIPScore and DataComp's basic-filter features per
sample. Writes ``RUN/scores/<shard>.parquet`` (one row per sample read, failed ones included)."""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa

from sieve_tasks.masking import make_masker
from sieve_tasks.settings import SCORE_SETTINGS
from sieve_tasks.shards import Shard
from sieve_tasks.stages.base import InconsistentRun, ShardStage

SCORES_SCHEMA = pa.schema([
    ("uid", pa.string()), ("uid_hi", pa.uint64()), ("uid_lo", pa.uint64()), ("shard", pa.string()),
    ("key", pa.string()), ("position", pa.int64()), ("url", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("sieve_score", pa.float64()), ("sieve_mean", pa.float64()), ("best_caption", pa.string()),
    ("clip_score", pa.float64()), ("language", pa.string()), ("is_english", pa.bool_()),
    ("num_words", pa.int64()), ("num_chars", pa.int64()), ("width", pa.int64()), ("height", pa.int64()),
    ("aspect_ratio", pa.float64()), ("passes_basic_filter", pa.bool_()), ("text_truncated", pa.bool_()),
])


CAPTION_COLUMNS = ["uid", "shard", "key", "position", "url", "text_truncated", "text", "captions", "width", "height",
                   "original_width", "original_height", "metadata_clip_score", "clip_score"]
EMBEDDING_COLUMNS = ["uid", "key", "position", "status", "reason", "caption_similarities"]


@cache
def _language_identifier():
    import gcld3

    return gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)


def detect_language(text: str) -> str:
    """CLD3 (as LAION used it), offline: its model ships inside the ``cld3-py`` wheel."""
    return _language_identifier().FindLanguage(text=text).language


def sieve_scores(cosines: np.ndarray, masked_captions: list[str]) -> tuple[float, float, int]:
    """(max cosine, mean cosine, index of the best caption) from the alt-text's cosine with each caption; 0.0 when
    the best masked caption is empty."""
    best = int(np.argmax(cosines))
    score = 0.0 if len(masked_captions[best]) == 0 else float(cosines[best])
    return score, float(np.mean(cosines)), best


def basic_filter_features(text: str, width: int, height: int) -> dict[str, Any]:
    """DataComp's basic filter: English, > 2 words, > 5 characters, shorter side ≥ 200, aspect ≤ 3."""
    language = detect_language(text)
    words, chars = len(text.split()), len(text)
    aspect = max(width, height) / min(width, height)
    return {
        "language": language, "is_english": language == "en", "num_words": words, "num_chars": chars,
        "width": width, "height": height, "aspect_ratio": aspect,
        "passes_basic_filter": language == "en" and words > 2 and chars > 5 and min(width, height) >= 200
        and aspect <= 3.0,
    }


class ScoreStage(ShardStage):
    name = "scores"
    upstream = "embeddings"
    settings_names = SCORE_SETTINGS


    def process(self, shard: Shard) -> tuple[pa.Table, dict[str, Any]]:
        mask = make_masker(self.settings.mask_phrases, self.settings.mask_mode)
        captions = self.read_upstream("captions", shard).select(CAPTION_COLUMNS).to_pylist()
        embeddings = {(e["position"], e["key"], e["uid"]): e  # joined on the sample, never on position alone
                      for e in self.read_upstream(self.upstream, shard).select(EMBEDDING_COLUMNS).to_pylist()}
        if len(embeddings) != len(captions):
            raise InconsistentRun(f"shard {shard.shard_id}: {len(captions)} caption rows but {len(embeddings)} "
                                  "embedding rows: re-run the embed stage")
        rows = []
        for cap in captions:
            emb = embeddings.get((cap["position"], cap["key"], cap["uid"]))
            if emb is None:
                raise InconsistentRun(f"shard {shard.shard_id}: sample {cap['key']} has no embedding row: "
                                      "re-run the embed stage")
            row = {name: None for name in SCORES_SCHEMA.names}
            row.update({k: cap[k] for k in ("uid", "shard", "key", "position", "url", "text_truncated")})
            if row["uid"] is not None:  # the two halves DataComp's subset.npy stores, kept for fast sorting
                row.update(uid_hi=int(row["uid"][:16], 16), uid_lo=int(row["uid"][16:], 16))
            row.update(status=emb["status"], reason=emb["reason"])
            if emb["status"] == "ok":
                score, mean, best = sieve_scores(np.asarray(emb["caption_similarities"], np.float32),
                                                 [mask(c) for c in cap["captions"]])
                row.update(sieve_score=score, sieve_mean=mean, best_caption=cap["captions"][best])
                row["clip_score"] = cap["metadata_clip_score" if self.settings.clip_from_metadata else "clip_score"]
                width = cap["original_width"] or cap["width"]
                height = cap["original_height"] or cap["height"]
                row.update(basic_filter_features(cap["text"], width, height))
                if not all(math.isfinite(row[c]) for c in ("sieve_score", "sieve_mean", "clip_score")
                           if row[c] is not None):
                    row.update(status="failed", reason="non_finite_score")  # a model overflowed on this sample
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), {}
