"""Caption stage: the first reader of a shard. Validates every sample, decodes images in worker threads
while the captioner runs, and writes ``RUN/captions/<shard>.parquet``. With ``--caption-cache`` an image
whose bytes were captioned before with the same settings is neither decoded nor captioned again."""

from __future__ import annotations

import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import torch

from sieve_tasks import storage
from sieve_tasks.blip_checkpoint import fetch_checkpoint, is_blip_checkpoint
from sieve_tasks.caption_cache import (
    FETCH_BATCH,
    CacheCounts,
    CacheIndex,
    CaptionCache,
    cache_fingerprint,
    image_digest,
)
from sieve_tasks.models import Device
from sieve_tasks.settings import CAPTION_SETTINGS, METADATA_CLIP_COLUMNS, Settings
from sieve_tasks.shards import (
    UID_PATTERN,
    SampleError,
    Sample,
    Shard,
    canonical_uids,
    decode_image,
    expected_samples,
    open_image,
    read_samples,
)
from sieve_tasks.stages.base import InconsistentRun, ShardStage

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
    digest: bytes | None = None  # SHA-256 of the image bytes (with a caption cache)
    cached: bool = False  # the cache may hold its captions: not decoded


class CaptionStage(ShardStage):
    name = "captions"
    settings_names = CAPTION_SETTINGS

    def __init__(self, run: str, settings: Settings):
        super().__init__(run, settings)
        self._captioner = None
        self._provided: dict[str, dict[str, list[str]]] = {}
        from sieve_tasks.captioner import clip_style_transform

        self._transform = clip_style_transform(settings.image_size)
        self._cache: CaptionCache | None = None

    def stage_settings(self) -> dict[str, Any]:
        """The settings plus, for a BLIP ``.pth`` captioner, the file's SHA-256 (a path or URL does not pin its
        content). Captioners named otherwise keep their fingerprints, so finished runs are not recomputed."""
        settings = super().stage_settings()
        if is_blip_checkpoint(self.settings.captioner):
            settings["captioner_sha256"] = fetch_checkpoint(self.settings.captioner).sha256
        return settings

    def caption_cache(self) -> CaptionCache | None:
        """The ``--caption-cache`` namespace of these settings (made when a shard first needs it: naming a BLIP
        checkpoint by its SHA-256 may download it)."""
        if self._cache is None and self.settings.caption_cache:
            identity = {"dtype": str(Device.choose(self.settings.device, self.settings.dtype).dtype).removeprefix("torch.")}
            if is_blip_checkpoint(self.settings.captioner):
                identity["captioner_sha256"] = fetch_checkpoint(self.settings.captioner).sha256
            self._cache = CaptionCache(self.settings.caption_cache, cache_fingerprint(self.settings, identity))
        return self._cache

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

    def prepare(self, sample: Sample, needs_pixels: bool, index: CacheIndex | None = None) -> Prepared:
        prepared = Prepared(sample)
        if not sample.ok:
            return prepared
        if needs_pixels and index is not None:
            prepared.digest = image_digest(sample.image)
            if index.maybe(prepared.digest):  # only the header is read: size and the pixel limit
                try:
                    prepared.width, prepared.height = open_image(sample.image, self.settings.max_pixels).size
                    prepared.cached = True
                except SampleError as exc:
                    sample.reason = str(exc)
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
        counts = CacheCounts()
        cache = self.caption_cache()
        index = cache.index(counts) if cache else None  # one listing per shard
        rows: list[dict[str, Any]] = []
        waiting: list[tuple[dict[str, Any], torch.Tensor, bytes | None]] = []
        candidates: list[tuple[dict[str, Any], Prepared]] = []
        fresh: list[tuple[bytes, list[str], float]] = []  # new cache entries: digest, captions, seconds
        hits: list[bytes] = []
        batch_size = self.settings.caption_batch_size

        def flush() -> None:
            if not waiting:
                return
            seed = zlib.crc32(f"{self.settings.seed}:{shard.shard_id}:{waiting[0][0]['position']}".encode())
            captioner = self.captioner  # loaded before the clock starts: an entry's seconds are captioning only
            started = time.perf_counter()
            captions = captioner.caption(torch.stack([pixels for _, pixels, _ in waiting]), seed)
            seconds = (time.perf_counter() - started) / len(waiting)
            for (row, _, digest), caps in zip(waiting, captions):
                row["captions"] = caps
                if digest is not None:
                    fresh.append((digest, caps, seconds))
            waiting.clear()

        def caption_later(row: dict[str, Any], prepared: Prepared) -> None:
            row["caption_source"] = "captioner"
            waiting.append((row, prepared.pixels, prepared.digest))
            if len(waiting) == batch_size:
                flush()

        def resolve() -> None:
            """Captions of the candidate hits, fetched together; a candidate not found is decoded and captioned."""
            found = index.fetch(p.digest for _, p in candidates)
            for row, prepared in candidates:
                cached = found.get(prepared.digest)
                if cached is not None:
                    row["captions"], row["caption_source"] = cached.captions, "cache"
                    counts.hits += 1
                    counts.seconds_saved += cached.seconds
                    hits.append(prepared.digest)
                    continue
                counts.misses += 1
                decoded = self.prepare(prepared.sample, True)
                if decoded.sample.reason is not None:
                    row["reason"] = decoded.sample.reason
                else:
                    decoded.digest = prepared.digest
                    caption_later(row, decoded)
            candidates.clear()

        def needs_pixels(sample: Sample) -> bool:
            return sample.ok and sample.uid not in provided

        with ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="decode") as pool:
            prepared_samples = prefetch_map(
                pool, lambda s: self.prepare(s, needs_pixels(s), index), read_samples(shard), ahead=4 * batch_size
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
                elif prepared.cached:
                    candidates.append((row, prepared))
                    if len(candidates) == FETCH_BATCH:
                        resolve()
                else:
                    counts.misses += index is not None
                    caption_later(row, prepared)
            if candidates:
                resolve()
            flush()
        expected = expected_samples(shard)
        missing = expected.missing({row["key"] for row in rows})
        rows += [self._missing_row(shard, len(rows) + i, listed) for i, listed in enumerate(missing)]
        if shard.current_identity() != shard.identity:
            raise InconsistentRun(f"shard {shard.shard_id}: {shard.tar_uri} changed while it was being read; "
                                  "run the stage again")
        for row in rows:
            row["status"] = "ok" if row["reason"] is None else "failed"
        facts = {"expected": expected.count, "expected_source": expected.source, "missing_from_tar": len(missing),
                 "captioned": sum(r["caption_source"] == "captioner" for r in rows),
                 "provided": sum(r["caption_source"] == "provided" for r in rows),
                 "oom_splits": self._captioner.oom_splits if self._captioner else 0,
                 "device": self._captioner.device.describe() if self._captioner else None}
        if cache is not None:
            cache.add(fresh, counts)
            cache.record_hits(hits, counts)
            facts["cache"] = counts.as_facts()
        return pa.Table.from_pylist(rows, schema=CAPTIONS_SCHEMA), facts

    @staticmethod
    def _missing_row(shard: Shard, position: int, listed: dict[str, Any]) -> dict[str, Any]:
        """A sample the shard's sidecar lists as downloaded but its tar does not hold: recorded, never lost."""
        uid = listed.get("uid")
        uid = uid.lower() if isinstance(uid, str) and UID_PATTERN.match(uid.lower()) else None
        row = {name: None for name in CAPTIONS_SCHEMA.names}
        row.update(uid=uid, shard=shard.shard_id, key=listed["key"], position=position, reason="missing_from_tar",
                   url=listed.get("url"), text_truncated=False)
        return row

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
