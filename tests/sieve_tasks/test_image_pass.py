"""The image pass: each image decoded once across all stages, batches in tar order, the models' own
preprocessing, scores equal to the pipeline's before the image pass with every ``--embeddings`` choice."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sieve_tasks import image_pass
from sieve_tasks.cli import main
from sieve_tasks.image_pass import ImagePass, Need
from sieve_tasks.pool import register_pool

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "scores_before_image_pass.json"


@pytest.fixture
def decodes(monkeypatch) -> Counter:
    """Every CPU decode, by image (SHA-256 of its bytes)."""
    counted: Counter = Counter()
    real = image_pass.decode
    lock = threading.Lock()

    def counting(data: bytes, max_pixels: int):
        with lock:
            counted[hashlib.sha256(data).hexdigest()] += 1
        return real(data, max_pixels)

    monkeypatch.setattr(image_pass, "decode", counting)
    return counted


CORRUPT = hashlib.sha256(b"\xff\xd8\xff\xe0 not really a jpeg").hexdigest()  # the sample pool's bad sample


def _images(pool: str) -> dict[str, int]:
    """Image digest → samples holding it, over the pool's sidecars (every sample the tars hold), less the corrupt
    one: its header cannot be read, so the reader refuses it before any decoding."""
    found: Counter = Counter()
    for path in sorted(Path(pool).glob("*.parquet")):
        found.update(pq.read_table(path, columns=["sha256"]).column("sha256").to_pylist())
    assert found.pop(CORRUPT) == 1
    return dict(found)


def test_each_image_is_decoded_once_across_all_stages(sample_pool, tmp_path, decodes):
    run = str(tmp_path / "run")
    for stage in ("caption", "embed", "score"):
        assert main([stage, sample_pool, run, "--profile", "test"]) == 0
    assert dict(decodes) == _images(sample_pool)
    reasons = pq.read_table(f"{run}/captions", columns=["reason"]).column("reason").to_pylist()
    assert [r for r in reasons if r] == ["undecodable_image"]  # the corrupt one: refused from its header
    decodes.clear()
    assert main(["aggregate", run]) == 0
    assert main(["publish", run]) == 0
    assert 0 < sum(decodes.values()) <= 32  # the report's thumbnails, cut at publish: the one exception


def test_provided_captions_without_clip_still_validate_each_image_once(sample_pool, tmp_path, decodes):
    import pyarrow as pa

    captions = tmp_path / "captions.parquet"
    uids = [u for path in sorted(Path(sample_pool).glob("*.parquet"))
            for u in pq.read_table(path, columns=["uid"]).column("uid").to_pylist()]
    pq.write_table(pa.table({"uid": uids, "captions": [["a photo"]] * len(uids)}), captions)
    run = str(tmp_path / "run")
    for stage in ("caption", "embed", "score"):
        assert main([stage, sample_pool, run, "--profile", "test", "--clip", "none", "--captions", str(captions)]) == 0
    assert dict(decodes) == _images(sample_pool)


@pytest.mark.parametrize("embeddings", ["fp32", "fp16", "none"])
def test_scores_equal_the_pipeline_before_the_image_pass(sample_pool, tmp_path, embeddings):
    run = tmp_path / "run"
    assert main(["run", sample_pool, str(run), "--profile", "test", "--embeddings", embeddings,
                 "--no-progress"]) == 0
    reference = json.loads(REFERENCE.read_text())["scores"]
    rows = {f"{r['shard']}:{r['position']}": r for r in pq.read_table(run / "scores").to_pylist()}
    assert rows.keys() == reference.keys()
    for key, expected in reference.items():
        row = rows[key]
        assert (row["status"], row["reason"], row["best_caption"]) == (
            expected["status"], expected["reason"], expected["best_caption"]), key
        for name in ("sieve_score", "sieve_mean", "clip_score"):
            if expected[name] is None:
                assert row[name] is None, (key, name)
            else:
                assert row[name] == pytest.approx(expected[name], abs=1e-6), (key, name)
    captions = pq.read_table(run / "captions")
    embedded = pq.read_table(run / "embeddings")
    stored = {"clip_image_embedding", "clip_text_embedding", "text_embedding", "caption_embeddings"}
    names = set(captions.column_names) | set(embedded.column_names)
    assert "caption_similarities" in embedded.column_names
    if embeddings == "none":
        assert not names & stored
    else:
        assert stored <= names
        vectors = captions.column("clip_image_embedding").combine_chunks()
        assert vectors.type.value_type == ("float16" if embeddings == "fp16" else "float32")
        ok = [s == "ok" for s in captions.column("status").to_pylist()]
        assert [v is not None for v in vectors.to_pylist()] == ok
        first = np.asarray(vectors[ok.index(True)].as_py(), np.float32)
        assert abs(float(np.linalg.norm(first)) - 1) < 1e-2  # unit vectors


def test_batches_hold_every_sample_once_in_tar_order(sample_pool, tmp_path):
    shard = register_pool(sample_pool, str(tmp_path / "run"))[-1]  # the shard with the corrupt image
    images = ImagePass((224, 64), max_pixels=10**8, batch_size=3, workers=2)
    batches = list(images.batches(shard, lambda item: Need.PIXELS))
    items = [item for batch in batches for item in batch.items]
    assert [item.sample.position for item in items] == list(range(len(items)))
    assert [item.sample.reason for item in items].count("undecodable_image") == 1
    for batch in batches:
        views = [item for item in batch.items if item.slot is not None and item.sample.reason is None]
        assert len(views) <= 3 and [item.slot for item in views] == list(range(len(views)))
        assert {size: tuple(t.shape) for size, t in batch.pixels.items()} == {
            224: (len(views), 3, 224, 224), 64: (len(views), 3, 64, 64)}


def test_samples_without_views_are_handed_over_in_bounded_batches(sample_pool, tmp_path):
    """Samples that need no view (a shard of cache candidates, of failures) do not pile up into one batch held until
    the shard ends: a batch holds at most ``ITEMS_PER_VIEW`` × batch size samples."""
    shard = register_pool(sample_pool, str(tmp_path / "run"))[0]
    batches = list(ImagePass((32,), 10**8, batch_size=1).batches(shard, lambda item: Need.HEADER))
    sizes = [len(batch.items) for batch in batches]
    assert sum(sizes) > 4 and max(sizes) == 4 == image_pass.ITEMS_PER_VIEW
    assert all(not batch.pixels for batch in batches)


def test_views_are_the_models_own_preprocessing(sample_pool, tmp_path):
    from sieve_tasks.captioner import clip_style_transform
    from sieve_tasks.encoders import ClipEncoder
    from sieve_tasks.models import Device
    from sieve_tasks.test_models import TINY_CLIP

    clip = ClipEncoder(TINY_CLIP, Device.choose("cpu"), 8)
    blip = clip_style_transform(224)
    shard = register_pool(sample_pool, str(tmp_path / "run"))[0]
    batch = next(ImagePass((224,), 10**8, batch_size=4, workers=1).batches(shard, lambda item: Need.PIXELS))
    for item in batch.items[:4]:
        picture = image_pass.decode(item.sample.image, 10**8)
        view = batch.pixels[224][item.slot : item.slot + 1]
        assert torch.equal(clip.view.normalize(view, torch.float32)[0], clip.preprocess(picture))
        assert torch.equal(clip.view.normalize(view, torch.float32)[0], blip(picture))


@pytest.mark.parametrize("reader_process", [False, True])
def test_a_consumer_that_stops_early_stops_the_producer(sample_pool, tmp_path, reader_process):
    import multiprocessing

    shard = register_pool(sample_pool, str(tmp_path / "run"))[0]
    before = threading.active_count()
    images = ImagePass((32,), 10**8, batch_size=1, workers=2, prefetch=1, reader_process=reader_process)
    for _ in images.batches(shard, lambda item: Need.PIXELS):
        break
    assert threading.active_count() == before
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("reader_process", [False, True])
def test_a_read_error_reaches_the_consumer(tmp_path, reader_process):
    from sieve_tasks.shards import Shard

    missing = Shard("00000000", str(tmp_path / "00000000.tar"))
    with pytest.raises(FileNotFoundError):
        list(ImagePass((32,), 10**8, batch_size=2, reader_process=reader_process).batches(
            missing, lambda item: Need.PIXELS))


def test_a_producer_that_fails_as_it_starts_fails_the_consumer(sample_pool, tmp_path, monkeypatch):
    """Its CUDA stream made where its errors are handed over (a sticky CUDA error raises there)."""
    def broken_stream(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "Stream", broken_stream)
    shard = register_pool(sample_pool, str(tmp_path / "run"))[0]
    images = ImagePass((32,), 10**8, batch_size=2, jpeg_decoder="torchvision")
    images.pin = True  # as on CUDA
    with pytest.raises(RuntimeError, match="illegal memory access"):
        list(images.batches(shard, lambda item: Need.PIXELS))


def test_a_producer_that_ends_without_a_word_fails_the_consumer(sample_pool, tmp_path, monkeypatch):
    """A producer thread that ends without handing over its end or an error (a bug, a killed thread) is an error
    for the consumer, not a wait for ever."""
    monkeypatch.setattr(image_pass, "PRODUCER_CHECK_SECONDS", 0.05)
    monkeypatch.setattr(ImagePass, "_produce", lambda self, *args: None)
    shard = register_pool(sample_pool, str(tmp_path / "run"))[0]
    with pytest.raises(RuntimeError, match="image-pass-00000000 ended without finishing its shard"):
        list(ImagePass((32,), 10**8, batch_size=2).batches(shard, lambda item: Need.PIXELS))


def test_torchvision_jpeg_path_decodes_each_jpeg_once_and_falls_back_to_pil(sample_pool, tmp_path, decodes):
    """The path CUDA takes (nvJPEG), run with torchvision's CPU decoder: the same header check first, the same
    reasons, views within a level or two of PIL's, and PIL only for what torchvision refuses."""
    from PIL import Image

    from sieve_tasks.shards import Shard

    shard = register_pool(sample_pool, str(tmp_path / "run"))[-1]  # holds the corrupt JPEG
    reference = {item.sample.position: (item, batch.pixels[224][item.slot]) for batch in
                 ImagePass((224,), 10**8, 4, 2).batches(shard, lambda item: Need.PIXELS)
                 for item in batch.items if item.slot is not None and item.sample.reason is None}
    decodes.clear()
    items = {}
    for batch in ImagePass((224,), 10**8, 4, 2, jpeg_decoder="torchvision").batches(shard, lambda item: Need.PIXELS):
        for item in batch.items:
            items[item.sample.position] = item
            if item.sample.position in reference:
                pil_item, pil_view = reference[item.sample.position]
                assert (item.width, item.height) == (pil_item.width, pil_item.height)
                difference = (batch.pixels[224][item.slot].float() - pil_view.float()).abs()
                assert float(difference.mean()) < 1.5
    assert sum(decodes.values()) == 0  # every JPEG went through torchvision
    assert [i.sample.reason for i in items.values()].count("undecodable_image") == 1
    assert items.keys() - reference.keys() == {p for p, i in items.items() if i.sample.reason is not None}

    # a PNG and a JPEG torchvision refuses (CMYK is valid for PIL) go through PIL, once each
    import io
    import tarfile

    def member(tar, name, payload):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    png, cmyk = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(png, format="PNG")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    tar_path = tmp_path / "mixed" / "00000000.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        for key, ext, payload in (("a", "png", png.getvalue()), ("b", "jpg", cmyk.getvalue())):
            member(tar, f"{key}.{ext}", payload)
            member(tar, f"{key}.txt", b"an alt-text")
            member(tar, f"{key}.json", json.dumps({"uid": f"{ord(key):032x}"}).encode())
    decodes.clear()
    images = ImagePass((32,), 10**8, 4, 1, jpeg_decoder="torchvision")
    batch = next(images.batches(Shard("00000000", str(tar_path)), lambda item: Need.PIXELS))
    assert [item.sample.reason for item in batch.items] == [None, None]
    assert sum(decodes.values()) == 1 + images.gpu_refused  # the PNG, and the CMYK JPEG if refused
    assert batch.pixels[32].shape == (2, 3, 32, 32)


