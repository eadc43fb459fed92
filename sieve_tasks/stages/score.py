"""Score stage: SIEVE's caption-similarity score, CLIPScore and DataComp's basic-filter features per
sample. Writes ``RUN/scores/<shard>.parquet`` (one row per sample read, failed ones included)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sieve_tasks.masking import make_masker
from sieve_tasks.settings import SCORE_SETTINGS
from sieve_tasks.shards import Shard, uid_halves
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
SAMPLE = ("position", "key", "uid")  # what joins a caption row to its embedding row
BASIC_FILTER_FEATURES = ("language", "is_english", "num_words", "num_chars", "width", "height", "aspect_ratio",
                         "passes_basic_filter")


@cache
def _language_identifier():
    import gcld3

    return gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)


def detect_language(text: str) -> str:
    """CLD3 (as LAION used it), offline: its model ships inside the ``cld3-py`` wheel."""
    return _language_identifier().FindLanguage(text=text).language


def sieve_scores(similarities: pa.ListArray, captions: pa.ListArray, mask: Callable[[str], str]
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per sample, from the alt-text's cosine with each caption: (max cosine, 0.0 where the best caption masks to
    ''; mean cosine; the best caption, the first at the max). NaN wins the max, as in ``np.argmax``."""
    counts = pc.list_value_length(similarities).to_numpy(zero_copy_only=False)
    if len(counts) == 0:
        return np.zeros(0), np.zeros(0), []
    if not np.array_equal(counts, pc.list_value_length(captions).to_numpy(zero_copy_only=False)) or counts.min() < 1:
        raise InconsistentRun("caption similarities do not match the captions: re-run the embed stage")
    values = similarities.flatten().to_numpy(zero_copy_only=False)
    starts = np.cumsum(counts) - counts
    maxes = np.repeat(np.maximum.reduceat(values, starts), counts)
    at_max = (values == maxes) | (np.isnan(values) & np.isnan(maxes))
    best = np.minimum.reduceat(np.where(at_max, np.arange(len(values)), len(values)), starts)
    best_captions = captions.flatten().take(pa.array(best)).to_pylist()
    empty = np.fromiter((len(mask(c)) == 0 for c in best_captions), bool, len(best_captions))
    scores = np.where(empty, 0.0, values[best].astype(np.float64))
    return scores, np.add.reduceat(values.astype(np.float64), starts) / counts, best_captions


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
    settings_names = SCORE_SETTINGS

    def process(self, shard: Shard) -> tuple[pa.Table, dict[str, Any]]:
        captions = self.read_upstream("captions", shard, CAPTION_COLUMNS)
        embedded = self._embedding_rows(shard, captions)
        rows = captions.num_rows
        status = np.asarray(embedded.column("status").to_pylist(), dtype=object)
        ok = np.flatnonzero(status == "ok")
        mask = make_masker(self.settings.mask_phrases, self.settings.mask_mode)
        sieve_score, sieve_mean, best_caption = sieve_scores(
            embedded.column("caption_similarities").take(ok).combine_chunks(),
            captions.column("captions").take(ok).combine_chunks(), mask)
        clip = captions.column("metadata_clip_score" if self.settings.clip_from_metadata else "clip_score"
                               ).take(ok).combine_chunks().cast(pa.float64())
        clip_values = clip.fill_null(0.0).to_numpy().astype(np.float64)
        finite = np.isfinite(sieve_score) & np.isfinite(sieve_mean) & np.isfinite(clip_values)
        reason = np.asarray(embedded.column("reason").to_pylist(), dtype=object)
        status[ok[~finite]], reason[ok[~finite]] = "failed", "non_finite_score"  # a model overflowed on these
        ok_rows = captions.select(["text", "width", "height", "original_width", "original_height"]).take(ok)
        features = [basic_filter_features(text, original_width or width, original_height or height)
                    for text, width, height, original_width, original_height
                    in zip(*(column.to_pylist() for column in ok_rows.columns))]
        columns = {name: captions.column(name) for name in ("uid", "shard", "key", "position", "url",
                                                            "text_truncated")}
        # the uid's two halves, as DataComp's subset.npy stores them (null where the uid is)
        hi, lo, valid = uid_halves(captions.column("uid").combine_chunks())
        columns["uid_hi"], columns["uid_lo"] = pa.array(hi, mask=~valid), pa.array(lo, mask=~valid)
        columns.update(status=status, reason=reason)
        at_ok = _placed(rows, ok)
        computed = {"sieve_score": sieve_score, "sieve_mean": sieve_mean, "best_caption": best_caption,
                    **{name: [f[name] for f in features] for name in BASIC_FILTER_FEATURES}}
        for name, values in computed.items():
            columns[name] = pa.array(values, SCORES_SCHEMA.field(name).type).take(at_ok)
        columns["clip_score"] = clip.take(at_ok)
        return pa.table({name: columns[name] for name in SCORES_SCHEMA.names}, schema=SCORES_SCHEMA), {}

    def _embedding_rows(self, shard: Shard, captions: pa.Table) -> pa.Table:
        """The embed stage's rows in the caption rows' order, joined on the sample, never on position alone."""
        embeddings = self.read_upstream(self.upstream, shard, EMBEDDING_COLUMNS)
        if embeddings.num_rows != captions.num_rows:
            raise InconsistentRun(f"shard {shard.shard_id}: {captions.num_rows} caption rows but "
                                  f"{embeddings.num_rows} embedding rows: re-run the embed stage")
        index = {sample: row for row, sample in enumerate(zip(*(embeddings.column(c).to_pylist() for c in SAMPLE)))}
        order = []
        for sample in zip(*(captions.column(c).to_pylist() for c in SAMPLE)):
            if sample not in index:
                raise InconsistentRun(f"shard {shard.shard_id}: sample {sample[1]} has no embedding row: "
                                      "re-run the embed stage")
            order.append(index[sample])
        return embeddings.take(pa.array(order, pa.int64()))


def _placed(rows: int, ok: np.ndarray) -> pa.Array:
    """Indices that spread values computed for the rows ``ok`` over all ``rows`` (null elsewhere), for ``take``."""
    where = np.full(rows, -1, np.int64)
    where[ok] = np.arange(len(ok))
    return pa.array(where, mask=where < 0)
