"""Embed stage: the text side. The masked alt-text and masked captions go through the sentence encoder (each
distinct text once); the cosine of the alt-text with each caption is computed from the full-precision vectors
and stored (``caption_similarities``, list<float32>), the vectors themselves (``text_embedding``,
``caption_embeddings``) only as ``--embeddings`` says. Reads the caption stage's output, never the tar. Writes
``RUN/embeddings/<shard>.parquet``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from sieve_tasks.masking import make_masker
from sieve_tasks.models import Device
from sieve_tasks.settings import EMBED_SETTINGS, Settings
from sieve_tasks.shards import Shard
from sieve_tasks.stages.base import ShardStage
from sieve_tasks.vectors import STORED_DTYPES, fixed_size_column, lists_column



class EmbedStage(ShardStage):
    name = "embeddings"
    settings_names = EMBED_SETTINGS

    def __init__(self, run: str, settings: Settings):
        super().__init__(run, settings)
        self.mask = make_masker(settings.mask_phrases, settings.mask_mode)
        self._text_encoder = None

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from sieve_tasks.encoders import TextEncoder

            device = Device.choose(self.settings.device, self.settings.dtype)
            self._text_encoder = TextEncoder(self.settings.text_encoder, device, self.settings.embed_batch_size,
                                             int8=self.settings.int8)
        return self._text_encoder

    def process(self, shard: Shard) -> tuple[pa.Table, dict[str, Any]]:
        captions = self.read_upstream(self.upstream, shard,
                                      ["uid", "key", "position", "status", "reason", "text", "captions"])
        ok = np.flatnonzero(np.asarray(captions.column("status").to_pylist(), dtype=object) == "ok")
        texts = captions.column("text").to_pylist()
        caption_lists = captions.column("captions").to_pylist()
        counts = np.array([len(caption_lists[i]) for i in ok], np.int64)
        sentences = [self.mask(texts[i]) for i in ok] + [self.mask(c) for i in ok for c in caption_lists[i]]
        table = captions.select(["uid", "key", "position", "status", "reason"])
        rows = table.num_rows
        if len(ok):
            vectors = self.text_encoder.encode(sentences)
            text_vectors, caption_vectors = vectors[: len(ok)], vectors[len(ok):]
            similarities = np.einsum("ij,ij->i", caption_vectors, np.repeat(text_vectors, counts, axis=0))
        else:
            dim = self.text_encoder.dim  # every shard's columns look alike
            text_vectors = caption_vectors = np.zeros((0, dim), np.float32)
            similarities = np.zeros(0, np.float32)
        table = table.append_column("caption_similarities", lists_column(rows, ok, counts, similarities, np.float32))
        if self.settings.embeddings != "none":
            dtype = STORED_DTYPES[self.settings.embeddings]
            table = table.append_column("text_embedding", fixed_size_column(rows, ok, text_vectors, dtype))
            table = table.append_column("caption_embeddings",
                                        lists_column(rows, ok, counts, caption_vectors, dtype))
        return table, {}
