"""Embed stage: masked alt-text and masked captions through the sentence encoder; image and alt-text
through CLIP (unless CLIP is off or DataComp's precomputed score is used). Writes
``RUN/embeddings/<shard>.parquet``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import torch

from sieve_tasks.masking import make_masker
from sieve_tasks.models import Device
from sieve_tasks.settings import EMBED_SETTINGS, Settings
from sieve_tasks.shards import SampleError, Shard, decode_image, read_samples
from sieve_tasks.stages.base import ShardStage
from sieve_tasks.stages.caption import prefetch_map

EMBEDDINGS_SCHEMA = pa.schema([
    ("uid", pa.string()), ("key", pa.string()), ("position", pa.int64()), ("status", pa.string()),
    ("reason", pa.string()), ("text_embedding", pa.list_(pa.float32())),
    ("caption_embeddings", pa.list_(pa.list_(pa.float32()))),
    ("clip_image_embedding", pa.list_(pa.float32())), ("clip_text_embedding", pa.list_(pa.float32())),
])


class EmbedStage(ShardStage):
    name = "embeddings"
    upstream = "captions"
    settings_names = EMBED_SETTINGS

    def __init__(self, run: str, settings: Settings):
        super().__init__(run, settings)
        self.mask = make_masker(settings.mask_phrases, settings.mask_mode)
        self._text_encoder = None
        self._clip = None


    @property
    def computes_clip(self) -> bool:
        return self.settings.clip != "none" and self.settings.clip_from_metadata is None

    def device(self) -> Device:
        return Device.choose(self.settings.device, self.settings.dtype)

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from sieve_tasks.encoders import TextEncoder

            self._text_encoder = TextEncoder(self.settings.text_encoder, self.device(), self.settings.embed_batch_size,
                                             int8=self.settings.int8)
        return self._text_encoder

    @property
    def clip(self):
        if self._clip is None:
            from sieve_tasks.encoders import ClipEncoder

            self._clip = ClipEncoder(self.settings.clip, self.device(), self.settings.embed_batch_size)
        return self._clip

    def process(self, shard: Shard) -> tuple[pa.Table, dict[str, Any]]:
        captions = self.read_upstream(self.upstream, shard)
        rows = captions.select(["uid", "key", "position", "status", "reason"]).to_pylist()
        ok = [i for i, row in enumerate(rows) if row["status"] == "ok"]
        texts = captions.column("text").to_pylist()
        caption_lists = captions.column("captions").to_pylist()
        for row in rows:
            row.update(text_embedding=None, caption_embeddings=None, clip_image_embedding=None, clip_text_embedding=None)
        if ok:
            self._embed_texts(rows, ok, texts, caption_lists)
        if ok and self.computes_clip:
            self._embed_clip(shard, rows, ok, texts)
        return pa.Table.from_pylist(rows, schema=EMBEDDINGS_SCHEMA), {}

    def _embed_texts(self, rows: list[dict], ok: list[int], texts: list[str], caption_lists: list[list[str]]) -> None:
        sentences = [self.mask(texts[i]) for i in ok]
        counts = [len(caption_lists[i]) for i in ok]
        sentences += [self.mask(c) for i in ok for c in caption_lists[i]]
        vectors = self.text_encoder.encode(sentences)
        offset = len(ok)
        for slot, (index, count) in enumerate(zip(ok, counts)):
            rows[index]["text_embedding"] = vectors[slot].tolist()
            rows[index]["caption_embeddings"] = vectors[offset : offset + count].tolist()
            offset += count

    def _embed_clip(self, shard: Shard, rows: list[dict], ok: list[int], texts: list[str]) -> None:
        wanted = {(rows[i]["position"], rows[i]["key"], rows[i]["uid"]): i for i in ok}  # the sample, not a position alone

        def load(sample) -> tuple[int, torch.Tensor | None, str | None]:
            index = wanted[(sample.position, sample.key, sample.uid)]
            try:
                return index, self.clip.transform(decode_image(sample.image, self.settings.max_pixels)), None
            except SampleError as exc:
                return index, None, str(exc)

        _ = self.clip  # load the model before the decode threads start using its transform
        batch: list[tuple[int, torch.Tensor]] = []
        size = self.settings.embed_batch_size

        def flush() -> None:
            if batch:
                vectors = self.clip.encode_images(torch.stack([pixels for _, pixels in batch]))
                for (index, _), vector in zip(batch, vectors):
                    rows[index]["clip_image_embedding"] = vector.tolist()
                batch.clear()

        selected = (s for s in read_samples(shard) if s.ok and (s.position, s.key, s.uid) in wanted)
        with ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="decode") as pool:
            for index, pixels, reason in prefetch_map(pool, load, selected, ahead=2 * size):
                if reason is not None:  # the image changed since the caption stage read it
                    rows[index].update(status="failed", reason=reason, text_embedding=None, caption_embeddings=None)
                    continue
                batch.append((index, pixels))
                if len(batch) == size:
                    flush()
            flush()
        still_ok = [i for i in ok if rows[i]["status"] == "ok"]
        missing = [i for i in still_ok if rows[i]["clip_image_embedding"] is None]
        for i in missing:
            rows[i].update(status="failed", reason="image_missing_on_reread", text_embedding=None, caption_embeddings=None)
        still_ok = [i for i in still_ok if rows[i]["status"] == "ok"]
        if still_ok:
            vectors = self.clip.encode_texts([texts[i] for i in still_ok])
            for index, vector in zip(still_ok, vectors):
                rows[index]["clip_text_embedding"] = vector.tolist()
