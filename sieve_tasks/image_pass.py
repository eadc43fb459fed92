"""The image pass: the one place where a shard's images are read, validated and decoded, each exactly once.

A producer thread streams the tar (``shards.read_samples``, which also checks each image's header: its size and
the pixel limit, before any decoding; on CUDA in a reader process of its own, ``tar_reader``), hands the samples
that need a CPU decode to decode workers (as many as the machine has cores by default), and assembles *batches*
in tar order: every sample read (failed ones too, so callers see each sample once and in order) and, per view
size S, one uint8 tensor ``(n, 3, S, S)`` holding the model view (shorter side resized bicubic to S, centre crop:
CLIP's and SIEVE's BLIP preprocessing; both models share one view at 224 px) of the samples that asked for
pixels. A bounded queue of finished batches lets reading and decoding run ahead of the models without holding a
whole shard in memory. On CUDA the batch is staged in pinned memory (the consumer copies it with
``non_blocking=True``), and JPEGs are decoded on the GPU with nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``,
batched); other formats and any image the GPU decoder refuses go through PIL, which gives the same ``reason``
codes.

Normalisation (``(x / 255 - mean) / std``, torchvision's ``ToTensor`` + ``Normalize`` arithmetic) happens on
the model's device: :meth:`ImageView.normalize`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from PIL import Image

from sieve_tasks import storage
from sieve_tasks.shards import Sample, SampleError, Shard, decode_image, read_samples
from sieve_tasks.tar_reader import samples_in_process

if TYPE_CHECKING:  # torch is imported where it is used: the report reads images through this module without it
    import torch

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8"
# how often a consumer waiting for a batch checks that the producer thread is still alive (a producer that dies
# without handing over an error or its end would otherwise leave it waiting for ever)
PRODUCER_CHECK_SECONDS = 1.0
# a batch holds at most this many samples per view of its batch size (samples without a view count too)
ITEMS_PER_VIEW = 4


class Need(Enum):
    """What a sample needs from the pass."""

    NOTHING = "nothing"  # a failed sample, passed through
    HEADER = "header"  # its header only, checked by the reader (e.g. captions that may come from a cache)
    VALIDATE = "validate"  # decoded once to prove it decodes, no pixels kept
    PIXELS = "pixels"  # decoded, and its model view kept in the batch


@dataclass(frozen=True)
class ImageView:
    """A model's input: the shorter side resized (bicubic) to ``size``, centre-cropped, normalised."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 ``(n, 3, S, S)`` → the model's input, with torchvision's ``ToTensor`` + ``Normalize`` arithmetic."""
        mean, std = _channel_stats(self.mean, self.std, pixels.device)
        return pixels.float().div_(255).sub_(mean).div_(std).to(dtype)


@functools.cache
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Mean and std as ``(1, 3, 1, 1)`` tensors on ``device``, made once (not two host-to-device copies a batch)."""
    import torch

    return tuple(torch.tensor(values, device=device).view(1, 3, 1, 1) for values in (mean, std))


@dataclass
class Item:
    """One sample as the pass saw it."""

    sample: Sample
    need: Need = Need.NOTHING
    width: int | None = None
    height: int | None = None
    digest: bytes | None = None  # SHA-256 of the image bytes, when the pass was asked for digests
    slot: int | None = None  # row of the batch's ``pixels`` holding this sample's views
    views: dict[int, torch.Tensor] | None = field(default=None, repr=False)  # uint8, by size (CPU path)
    jpeg: bool = False  # to be decoded on the GPU


@dataclass
class ImageBatch:
    items: list[Item]
    pixels: dict[int, torch.Tensor]  # by size, uint8 (n, 3, S, S): pinned CPU memory, or on the GPU (nvJPEG)
    ready: torch.cuda.Event | None = None  # the GPU decode's completion, on the producer's stream

    def pixels_on(self, device: torch.device) -> dict[int, torch.Tensor]:
        """The batch's views on ``device``; a copy from pinned memory does not block the caller."""
        import torch

        if self.ready is not None:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(self.ready)
            for pixels in self.pixels.values():
                pixels.record_stream(stream)
            return self.pixels
        return {size: pixels.to(device, non_blocking=True) for size, pixels in self.pixels.items()}


