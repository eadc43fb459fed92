"""Streaming reader for DataComp / img2dataset WebDataset shards (local or S3).

A shard is ``NNNNNNNN.tar`` holding ``{key}.jpg|.txt|.json`` per sample. Members are streamed, never
extracted; whatever is wrong with one sample is recorded on that sample as a ``reason`` and the rest of
the shard goes on.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from sieve_tasks import storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SAMPLE_EXTENSIONS = (*IMAGE_EXTENSIONS, "txt", "json")  # the fields read; a sample's other members are skipped
UID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
SHARD_NAME = re.compile(r"^[0-9A-Za-z_-]+$")
# SIEVE masks the whole alt-text before the sentence encoder keeps its first 256 tokens, so a text is kept whole up
# to this bound (a masked spam prefix can be thousands of characters long); longer ones, junk, are cut (recorded
# as text_truncated)
MAX_TEXT_CHARS = 65_536
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit
READ_AHEAD = 8 << 20  # bytes read from a tar at a time


class NoShardsFound(FileNotFoundError):
    """The input names no ``.tar`` shard (an empty crawl day, a wrong prefix)."""


class SampleError(Exception):
    """A per-sample problem; its message is the recorded ``reason``."""


@dataclass
class Sample:
    shard: str
    position: int
    key: str
    uid: str | None = None
    text: str | None = None
    url: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    image: bytes | None = None
    reason: str | None = None
    text_truncated: bool = False
    width: int | None = None  # from the image's header, when the reader was asked to check it
    height: int | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class Shard:
    """One input shard: its id (file stem, e.g. ``00000000``), where its tar lives and what identifies its
    content (size and mtime, or size and ETag: see :func:`storage.file_identity`) when it was listed."""

    shard_id: str
    tar_uri: str
    identity: str = ""

    @property
    def metadata_uri(self) -> str:
        return self.tar_uri[: -len(".tar")] + ".parquet"

    @property
    def stats_uri(self) -> str:
        return self.tar_uri[: -len(".tar")] + "_stats.json"

    def current_identity(self) -> str:
        """The tar's identity now (one metadata request), to detect a shard replaced while it was read."""
        return identity_token(storage.file_identity(self.tar_uri))