def _torchvision_view(image: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    return F.center_crop(F.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True), [size, size])


def test_views_written_in_rounds_are_torchvisions_resize_and_crop():
    """write_views stages views in float and rounds them a few rows at a time: the same bytes as torchvision's
    tensor resize and centre crop of each image, over rounds that split anywhere and rows left for other images in
    between."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(37, 53), (64, 64), (90, 31), (17, 200), (48, 48), (33, 34), (250, 19), (40, 41)]
    images = [(slot, torch.randint(0, 256, (3, *shape), generator=generator, dtype=torch.uint8))
              for slot, shape in zip((0, 1, 3, 4, 5, 8, 9, 11), shapes)]
    for size in (16, 32):
        expected = {slot: _torchvision_view(image, size) for slot, image in images}
        for rows_per_round in (1, 2, 3, 64):
            out = torch.full((12, 3, size, size), 7, dtype=torch.uint8)
            image_pass.write_views(images, out, rows_per_round)
            for slot, view in expected.items():
                assert torch.equal(out[slot], view), (size, rows_per_round, slot)
    out = torch.full((2, 3, 16, 16), 7, dtype=torch.uint8)
    image_pass.write_views([], out)
    assert bool((out == 7).all())


@pytest.mark.parametrize("jpeg_decoder", ["pil", "torchvision"])
def test_an_image_too_long_to_resize_is_refused_before_decoding(tmp_path, jpeg_decoder, decodes):
    """A 1 × 4,000 px line, whose shorter side going to 32 px would make a 32 × 128,000 px image (here over the
    pixel limit): refused with its reason, never decoded nor resized; the images beside it go on."""
    import io

    from PIL import Image

    from sieve_tasks.shards import SampleError, Shard
    from tests.shardmaker import ShardBuilder, photo_jpeg

    line, square = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (4000, 1), "red").save(line, "PNG")
    Image.new("RGB", (300, 300), "blue").save(square, "PNG")
    builder = ShardBuilder()
    builder.sample("a", "a photo", photo_jpeg(size=64))
    builder.sample("line", "a line", line.getvalue(), image_ext="png")
    builder.sample("square", "a square", square.getvalue(), image_ext="png")
    builder.write(tmp_path / "00000000.tar")
    images = ImagePass((32,), 100_000, 4, 1, jpeg_decoder=jpeg_decoder)
    batch, = images.batches(Shard("00000000", str(tmp_path / "00000000.tar")), lambda item: Need.PIXELS)
    assert [(item.sample.key, item.sample.reason, item.slot) for item in batch.items] == [
        ("a", None, 0), ("line", "extreme_aspect_ratio", None), ("square", None, 1)]
    assert batch.pixels[32].shape == (2, 3, 32, 32)
    assert hashlib.sha256(line.getvalue()).hexdigest() not in decodes
    with pytest.raises(SampleError, match="extreme_aspect_ratio"):  # a header-only sample decoded later
        images.decode_views(image_pass.Item(batch.items[1].sample))
    # a sample the caption cache may hold (its header only): refused too, as a cold run captioning it would
    looked, = images.batches(Shard("00000000", str(tmp_path / "00000000.tar")), lambda item: Need.HEADER)
    assert [item.sample.reason for item in looked.items] == [None, "extreme_aspect_ratio", None]


def test_torchvision_path_keeps_pil_views_between_jpegs(tmp_path):
    """A PNG between two JPEGs: the JPEGs' rows are written in one round, which leaves garbage in the PNG's row;
    the PNG's view is written after it."""
    import io
    import tarfile

    from PIL import Image
    from torchvision.io import decode_image as torchvision_decode

    from sieve_tasks.shards import Shard

    rng = np.random.default_rng(0)
    payloads = {}
    for key, ext, shape in (("a", "jpg", (41, 57)), ("b", "png", (30, 44)), ("c", "jpg", (66, 35))):
        encoded = io.BytesIO()
        pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(encoded, "JPEG" if ext == "jpg" else "PNG")
        payloads[key] = (ext, encoded.getvalue())
    tar_path = tmp_path / "00000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key, (ext, payload) in payloads.items():
            for name, data in ((f"{key}.{ext}", payload), (f"{key}.txt", b"alt"),
                               (f"{key}.json", json.dumps({"uid": f"{ord(key):032x}"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    images = ImagePass((32,), 10**8, 4, 1, jpeg_decoder="torchvision")
    batch = next(images.batches(Shard("00000000", str(tar_path)), lambda item: Need.PIXELS))
    assert images.gpu_refused == 0 and [item.slot for item in batch.items] == [0, 1, 2]
    for item, (key, (ext, payload)) in zip(batch.items, payloads.items()):
        if ext == "png":
            expected = image_pass.view_of(Image.open(io.BytesIO(payload)).convert("RGB"), 32)
        else:
            decoded = torchvision_decode(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
            expected = _torchvision_view(decoded, 32)
        assert torch.equal(batch.pixels[32][item.slot], expected), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_batches_on_cuda_match_pil(sample_pool, tmp_path):
    """On CUDA the JPEGs are decoded by nvJPEG on the producer's stream; the consumer sees them after the event."""
    shard = register_pool(sample_pool, str(tmp_path / "run"))[-1]
    reference = {item.sample.position: batch.pixels[224][item.slot] for batch in
                 ImagePass((224,), 10**8, 4, 2).batches(shard, lambda item: Need.PIXELS)
                 for item in batch.items if item.slot is not None and item.sample.reason is None}
    images = ImagePass((224,), 10**8, 4, 2, device="cuda")
    seen = 0
    for batch in images.batches(shard, lambda item: Need.PIXELS):
        pixels = batch.pixels_on(torch.device("cuda"))
        for item in batch.items:
            if item.sample.position in reference:
                assert pixels[224].device.type == "cuda"
                difference = (pixels[224][item.slot].cpu().float() - reference[item.sample.position].float()).abs()
                assert float(difference.mean()) < 2.0
                seen += 1
    assert seen == len(reference) and images.gpu_refused == 0