class BatchStream:
    """The batches of one shard as its producer thread finishes them (bounded queue)."""

    def __init__(self, producer: threading.Thread, results: queue.Queue, stop: threading.Event):
        self.producer, self.results, self.stop = producer, results, stop

    def __iter__(self) -> Iterator[ImageBatch]:
        while True:
            try:
                batch = self.results.get(timeout=PRODUCER_CHECK_SECONDS)
            except queue.Empty:
                if self.producer.is_alive():
                    continue
                try:  # it may have handed its last batch over just before it ended
                    batch = self.results.get_nowait()
                except queue.Empty:
                    raise RuntimeError(f"{self.producer.name} ended without finishing its shard") from None
            if batch is None:
                return
            if isinstance(batch, BaseException):
                raise batch
            yield batch

    def close(self) -> None:
        """Stop the producer (it may be waiting on a full queue) and wait for it."""
        self.stop.set()
        while self.producer.is_alive():
            try:
                self.results.get(timeout=0.05)
            except queue.Empty:
                pass
        self.producer.join()


def default_workers() -> int:
    """Decode threads: every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """The CPU decode of one image (PIL, RGB), refusing images over ``max_pixels`` from their header first."""
    return decode_image(data, max_pixels)


def view_of(image: Image.Image, size: int) -> torch.Tensor:
    """uint8 ``(3, size, size)``: shorter side to ``size`` (bicubic), centre crop, as CLIP's preprocessing does."""
    from torchvision.transforms import functional as F
    from torchvision.transforms import InterpolationMode

    resized = F.center_crop(F.resize(image, size, interpolation=InterpolationMode.BICUBIC), [size, size])
    return F.pil_to_tensor(resized)


def _unrounded_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """A decoded uint8 ``(3, H, W)`` tensor's view before rounding: float ``(3, size, size)``, torchvision's output
    size and crop offsets, bicubic with antialiasing."""
    import torch.nn.functional as F

    height, width = image.shape[-2:]
    if height <= width:
        new_height, new_width = size, int(size * width / height)
    else:
        new_height, new_width = int(size * height / width), size
    resized = F.interpolate(image[None].float(), size=(new_height, new_width), mode="bicubic", antialias=True,
                            align_corners=False)[0]
    top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
    return resized[:, top : top + size, left : left + size]


def write_views(images: list[tuple[int, torch.Tensor]], out: torch.Tensor, rows_per_round: int = 64) -> None:
    """:func:`view_of` for decoded uint8 ``(3, H, W)`` tensors on any device: ``out[slot]`` (uint8 ``(n, 3, S, S)``)
    gets the view of each ``(slot, image)``, slots ascending; the same bytes as torchvision's tensor ``resize`` and
    ``center_crop``. Views are staged in float, and rounded, clamped and cast for up to ``rows_per_round``
    consecutive rows at once: three kernels per image instead of six (on CUDA each launch is host time under the
    interpreter lock that feeds the GPU). Rows of a round without an image get garbage: write them after."""
    import torch

    if not images:
        return
    size = out.shape[-1]
    staged = torch.empty((min(rows_per_round, len(out)), 3, size, size), device=out.device)
    first = last = images[0][0]

    def round_staged() -> None:
        out[first : last + 1].copy_(staged[: last - first + 1].round_().clamp_(0, 255))

    for slot, image in images:
        if slot - first >= len(staged):
            round_staged()
            first = slot
        staged[slot - first] = _unrounded_view(image, size)
        last = slot
    round_staged()


