"""Caption stage: the first reader of a shard. Validates every sample, decodes images in worker threads
while the captioner runs, and writes ``RUN/captions/<shard>.parquet``."""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import torch

from sieve_tasks import storage
from sieve_tasks.models import Device
from sieve_tasks.settings import CAPTION_SETTINGS, METADATA_CLIP_COLUMNS, Settings
from sieve_tasks.shards import SampleError, Sample, Shard, canonical_uids, decode_image, read_samples
from sieve_tasks.stages.base import ShardStage

T = TypeVar("T")
R = TypeVar("R")

CAPTIONS_SCHEMA = pa.schema([
    ("uid", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("position", pa.int64()),
    ("status", pa.string()), ("reason", pa.string()), ("text", pa.string()), ("text_truncated", pa.bool_()),
    ("url", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
    ("original_width", pa.int64()), ("original_height", pa.int64()),
    ("captions", pa.list_(pa.string())), ("caption_source", pa.string()), ("metadata_clip_score", pa.float64()),
])


def prefetch_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """``map`` over a thread pool that keeps at most ``ahead`` items in flight, results in order."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass
class Prepared:
    sample: Sample
    width: int | None = None
    height: int | None = None
    pixels: torch.Tensor | None = None


class CaptionStage(ShardStage):
    name = "captions"
    settings_names = CAPTION_SETTINGS

    def __init__(self, run: str, settings: Settings):
        super().__init__(run, settings)
        self._captioner = None
        self._provided: dict[str, dict[str, list[str]]] = {}
        from sieve_tasks.captioner import clip_style_transform

        self._transform = clip_style_transform(settings.image_size)


    @property
    def captioner(self):
        if self._captioner is None:  # loaded only when some sample needs captions
            from sieve_tasks.captioner import BlipCaptioner

            device = Device.choose(self.settings.device, self.settings.dtype)
            self._captioner = BlipCaptioner(self.settings.captioner, device, self.settings)
        return self._captioner

    def provided_captions(self, shard_id: str) -> dict[str, list[str]]:
        """Captions the user already has (``--captions``), by uid; ``{shard}`` in the path is per shard."""
        path = self.settings.captions
        if path is None:
            return {}
        per_shard = "{shard}" in path
        cache_key = shard_id if per_shard else ""
        if cache_key not in self._provided:
            uri = path.replace("{shard}", shard_id)
            if per_shard and not storage.exists(uri):
                self._provided = {cache_key: {}}
            else:
                table = storage.read_parquet(uri, columns=["uid", "captions"])
                self._provided = {cache_key: dict(zip(canonical_uids(table.column("uid").to_pylist()),
                                                      table.column("captions").to_pylist()))}
        return self._provided[cache_key]

    def metadata_clip_scores(self, shard: Shard) -> dict[str, float]:
        """DataComp's clip score from the parquet beside the tar (with ``--metadata`` aggregate joins it instead)."""
        if self.settings.clip_from_metadata is None or self.settings.metadata is not None:
            return {}
        column = METADATA_CLIP_COLUMNS[self.settings.clip_from_metadata]
        if not storage.exists(shard.metadata_uri):
            raise FileNotFoundError(f"--clip-from-metadata needs {shard.metadata_uri}")
        table = storage.read_parquet(shard.metadata_uri)
        if column not in table.column_names:
            raise ValueError(f"{shard.metadata_uri} has no column {column!r} (needed by --clip-from-metadata)")
        return dict(zip(canonical_uids(table.column("uid").to_pylist()), table.column(column).to_pylist()))

    def prepare(self, sample: Sample, needs_pixels: bool) -> Prepared:
        prepared = Prepared(sample)
        if not sample.ok:
            return prepared
        try:
            image = decode_image(sample.image, self.settings.max_pixels)
        except SampleError as exc:
            sample.reason = str(exc)
            return prepared
        prepared.width, prepared.height = image.size
        if needs_pixels:
            prepared.pixels = self._transform(image)
        return prepared

    def process(self, shard: Shard) -> tuple[pa.Table, dict[str, Any]]:
        provided = self.provided_captions(shard.shard_id)
        metadata_clip = self.metadata_clip_scores(shard)
        rows: list[dict[str, Any]] = []
        waiting: list[tuple[dict[str, Any], torch.Tensor]] = []
        batch_size = self.settings.caption_batch_size

        def flush() -> None:
            if not waiting:
                return
            seed = zlib.crc32(f"{self.settings.seed}:{shard.shard_id}:{waiting[0][0]['position']}".encode())
            captions = self.captioner.caption(torch.stack([pixels for _, pixels in waiting]), seed)
            for (row, _), caps in zip(waiting, captions):
                row["captions"] = caps
            waiting.clear()

        def needs_pixels(sample: Sample) -> bool:
            return sample.ok and sample.uid not in provided

        with ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="decode") as pool:
            prepared_samples = prefetch_map(
                pool, lambda s: self.prepare(s, needs_pixels(s)), read_samples(shard), ahead=4 * batch_size
            )
            for prepared in prepared_samples:
                row = self._row(prepared, metadata_clip)
                rows.append(row)
                if row["reason"] is not None:
                    continue
                if row["uid"] in provided:
                    row["captions"], row["caption_source"] = provided[row["uid"]], "provided"
                    if not row["captions"] or not all(isinstance(c, str) for c in row["captions"]):
                        row["reason"], row["captions"] = "invalid_provided_captions", None
                else:
                    row["caption_source"] = "captioner"
                    waiting.append((row, prepared.pixels))
                    if len(waiting) == batch_size:
                        flush()
            flush()
        for row in rows:
            row["status"] = "ok" if row["reason"] is None else "failed"
        facts = {"captioned": sum(r["caption_source"] == "captioner" for r in rows),
                 "provided": sum(r["caption_source"] == "provided" for r in rows),
                 "oom_splits": self._captioner.oom_splits if self._captioner else 0,
                 "device": self._captioner.device.describe() if self._captioner else None}
        return pa.Table.from_pylist(rows, schema=CAPTIONS_SCHEMA), facts

    @staticmethod
    def _row(prepared: Prepared, metadata_clip: dict[str, float]) -> dict[str, Any]:
        sample = prepared.sample
        meta = sample.meta
        reason = sample.reason
        if reason is None and metadata_clip and metadata_clip.get(sample.uid) is None:
            reason = "missing_metadata_clip_score"
        return {
            "uid": sample.uid, "shard": sample.shard, "key": sample.key, "position": sample.position,
            "status": None, "reason": reason, "text": sample.text, "text_truncated": sample.text_truncated,
            "url": sample.url, "width": prepared.width, "height": prepared.height,
            "original_width": _int_or_none(meta.get("original_width")),
            "original_height": _int_or_none(meta.get("original_height")),
            "captions": None, "caption_source": None, "metadata_clip_score": metadata_clip.get(sample.uid),
        }


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
