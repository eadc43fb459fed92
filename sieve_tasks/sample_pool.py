"""``sieve make-sample``: a small demo pool of real photos (bundled with scikit-image / scikit-learn) in
the DataComp layout, with hand-written alt-texts, some aligned with the image and some not."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable

import numpy as np
import pyarrow as pa
from PIL import Image

from sieve_tasks import storage


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return image[0] if isinstance(image, tuple) else image

    return load


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[index]

    return load


# (image, alt-text, aligned?) — the alt-texts are ours, written for this demo.
SAMPLES: list[tuple[Callable[[], np.ndarray], str, bool]] = [
    (_skimage("astronaut"), "Portrait of an astronaut in a white space suit with the American flag", True),
    (_skimage("chelsea"), "A ginger tabby cat looking to the side", True),
    (_skimage("coffee"), "A cup of coffee with latte art on a saucer", True),
    (_skimage("rocket"), "A rocket on the launch pad ready for lift-off", True),
    (_skimage("stereo_motorcycle"), "A red motorcycle parked in a studio", True),
    (_sklearn(0), "Chinese pagoda temple in a garden under a blue sky", True),
    (_sklearn(1), "Close-up photo of a pink flower", True),
    (_skimage("coins"), "Old coins laid out on a table", True),
    (_skimage("hubble_deep_field"), "Buy cheap shoes online free shipping", False),
    (_skimage("camera"), "Best mortgage rates 2024 click here", False),
    (_skimage("clock"), "stock photo image 4471", False),
    (_skimage("immunohistochemistry"), "Wedding dress with lace sleeves", False),
    (_skimage("brick"), "Download the PDF user manual", False),
    (_skimage("retina"), "A family dinner at the beach at sunset", False),
    (_skimage("colorwheel"), "Un gato durmiendo en el sofá", False),
    (_skimage("grass"), "IMG_2093.JPG", False),
]


def _jpeg(array: np.ndarray) -> tuple[bytes, int, int]:
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).astype(np.uint8)
    image = Image.fromarray(array).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), image.width, image.height


def make_sample_pool(out: str, shards: int = 2, with_bad_sample: bool = True) -> list[str]:
    """Write the demo pool to ``out`` (local or s3) and return its tar URIs.

    ``with_bad_sample`` adds one corrupt JPEG to the last shard, so the demo shows a failure reason.
    """
    if shards < 1:
        raise ValueError(f"a sample pool needs at least one shard, not {shards}")
    per_shard = -(-len(SAMPLES) // shards)
    written = []
    for shard in range(shards):
        chunk = SAMPLES[shard * per_shard : (shard + 1) * per_shard]
        records = []
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for index, (load, text, _aligned) in enumerate(chunk):
                records.append(_add_sample(tar, shard, index, *_jpeg(load()), text))
            if with_bad_sample and shard == shards - 1:
                records.append(_add_sample(tar, shard, len(chunk), b"\xff\xd8\xff\xe0 not really a jpeg", 0, 0,
                                           "A corrupt download that cannot be decoded"))
        tar_uri = storage.join(out, f"{shard:08d}.tar")
        storage.write_bytes_atomic(tar_uri, buffer.getvalue())
        storage.write_parquet_atomic(storage.join(out, f"{shard:08d}.parquet"), pa.Table.from_pylist(records))
        storage.write_json_atomic(storage.join(out, f"{shard:08d}_stats.json"),
                                  {"count": len(records), "successes": len(records), "failed_to_download": 0})
        written.append(tar_uri)
    return written


def _add_sample(tar: tarfile.TarFile, shard: int, index: int, jpeg: bytes, width: int, height: int,
                text: str) -> dict:
    key = f"{shard:05d}{index:04d}"
    url = f"https://example.com/sieve-demo/{key}.jpg"
    record = {
        "uid": hashlib.md5(url.encode()).hexdigest(), "url": url, "caption": text, "key": key,
        "status": "success", "error_message": None, "width": width, "height": height,
        "original_width": width, "original_height": height, "sha256": hashlib.sha256(jpeg).hexdigest(),
    }
    for ext, payload in (("jpg", jpeg), ("txt", text.encode()), ("json", json.dumps(record).encode())):
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return record