class ImagePass:
    """Reads a shard once and yields :class:`ImageBatch` es of at most ``batch_size`` samples with views, in tar
    order; ``sizes`` are the view sizes the models need."""

    def __init__(self, sizes: tuple[int, ...], max_pixels: int, batch_size: int, workers: int | None = None,
                 device: torch.device | str = "cpu", prefetch: int = 3, jpeg_decoder: str | None = None,
                 reader_process: bool | None = None):
        import torch

        self.sizes = tuple(sorted(set(sizes)))
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self.workers = workers or default_workers()
        self.device = torch.device(device)
        self.prefetch = prefetch
        on_cuda = self.device.type == "cuda"
        # torchvision decodes JPEGs on the model's device (nvJPEG on CUDA; libjpeg on CPU, used by the tests)
        self.jpeg_decoder = jpeg_decoder or ("torchvision" if on_cuda else "pil")
        if self.jpeg_decoder not in ("pil", "torchvision"):
            raise ValueError(f"jpeg_decoder must be 'pil' or 'torchvision', not {jpeg_decoder!r}")
        self.pin = on_cuda
        # on CUDA the tar is parsed in a process of its own (default): see :mod:`sieve_tasks.tar_reader`
        self.reader_process = on_cuda if reader_process is None else reader_process
        self.gpu_refused = 0  # JPEGs torchvision's decoder refused (decoded by PIL instead)

    def decode_views(self, item: Item) -> dict[int, torch.Tensor]:
        """Decode a sample the pass only looked at (``Need.HEADER``) and return its uint8 views: its one decode."""
        image = decode(item.sample.image, self.max_pixels)
        self.check_resizable(*image.size)
        return self._views(image)

    def check_resizable(self, width: int, height: int) -> None:
        """Refuse (``extreme_aspect_ratio``) an image whose views would be resized through an image over the pixel
        limit: the shorter side goes to the view's size, so a 1 × 60,000 px line becomes 224 × 13 million px."""
        short, long = sorted((width, height))
        if max(self.sizes) * int(max(self.sizes) * long / short) > self.max_pixels:
            raise SampleError("extreme_aspect_ratio")

    def _views(self, image: Image.Image) -> dict[int, torch.Tensor]:
        return {size: view_of(image, size) for size in self.sizes}

    def batches(self, shard: Shard, need: Callable[[Item], Need], digests: bool = False) -> Iterator[ImageBatch]:
        """The shard's samples in batches. ``need`` decides per sample (it runs in a decode thread, after the
        digest is computed when ``digests``)."""
        stream = self.start(shard, need, digests)
        try:
            yield from stream
        finally:
            stream.close()

    def start(self, shard: Shard, need: Callable[[Item], Need], digests: bool = False) -> BatchStream:
        """Start reading and decoding ``shard`` now (e.g. while the models still work on the shard before it); the
        returned stream yields its batches and must be closed."""
        results: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        producer = threading.Thread(target=storage.carrying_options(self._produce),
                                    args=(shard, need, digests, results, stop),
                                    name=f"image-pass-{shard.shard_id}", daemon=True)
        producer.start()
        return BatchStream(producer, results, stop)

    # ------------------------------------------------------------------ producer side

    def _produce(self, shard: Shard, need: Callable[[Item], Need], digests: bool, results: queue.Queue,
                 stop: threading.Event) -> None:
        import torch

        def put(value) -> bool:
            while not stop.is_set():
                try:
                    results.put(value, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            stream = torch.cuda.Stream(self.device) if self.jpeg_decoder == "torchvision" and self.pin else None
            items: list[Item] = []
            views = 0

            def take(item: Item) -> bool:
                """Add a prepared sample; hand the batch over once it holds ``batch_size`` views, or
                ``ITEMS_PER_VIEW`` times as many samples (those without views: cache candidates, failures), so a
                shard of cache hits is not held whole (False: the consumer stopped)."""
                nonlocal items, views
                items.append(item)
                views += item.slot is not None
                if views < self.batch_size and len(items) < ITEMS_PER_VIEW * self.batch_size:
                    return True
                batch, items, views = items, [], 0
                return put(self._assemble(batch, stream))

            samples = (samples_in_process if self.reader_process else read_samples)(shard, self.max_pixels)
            with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool, contextlib.closing(samples):
                # in tar order: samples being decoded (futures), and, when nothing is hashed, samples that need no
                # CPU decode (JPEGs for the GPU, failed ones) as they are: no thread hand-off for them
                pending: deque[Future[Item] | Item] = deque()
                for sample in samples:
                    if stop.is_set():
                        return
                    if digests:  # hashing runs in the workers too
                        pending.append(pool.submit(self._prepare, sample, need, digests))
                    else:
                        item = self._look(sample, need, digests)
                        pending.append(pool.submit(self._decode, item) if self._decodes_on_cpu(item) else item)
                    while len(pending) > 2 * self.batch_size or (pending and _ready(pending[0])):
                        if not take(_result(pending.popleft())):
                            return
                while pending:
                    if not take(_result(pending.popleft())):
                        return
                if items and not put(self._assemble(items, stream)):
                    return
            put(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)

    def _look(self, sample: Sample, need: Callable[[Item], Need], digests: bool) -> Item:
        """A sample as read (its image header already checked by the reader), before any decoding: its digest,
        what it needs, and whether the GPU decodes it."""
        item = Item(sample, width=sample.width, height=sample.height)
        if not sample.ok:
            return item
        if digests:
            item.digest = hashlib.sha256(sample.image).digest()
        item.need = need(item)
        if item.need in (Need.PIXELS, Need.HEADER):  # a cache hit too: a cold run would refuse it when captioning
            try:
                self.check_resizable(sample.width, sample.height)
            except SampleError as exc:
                sample.reason, item.need = str(exc), Need.NOTHING
                return item
        item.jpeg = (item.need is Need.PIXELS and self.jpeg_decoder == "torchvision"
                     and sample.image.startswith(JPEG_MAGIC))
        if item.jpeg:
            item.slot = -1  # numbered when the batch is assembled
        return item

    @staticmethod
    def _decodes_on_cpu(item: Item) -> bool:
        return item.need in (Need.VALIDATE, Need.PIXELS) and not item.jpeg

    def _decode(self, item: Item) -> Item:
        """The CPU decode of a sample that needs one (in a decode worker)."""
        try:
            image = decode(item.sample.image, self.max_pixels)
        except SampleError as exc:
            item.sample.reason = str(exc)
            return item
        if item.need is Need.PIXELS:
            item.views = self._views(image)
            item.slot = -1
        return item

    def _prepare(self, sample: Sample, need: Callable[[Item], Need], digests: bool) -> Item:
        item = self._look(sample, need, digests)
        return self._decode(item) if self._decodes_on_cpu(item) else item

    def _assemble(self, items: list[Item], stream: torch.cuda.Stream | None) -> ImageBatch:
        import torch

        with_view = [item for item in items if item.slot is not None]
        for slot, item in enumerate(with_view):
            item.slot = slot
        if not with_view:
            return ImageBatch(items, {})
        if self.jpeg_decoder == "torchvision":
            return self._assemble_decoded(items, with_view, stream)
        pixels = {size: torch.empty((len(with_view), 3, size, size), dtype=torch.uint8, pin_memory=self.pin)
                  for size in self.sizes}
        # numpy copies the views in (one thread, as fast here): torch's copy would use its intra-op threads, which
        # wait for cores the decode threads hold (a first batch of 32 took 13-233 ms to assemble that way, 3-10 now)
        rows = {size: batch.numpy() for size, batch in pixels.items()}
        for item in with_view:
            for size, view in item.views.items():
                rows[size][item.slot] = view.numpy()
            item.views = None
        return ImageBatch(items, pixels)

    def _assemble_decoded(self, items: list[Item], with_view: list[Item],
                          stream: torch.cuda.Stream | None) -> ImageBatch:
        """torchvision for the JPEGs, on the device (batched; one by one if the batch is refused), on the
        producer's own CUDA stream; PIL for the other formats and the refused ones."""
        import torch

        from torchvision.io import ImageReadMode, decode_jpeg

        jpegs = [item for item in with_view if item.jpeg]
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            pixels = {size: torch.empty((len(with_view), 3, size, size), dtype=torch.uint8, device=self.device)
                      for size in self.sizes}
            decoded: list[torch.Tensor | None] = []
            if jpegs:
                data = [torch.frombuffer(bytearray(item.sample.image), dtype=torch.uint8) for item in jpegs]
                try:
                    decoded = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    decoded = [self._decode_one(d) for d in data]
            images = []
            for item, image in zip(jpegs, decoded):
                if image is None or image.shape[0] != 3:
                    self.gpu_refused += 1
                    try:
                        item.views = self.decode_views(item)
                    except SampleError as exc:
                        item.sample.reason = str(exc)
                    continue
                images.append((item.slot, image))
            for size in self.sizes:
                write_views(images, pixels[size])
            for item in with_view:  # after write_views: the rows it leaves to others
                if item.views is not None:
                    for size, view in item.views.items():
                        pixels[size][item.slot] = view.to(self.device)
                    item.views = None
            ready = None
            if stream is not None:
                ready = torch.cuda.Event()
                ready.record(stream)
        return ImageBatch(items, pixels, ready)

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None


def _ready(entry: Future[Item] | Item) -> bool:
    return not isinstance(entry, Future) or entry.done()


def _result(entry: Future[Item] | Item) -> Item:
    return entry.result() if isinstance(entry, Future) else entry


def image_bytes(shard: Shard, positions: set[int]) -> dict[int, bytes]:
    """The image bytes of a few samples by position (the report's thumbnails, cut at publish: the one read of a
    tar after the image pass), streaming the tar only as far as the last one."""
    wanted, found = set(positions), {}
    for sample in read_samples(shard):
        if sample.position in wanted and sample.image:
            found[sample.position] = sample.image
            wanted.discard(sample.position)
        if not wanted or sample.position > max(wanted):
            break
    return found
