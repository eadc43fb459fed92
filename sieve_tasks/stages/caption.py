"""Caption stage: the image pass. Reads and validates every sample of a shard, decodes each image once
(``sieve_tasks.image_pass``), and runs the image-side models on it: BLIP writes the captions, CLIP embeds the image
and then the alt-text (the CLIP score is computed here, from full-precision vectors). Writes
``RUN/captions/<shard>.parquet``. With ``--caption-cache`` an image whose bytes were captioned before with the
same settings is not captioned again (nor decoded, unless CLIP needs its pixels)."""

from __future__ import annotations

import functools
import itertools
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
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
)
from sieve_tasks.image_pass import BatchStream, ImageBatch, ImagePass, Item, Need
from sieve_tasks.models import Device
from sieve_tasks.settings import CAPTION_SETTINGS, METADATA_CLIP_COLUMNS, Settings, fingerprint
from sieve_tasks.shards import UID_PATTERN, SampleError, Shard, canonical_uids, expected_samples
from sieve_tasks.stages.base import InconsistentRun, ShardStage
from sieve_tasks.tar_reader import keep_spare_reader, stop_spare_reader
from sieve_tasks.vectors import store_vectors

CAPTIONS_SCHEMA = pa.schema([
    ("uid", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("position", pa.int64()),
    ("status", pa.string()), ("reason", pa.string()), ("text", pa.string()), ("text_truncated", pa.bool_()),
    ("url", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
    ("original_width", pa.int64()), ("original_height", pa.int64()),
    ("captions", pa.list_(pa.string())), ("caption_source", pa.string()), ("metadata_clip_score", pa.float64()),
    ("clip_score", pa.float64()),
])  # + clip_image_embedding, clip_text_embedding unless --embeddings none (sieve_tasks.vectors)
CPU_CAPTION_BATCH = 8
# caption batches whose tokens may wait to become text once an image batch's models are launched
CAPTION_BATCHES_IN_TEXT = 2
# on CUDA, alt-texts are tokenised for CLIP in worker processes (2 × ~10,000 texts/s), off the feeding process's GIL
CLIP_TOKENIZER_PROCESSES = 2


class CaptionStage(ShardStage):
    name = "captions"
    settings_names = CAPTION_SETTINGS

    def __init__(self, run: str, settings: Settings, *, captioner: Any = None, clip: Any = None):
        """``captioner`` / ``clip`` replace the models the settings name (benchmarks, tests): anything with
        :class:`sieve_tasks.captioner.BlipCaptioner`'s ``launch(pixel_values, seed) -> Future[list[list[str]]]``,
        ``start_text()`` and ``close()`` / :class:`sieve_tasks.encoders.ClipEncoder`'s methods."""
        super().__init__(run, settings)
        self._captioner = captioner
        self._clip = clip
        self._provided: dict[str, dict[str, list[str]]] = {}
        self._cache: CaptionCache | None = None
        # shards whose image pass started early (compute_shards): fingerprint, marker if complete, captioning; or
        # the error that preparing it raised, raised at its turn
        self._upcoming: dict[str, tuple[str, dict[str, Any] | None, _ShardCaptioning | None] | Exception] = {}
        self.device = Device.choose(settings.device, settings.dtype)
        self.torch_device = torch.device(self.device.device)

    def stage_settings(self) -> dict[str, Any]:
        """The settings plus, for a BLIP ``.pth`` captioner, the file's SHA-256 (a path or URL does not pin its
        content). Captioners named otherwise keep their fingerprints, so finished runs are not recomputed."""
        settings = super().stage_settings()
        if is_blip_checkpoint(self.settings.captioner):
            settings["captioner_sha256"] = fetch_checkpoint(self.settings.captioner).sha256
        return settings

    def fingerprint(self, shard: Shard) -> str:
        """The settings' and the tar's fingerprint, and the identity of each file read for the shard beside its tar
        (``--captions``, the parquet ``--clip-from-metadata`` reads): one replaced at the same path recomputes the
        shard, as a replaced tar does (without such files the fingerprint is as before)."""
        base = super().fingerprint(shard)
        files = {}
        if self.settings.captions is not None:
            files["captions"] = self.settings.captions.replace("{shard}", shard.shard_id)
        if self.settings.clip_from_metadata is not None and self.settings.metadata is None:
            files["clip_from_metadata"] = shard.metadata_uri
        if not files:
            return base
        return fingerprint({"base": base, "files": {name: _identity_if_any(uri) for name, uri in files.items()}})

    def caption_cache(self) -> CaptionCache | None:
        """The ``--caption-cache`` namespace of these settings (made when a shard first needs it: naming a BLIP
        checkpoint by its SHA-256 may download it)."""
        if self._cache is None and self.settings.caption_cache:
            identity = {"dtype": str(self.device.dtype).removeprefix("torch.")}
            if is_blip_checkpoint(self.settings.captioner):
                identity["captioner_sha256"] = fetch_checkpoint(self.settings.captioner).sha256
            self._cache = CaptionCache(self.settings.caption_cache, cache_fingerprint(self.settings, identity))
        return self._cache

    @property
    def captioner(self):
        if self._captioner is None:  # loaded only when some sample needs captions
            from sieve_tasks.captioner import BlipCaptioner

            self._captioner = BlipCaptioner(self.settings.captioner, self.device, self.settings)
        return self._captioner

    @property
    def clip(self):
        if self._clip is None:
            from sieve_tasks.encoders import ClipEncoder

            processes = CLIP_TOKENIZER_PROCESSES if self.torch_device.type == "cuda" else 0
            self._clip = ClipEncoder(self.settings.clip, self.device, self.settings.embed_batch_size, processes)
        return self._clip

    @functools.cached_property
    def batch_size(self) -> int:
        """``--caption-batch-size``, else 8 on CPU and, on CUDA, what the captioner fits in free memory — decided
        once, so every shard of the stage (and its image pass) uses the same batch size."""
        if self.settings.caption_batch_size is not None:
            return self.settings.caption_batch_size
        if self.torch_device.type != "cuda":
            return CPU_CAPTION_BATCH
        return self.captioner.auto_batch_size()

    def image_pass(self) -> ImagePass:
        sizes = (self.settings.image_size,) + ((self.clip.view.size,) if self.settings.computes_clip else ())
        return ImagePass(sizes, self.settings.max_pixels, self.batch_size, self.settings.decode_workers,
                         self.torch_device)

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

    def compute_shards(self, shards: list[Shard]) -> Iterator[tuple[Shard, Callable[[], dict[str, Any]]]]:
        """:meth:`compute_shard` of each shard in order, their batches one stream for the device: a shard's image
        pass starts once the shard before launched its first batch, and a shard is settled (its last CLIP vectors
        copied to the host) only after the next one launched its first batch, while the device works on that;
        what remains (its last captions, its table) is part of its write, which may run in another thread. Yields
        each shard with its write; a shard whose captioning fails still has the shard before it yielded first."""
        if self.torch_device.type == "cuda":  # where shards are read by reader processes: each starts ahead
            keep_spare_reader()
        launched: tuple[Shard, str, _ShardCaptioning, float] | None = None  # the shard before, not yet settled

        def settle_launched() -> Iterator[tuple[Shard, Callable[[], dict[str, Any]]]]:
            nonlocal launched
            if launched is not None:
                before, launched = launched, None
                yield self._settled(*before)

        for index, shard in enumerate(shards):
            upcoming = shards[index + 1] if index + 1 < len(shards) else None
            captioning = None
            try:
                prepared = self._upcoming.pop(shard.shard_id, None) or self._prepare(shard)
                if isinstance(prepared, Exception):
                    raise prepared
                expected, done, captioning = prepared
                if captioning is None:
                    yield from settle_launched()
                    yield shard, lambda done=done: done
                    continue
                started = time.perf_counter()
                for batch in captioning.stream:
                    captioning.launch_batch(batch)
                    if upcoming is not None:
                        try:
                            self._upcoming[upcoming.shard_id] = self._prepare(upcoming)
                        except Exception as exc:  # that shard's failure: this one is still captioned and written
                            self._upcoming[upcoming.shard_id] = exc
                        upcoming = None
                    yield from settle_launched()
                captioning.launch_rest()
            except Exception:
                yield from settle_launched()
                raise
            finally:
                if captioning is not None:
                    captioning.close()
            yield from settle_launched()  # a shard without samples launched nothing
            launched = shard, expected, captioning, time.perf_counter() - started
        yield from settle_launched()

    def _prepare(self, shard: Shard) -> tuple[str, dict[str, Any] | None, _ShardCaptioning | None]:
        """A shard's fingerprint, its marker if its output is complete, else its captioning, its image pass started
        (its batches wait in the pass's bounded queue)."""
        expected = self.fingerprint(shard)
        done = self.finished(shard, expected)
        if done is not None:
            return expected, done, None
        captioning = _ShardCaptioning(self, shard)
        captioning.start()
        return expected, None, captioning

    def _settled(self, shard: Shard, expected: str, captioning: _ShardCaptioning, seconds: float
                 ) -> tuple[Shard, Callable[[], dict[str, Any]]]:
        started = time.perf_counter()
        captioning.settle()
        return shard, self.write_of(shard, expected, captioning.finish, seconds + time.perf_counter() - started)

    def close(self) -> None:
        """Stop the image passes of shards started but never processed, a spare tar reader, the captioner's text
        thread and CLIP's tokenizer processes."""
        for prepared in self._upcoming.values():
            if not isinstance(prepared, Exception) and prepared[2] is not None:
                prepared[2].close()
        self._upcoming.clear()
        stop_spare_reader()
        for model in (self._captioner, self._clip):
            if model is not None:
                model.close()

    def process(self, shard: Shard) -> tuple[pa.Table, dict[str, Any]]:
        captioning = _ShardCaptioning(self, shard)
        captioning.start()
        try:
            captioning.launch_all()
        finally:
            captioning.close()
        captioning.settle()
        return captioning.finish()


View = tuple[torch.Tensor, int]  # an image's model view: (a batch's uint8 views, its row there)


def gather(views: list[View]) -> torch.Tensor:
    """The given rows of a few batch tensors as one tensor: a slice where they are consecutive rows of one tensor
    (the usual case), else one ``index_select`` per tensor."""
    parts = []
    for _, group in itertools.groupby(views, key=lambda view: id(view[0])):
        group = list(group)
        tensor, slots = group[0][0], [slot for _, slot in group]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            parts.append(tensor[slots[0] : slots[0] + len(slots)])
        else:
            parts.append(tensor.index_select(0, torch.tensor(slots, device=tensor.device)))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _ShardCaptioning:
    """One shard through the image pass: captions in caption batches (seeded by their first sample, so they do not
    depend on how the pass batches images), CLIP per image batch, cache hits fetched together."""

    def __init__(self, stage: CaptionStage, shard: Shard):
        self.stage, self.shard, self.settings = stage, shard, stage.settings
        self.provided = stage.provided_captions(shard.shard_id)
        self.metadata_clip = stage.metadata_clip_scores(shard)
        self.counts = CacheCounts()
        self.cache = stage.caption_cache()
        self.index: CacheIndex | None = self.cache.index(self.counts) if self.cache else None  # one listing per shard
        self.images = stage.image_pass()
        self.stream: BatchStream | None = None
        self.batch_size = stage.batch_size
        self.rows: list[dict[str, Any]] = []
        self.waiting: list[tuple[dict[str, Any], View, bytes | None]] = []  # row, BLIP view, digest
        # caption batches launched, their text still being made: [(row, digest)], captions, seconds per image
        self.launched: deque[tuple[list[tuple[dict[str, Any], bytes | None]], Future, float]] = deque()
        self.candidates: list[tuple[dict[str, Any], Item, View | None]] = []
        self.fresh: list[tuple[bytes, list[str], float]] = []  # new cache entries: digest, captions, seconds
        self.hits: list[bytes] = []
        self.clip_rows: list[np.ndarray] = []
        self.clip_images: list[np.ndarray] = []
        self.clip_texts: list[np.ndarray] = []
        # image batches' CLIP vectors launched on the device, not yet copied to the host: rows, images, texts
        self.clip_launched: deque[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = deque()

    def need(self, item: Item) -> Need:
        """Runs in a decode thread: every image CLIP embeds, or that may need captions, is decoded; one whose
        captions are provided is only validated; one the cache may hold is only looked at (header)."""
        if self.settings.computes_clip:
            return Need.PIXELS
        if item.sample.uid in self.provided:
            return Need.VALIDATE
        if self.index is not None and self.index.maybe(item.digest):
            return Need.HEADER
        return Need.PIXELS

    def start(self) -> None:
        if self.stream is None:
            self.stream = self.images.start(self.shard, self.need, digests=self.index is not None)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()

    def launch_batch(self, batch: ImageBatch) -> None:
        """Rows for an image batch, BLIP launched on each full caption batch, CLIP on the batch; then what earlier
        launches gave is put into rows (on CUDA while the device works on CLIP)."""
        views = batch.pixels_on(self.stage.torch_device)
        # CLIP's tokens of the alt-texts, by slot like the views: asked for before BLIP runs on the batch
        tokens = self.stage.clip.tokenize([item.sample.text for item in batch.items if item.slot is not None]
                                          ) if self.settings.computes_clip else None
        first = len(self.rows)
        for item in batch.items:
            self.take(item, views)  # launches BLIP on each full caption batch
        if tokens is not None:
            self.embed_clip(batch.items, views, tokens.result(), first)
        self.start_text()
        self.collect(keep=CAPTION_BATCHES_IN_TEXT)
        self.collect_clip(keep=1)

    def launch_all(self) -> None:
        """Every image batch launched, then the rest (:meth:`launch_rest`)."""
        for batch in self.stream:
            self.launch_batch(batch)
        self.launch_rest()

    def launch_rest(self) -> None:
        """After the last image batch: the cache's candidates resolved, the last caption batch launched."""
        if self.candidates:
            self.resolve()
        self.flush()
        self.start_text()

    def settle(self) -> None:
        """The last CLIP vectors to the host (on CUDA a copy from the device: done by the thread that launched)."""
        self.collect_clip(keep=0)

    def finish(self) -> tuple[pa.Table, dict[str, Any]]:
        """The shard's table and facts, once settled: its last captions, then its rows (any thread)."""
        self.collect(keep=0)
        return self.table()

    def take(self, item: Item, views: dict[int, torch.Tensor]) -> None:
        row = self._row(item, self.metadata_clip)
        self.rows.append(row)
        if row["reason"] is not None:
            return
        own = (views[self.settings.image_size], item.slot) if item.slot is not None else None
        if row["uid"] in self.provided:
            row["captions"], row["caption_source"] = self.provided[row["uid"]], "provided"
            if not row["captions"] or not all(isinstance(c, str) for c in row["captions"]):
                row["reason"], row["captions"] = "invalid_provided_captions", None
        elif self.index is not None and self.index.maybe(item.digest):
            self.candidates.append((row, item, own))
            if len(self.candidates) == FETCH_BATCH:
                self.resolve()
        else:
            self.counts.misses += self.index is not None
            self.caption_later(row, own, item.digest)

    def caption_later(self, row: dict[str, Any], view: View, digest: bytes | None) -> None:
        row["caption_source"] = "captioner"
        self.waiting.append((row, view, digest))
        if len(self.waiting) == self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.waiting:
            return
        seed = zlib.crc32(f"{self.settings.seed}:{self.shard.shard_id}:{self.waiting[0][0]['position']}".encode())
        captioner = self.stage.captioner  # loaded before the clock starts: an entry's seconds are captioning only
        started = time.perf_counter()
        captions = captioner.launch(gather([view for _, view, _ in self.waiting]), seed)
        seconds = (time.perf_counter() - started) / len(self.waiting)
        self.launched.append(([(row, digest) for row, _, digest in self.waiting], captions, seconds))
        self.waiting.clear()

    def start_text(self) -> None:
        """The launched caption batches' tokens become text from now on (after CLIP's launch: not beside it)."""
        if self.launched:
            self.stage.captioner.start_text()

    def collect(self, keep: int) -> None:
        """Captions into their rows: those of every launched batch whose text is ready, and of the oldest ones until
        at most ``keep`` batches wait."""
        while self.launched and (len(self.launched) > keep or self.launched[0][1].done()):
            rows, captions, seconds = self.launched.popleft()
            for (row, digest), caps in zip(rows, captions.result()):
                row["captions"] = caps
                if digest is not None:
                    self.fresh.append((digest, caps, seconds))

    def resolve(self) -> None:
        """Captions of the candidate hits, fetched together; a candidate not found is captioned (decoded first
        if the pass only read its header)."""
        found = self.index.fetch(item.digest for _, item, _ in self.candidates)
        for row, item, view in self.candidates:
            cached = found.get(item.digest)
            if cached is not None:
                row["captions"], row["caption_source"] = cached.captions, "cache"
                self.counts.hits += 1
                self.counts.seconds_saved += cached.seconds
                self.hits.append(item.digest)
                continue
            self.counts.misses += 1
            if view is None:
                try:
                    decoded = self.images.decode_views(item)[self.settings.image_size]
                    view = (decoded[None].to(self.stage.torch_device), 0)
                except SampleError as exc:
                    row["reason"] = str(exc)
                    continue
            self.caption_later(row, view, item.digest)
        self.candidates.clear()

    def embed_clip(self, items: list[Item], views: dict[int, torch.Tensor], tokens: np.ndarray, first: int) -> None:
        """Launch CLIP on the batch's valid images and their alt-texts (``tokens``: by slot). Their vectors are copied
        to the host after the next image batch (:meth:`collect_clip`): on CUDA, BLIP's launch waits for the device,
        and CLIP launched right after it keeps the device busy while this thread puts captions into rows and builds
        the next batch's rows; the copy then finds the vectors ready."""
        chosen = [(first + i, item.slot) for i, item in enumerate(items)
                  if item.slot is not None and self.rows[first + i]["reason"] is None]
        if not chosen:
            return
        clip = self.stage.clip
        rows, slots = np.array([r for r, _ in chosen]), np.array([slot for _, slot in chosen])
        image = clip.encode_images(gather([(views[clip.view.size], slot) for _, slot in chosen]))
        self.clip_launched.append((rows, image, clip.encode_tokens(tokens[slots])))

    def collect_clip(self, keep: int) -> None:
        """The oldest launched CLIP vectors on the host until at most ``keep`` batches wait, and the CLIP score of
        their rows from the full-precision vectors."""
        while len(self.clip_launched) > keep:
            rows, image, text = self.clip_launched.popleft()
            image, text = image.cpu().numpy(), text.cpu().numpy()
            for r, score in zip(rows, np.einsum("ij,ij->i", image.astype(np.float64), text.astype(np.float64))):
                self.rows[r]["clip_score"] = float(score)
            self.clip_rows.append(rows)
            self.clip_images.append(image)
            self.clip_texts.append(text)

    def table(self) -> tuple[pa.Table, dict[str, Any]]:
        shard, rows = self.shard, self.rows
        expected = expected_samples(shard)
        missing = expected.missing({row["key"] for row in rows})
        rows += [self._missing_row(shard, len(rows) + i, listed) for i, listed in enumerate(missing)]
        if shard.current_identity() != shard.identity:
            raise InconsistentRun(f"shard {shard.shard_id}: {shard.tar_uri} changed while it was being read; "
                                  "run the stage again")
        for row in rows:
            row["status"] = "ok" if row["reason"] is None else "failed"
            if row["reason"] is not None:
                row["clip_score"] = None
        captioner = self.stage._captioner
        facts = {"expected": expected.count, "expected_source": expected.source, "missing_from_tar": len(missing),
                 "captioned": sum(r["caption_source"] == "captioner" for r in rows),
                 "provided": sum(r["caption_source"] == "provided" for r in rows),
                 "caption_batch_size": self.batch_size, "decode_workers": self.images.workers,
                 "gpu_decode_refused": self.images.gpu_refused,
                 "oom_splits": getattr(captioner, "oom_splits", 0),
                 "device": self.stage.device.describe()}
        if self.cache is not None:
            self.cache.add(self.fresh, self.counts)
            self.cache.record_hits(self.hits, self.counts)
            facts["cache"] = self.counts.as_facts()
        table = pa.Table.from_pylist(rows, schema=CAPTIONS_SCHEMA)
        if self.settings.computes_clip:
            ok = np.array([row["status"] == "ok" for row in rows])
            picked = np.concatenate(self.clip_rows) if self.clip_rows else np.zeros(0, np.int64)
            dim = self.clip_images[0].shape[1] if self.clip_images else self.stage.clip.dim
            empty = np.zeros((0, dim), np.float32)
            table = store_vectors(table, self.settings.embeddings, ok, picked, {
                "clip_image_embedding": np.concatenate(self.clip_images) if self.clip_images else empty,
                "clip_text_embedding": np.concatenate(self.clip_texts) if self.clip_texts else empty})
        return table, facts

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
    def _row(item: Item, metadata_clip: dict[str, float]) -> dict[str, Any]:
        sample = item.sample
        meta = sample.meta
        reason = sample.reason
        if reason is None and metadata_clip and metadata_clip.get(sample.uid) is None:
            reason = "missing_metadata_clip_score"
        return {
            "uid": sample.uid, "shard": sample.shard, "key": sample.key, "position": sample.position,
            "status": None, "reason": reason, "text": sample.text, "text_truncated": sample.text_truncated,
            "url": sample.url, "width": item.width, "height": item.height,
            "original_width": _int_or_none(meta.get("original_width")),
            "original_height": _int_or_none(meta.get("original_height")),
            "captions": None, "caption_source": None, "metadata_clip_score": metadata_clip.get(sample.uid),
            "clip_score": None,
        }


def _identity_if_any(uri: str) -> dict[str, Any] | None:
    """The file's identity, None where there is no such file (one request, not an existence check first)."""
    try:
        return storage.file_identity(uri)
    except FileNotFoundError:
        return None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
