"""Builds small DataComp-layout shards with chosen defects, from real photos, for the tests."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field

from PIL import Image


def photo_jpeg(name: str = "astronaut", size: int | None = 256) -> bytes:
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    if size:
        image = image.resize((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def bomb_png(side: int = 20000) -> bytes:
    """A tiny PNG whose header claims side×side pixels (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def uid_for(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


@dataclass
class Member:
    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    linkname: str = ""


@dataclass
class ShardBuilder:
    members: list[Member] = field(default_factory=list)

    def sample(self, key: str, text: str | bytes | None = "a photo", image: bytes | None = None,
               meta: dict | bytes | None = None, image_ext: str = "jpg") -> str:
        """Add a sample; ``meta`` None builds a valid json with a uid derived from the key."""
        uid = uid_for(key)
        if image is not None:
            self.members.append(Member(f"{key}.{image_ext}", image))
        if text is not None:
            self.members.append(Member(f"{key}.txt", text if isinstance(text, bytes) else text.encode()))
        if meta is None:
            meta = {"uid": uid, "url": f"https://example.com/{key}.jpg", "key": key}
        if meta != b"<none>":
            self.members.append(Member(f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode()))
        return uid

    def raw(self, name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, linkname: str = "") -> None:
        self.members.append(Member(name, data, kind, linkname))

    def tar_bytes(self) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for m in self.members:
                info = tarfile.TarInfo(m.name)
                info.type = m.kind
                info.linkname = m.linkname
                info.size = len(m.data) if m.kind == tarfile.REGTYPE else 0
                tar.addfile(info, io.BytesIO(m.data) if m.kind == tarfile.REGTYPE else None)
        return buffer.getvalue()

    def write(self, path) -> None:
        path.write_bytes(self.tar_bytes())



def write_photo_day(directory, day: str, photos: list[int]) -> None:
    """A crawl day of two shards holding the demo photos ``photos`` (indexes into ``sample_pool.SAMPLES``) with
    keys, uids and alt-texts of that day: the same photo on two days has the same bytes and nothing else."""
    from sieve_tasks.sample_pool import SAMPLES, _jpeg

    directory.mkdir(parents=True)
    for number, chunk in enumerate([photos[: len(photos) // 2], photos[len(photos) // 2 :]]):
        builder = ShardBuilder()
        for index, photo in enumerate(chunk):
            jpeg = _jpeg(SAMPLES[photo][0]())[0]
            builder.sample(f"{day}{number:02d}{index:04d}", f"{day}: {SAMPLES[(photo + 3) % 16][1]}", jpeg)
        builder.write(directory / f"{number:08d}.tar")