def identity_token(identity: dict[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True)


def canonical_uids(uids: list[object]) -> list[object]:
    """uids in the one form the outputs use (lower-case hex): DataComp's are lower-case, other tables may not be."""
    return [u.lower() if isinstance(u, str) else u for u in uids]


def _hex_pairs() -> np.ndarray:
    """Two ASCII hex digits of either case, read as a little-endian uint16 → their byte; 0xFFFF for anything else."""
    table = np.full(1 << 16, 0xFFFF, np.uint16)
    for byte in range(256):
        for text in {f"{byte:02x}", f"{byte:02X}", f"{byte:02x}"[0] + f"{byte:02X}"[1], f"{byte:02X}"[0] + f"{byte:02x}"[1]}:
            table[ord(text[0]) | ord(text[1]) << 8] = byte
    return table


_HEX_PAIRS = _hex_pairs()


def uid_halves(uids: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first halves, second halves, valid) of hex uids in either case, vectorised (a 64K-entry table maps each
    pair of digits to its byte); invalid ones (null, not 32 hex digits) are marked and get 0."""
    uids = uids.cast(pa.string())
    valid = pc.fill_null(pc.equal(pc.binary_length(uids), 32), False).to_numpy(zero_copy_only=False)
    good = uids if valid.all() else uids.filter(pa.array(valid))
    offsets = np.frombuffer(good.buffers()[1], np.int32)[good.offset : good.offset + len(good) + 1]
    raw = np.frombuffer(good.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].view("<u2")
    pairs = np.take(_HEX_PAIRS, raw).reshape(-1, 16)
    hi, lo = np.zeros(len(uids), np.uint64), np.zeros(len(uids), np.uint64)
    rows = np.flatnonzero(valid)
    packed = pairs.astype(np.uint8).view(">u8")
    hi[rows], lo[rows] = packed[:, 0], packed[:, 1]
    if len(pairs) and pairs.max() > 0xFF:  # some non-hex digit: find the rows (rare, so only then row by row)
        valid[rows[(pairs > 0xFF).any(axis=1)]] = False
    return hi, lo, valid


def discover_shards(input_spec: str) -> list[Shard]:
    """Shards named by a directory/prefix, a glob, or a brace/whitespace list (local or ``s3://``).

    A location that does not exist is a :class:`FileNotFoundError`; one that exists but holds no ``.tar`` is
    :class:`NoShardsFound` (an empty crawl day)."""
    found: dict[str, dict[str, Any]] = {}
    for item in storage.iter_inputs(input_spec):
        if item.endswith(".tar") and not any(ch in item for ch in "*?["):
            try:
                found[item] = storage.file_identity(item)
            except FileNotFoundError:
                raise FileNotFoundError(f"input shard does not exist: {item}") from None
        else:
            found.update(storage.list_files_with_identity(item, ".tar"))
    if not found:
        raise NoShardsFound(f"no .tar shards found in input {input_spec!r}")
    shards: dict[str, Shard] = {}
    for uri in sorted(found):
        shard_id = storage.basename(uri)[: -len(".tar")]
        if not SHARD_NAME.match(shard_id):
            raise ValueError(f"shard name {shard_id!r} ({uri}) must be letters, digits, '-' or '_'")
        if shard_id in shards and shards[shard_id].tar_uri != uri:
            raise ValueError(f"two input shards share the id {shard_id!r}: {shards[shard_id].tar_uri} and {uri}")
        shards[shard_id] = Shard(shard_id, uri, identity_token(found[uri]))
    return [shards[k] for k in sorted(shards)]


@dataclass
class ExpectedSamples:
    """What img2dataset says a shard holds: the sidecar parquet lists every sample with its download status,
    ``_stats.json`` only counts them. ``count`` is None when neither exists."""

    count: int | None = None
    source: str | None = None
    listed: list[dict[str, Any]] = field(default_factory=list)  # key, uid, url of each downloaded sample

    def missing(self, seen_keys: set[str]) -> list[dict[str, Any]]:
        return [row for row in self.listed if row["key"] not in seen_keys]


def expected_samples(shard: Shard) -> ExpectedSamples:
    """The samples the shard should hold, from its sidecar parquet (rows with ``status='success'``, or every
    row when it has no status column) or else from ``_stats.json``'s ``successes``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if storage.exists(shard.metadata_uri):
        with storage.naming("reading", shard.metadata_uri):
            fs, path = storage.filesystem(shard.metadata_uri)
            names = pq.read_schema(path, filesystem=fs).names
        columns = [c for c in ("key", "uid", "url", "status") if c in names]
        table = storage.read_parquet(shard.metadata_uri, columns=columns)
        if "status" in columns:
            table = table.filter(pc.equal(table.column("status"), "success"))
        if "key" not in columns:
            return ExpectedSamples(table.num_rows, "parquet")
        listed = [{"key": str(row["key"]), "uid": row.get("uid"), "url": row.get("url")} for row in
                  table.select([c for c in columns if c != "status"]).to_pylist()]
        return ExpectedSamples(table.num_rows, "parquet", listed)
    if storage.exists(shard.stats_uri):
        stats = storage.read_json(shard.stats_uri)
        if isinstance(stats, dict) and isinstance(stats.get("successes"), int):
            return ExpectedSamples(stats["successes"], "stats")
        raise ValueError(f"{shard.stats_uri} has no integer 'successes' count")
    return ExpectedSamples()


class _EndCheckedTarInfo(tarfile.TarInfo):
    """A member header as tarfile reads it, except that the archive may end only at an end-of-archive (zero)
    block. In stream mode tarfile ends the member list silently at a missing, cut or corrupt header after the
    first member, so a tar cut at a member boundary would read as a complete, shorter shard."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            raise tarfile.ReadError(f"no end-of-archive block at offset {tar.offset} ({exc})") from None


def read_samples(shard: Shard, max_pixels: int | None = None) -> Iterator[Sample]:
    """Yield every sample of ``shard`` in tar order; bad members become samples with a ``reason``. With
    ``max_pixels``, each image's header is read too (its size, the pixel limit; nothing is decoded yet)."""
    position = 0
    group_key: str | None = None
    parts: dict[str, bytes] = {}
    with storage.open_file(shard.tar_uri) as raw, storage.naming("reading", shard.tar_uri, (OSError,)):
        try:
            # a large read-ahead buffer: tarfile reads a few KB at a time, and every read that reaches the file
            # releases the GIL and may wait milliseconds to get it back while decode threads run
            with tarfile.open(fileobj=io.BufferedReader(raw, READ_AHEAD), mode="r|*",
                              tarinfo=_EndCheckedTarInfo) as tar:
                for member in tar:
                    key, ext = _split_name(valid_utf8(member.name))
                    problem = _member_problem(member, key, ext)
                    if problem:
                        if group_key is not None:
                            yield _assemble(shard, position, group_key, parts, max_pixels)
                            position += 1
                            group_key, parts = None, {}
                        yield Sample(shard.shard_id, position, valid_utf8(member.name), reason=problem)
                        position += 1
                        continue
                    if key != group_key:
                        if group_key is not None:
                            yield _assemble(shard, position, group_key, parts, max_pixels)
                            position += 1
                        group_key, parts = key, {}
                    if ext in SAMPLE_EXTENSIONS:  # another field (e.g. .npy, .cls) is part of its sample, unread
                        extracted = tar.extractfile(member)
                        parts[ext] = extracted.read() if extracted is not None else b""
        except (tarfile.TarError, EOFError) as exc:  # I/O errors are not the shard's fault: they propagate
            truncated = Sample(shard.shard_id, position, group_key or f"<after position {position}>")
            truncated.reason = "truncated_tar"
            truncated.meta["error"] = f"{type(exc).__name__}: {exc}"
            yield truncated
            return
    if group_key is not None:
        yield _assemble(shard, position, group_key, parts, max_pixels)


def valid_utf8(text: str) -> str:
    """``text`` with what UTF-8 cannot hold escaped: lone surrogates, from member names whose bytes were not UTF-8
    (``tarfile`` decodes them with ``surrogateescape``) or JSON escapes of half a character, become ``\\uXXXX``
    text. Outputs are Arrow/parquet strings: one such string would fail the whole shard's write."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _split_name(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def _member_problem(member: tarfile.TarInfo, key: str, ext: str) -> str | None:
    name = member.name
    if name.startswith("/") or ".." in name.split("/"):
        return "unsafe_member_name"
    if member.issym() or member.islnk():
        return "link_member"
    if not member.isfile():
        return "stray_member"
    if not key or not ext:
        return "stray_member"
    return None


def _assemble(shard: Shard, position: int, key: str, parts: dict[str, bytes], max_pixels: int | None) -> Sample:
    sample = Sample(shard.shard_id, position, key)
    try:
        _fill(sample, parts)
        if max_pixels is not None:
            sample.width, sample.height = open_image(sample.image, max_pixels).size
    except SampleError as exc:
        sample.reason = str(exc)
    return sample


def _fill(sample: Sample, parts: dict[str, bytes]) -> None:
    raw_json = parts.get("json")
    if raw_json is not None:
        try:
            meta = json.loads(raw_json.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SampleError("malformed_json") from None
        if not isinstance(meta, dict):
            raise SampleError("malformed_json")
        sample.meta = meta
        sample.url = valid_utf8(meta["url"]) if isinstance(meta.get("url"), str) else None
    uid = sample.meta.get("uid")
    if isinstance(uid, str) and UID_PATTERN.match(uid.lower()):
        sample.uid = uid.lower()
    image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
    if raw_json is None:
        raise SampleError("missing_json")
    if uid is None:
        raise SampleError("missing_uid")
    if sample.uid is None:
        raise SampleError("invalid_uid")
    if "txt" not in parts:
        raise SampleError("missing_text")
    try:
        text = parts["txt"].decode("utf-8")
    except UnicodeDecodeError:
        raise SampleError("text_not_utf8") from None
    if len(text) > MAX_TEXT_CHARS:
        text, sample.text_truncated = text[:MAX_TEXT_CHARS], True
    sample.text = text
    if image is None:
        raise SampleError("missing_image")
    if not image:
        raise SampleError("empty_image")
    sample.image = image


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read only the header, refusing images over ``max_pixels`` and empty ones (nothing is decoded yet)."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise SampleError("image_too_large") from None
    except Exception:
        raise SampleError("undecodable_image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise SampleError("image_too_large")
    if width == 0 or height == 0:
        raise SampleError("empty_image")
    return image


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode to RGB, refusing images over ``max_pixels`` from their header (before any decoding)."""
    image = open_image(data, max_pixels)
    try:
        return image.convert("RGB")
    except Exception:
        raise SampleError("undecodable_image") from None
