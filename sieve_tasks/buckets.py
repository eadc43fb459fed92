"""Pool-sized columns processed one key range at a time, in bounded memory.

Values are spread over up to 2^k temporary files by the top k bits of a uint64 key (uids are uniform hashes, so the
files are even), then read back one file at a time in key order. Aggregate uses it to find repeated uids, publish to
sort the kept uids for ``subset.npy``; neither ever holds the whole column.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator

import numpy as np

BUCKET_ROWS = 4_000_000  # per file: 32-64 MB of uids
MAX_BITS = 8


class RadixBuckets:
    def __init__(self, dtype: np.dtype, expected_rows: int, bucket_rows: int = BUCKET_ROWS):
        self.dtype = np.dtype(dtype)
        self.bits = min(MAX_BITS, max(0, math.ceil(math.log2(max(1, expected_rows) / bucket_rows))))
        self.rows = 0

    def __enter__(self) -> RadixBuckets:
        self._dir = tempfile.TemporaryDirectory(prefix="sieve-buckets-")
        self._files = [open(os.path.join(self._dir.name, f"{b:03d}"), "wb") for b in range(1 << self.bits)]
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files:
            f.close()
        self._dir.cleanup()

    def add(self, values: np.ndarray, keys: np.ndarray) -> None:
        """Append ``values`` (of this dtype), each to the file of its uint64 ``key``."""
        self.rows += len(values)
        if not self.bits:
            self._files[0].write(values.tobytes())
            return
        bucket = (keys >> np.uint64(64 - self.bits)).astype(np.uint16)
        values = values[np.argsort(bucket, kind="stable")]  # a radix sort on 16-bit keys
        stops = np.cumsum(np.bincount(bucket, minlength=len(self._files)))
        start = 0
        for f, stop in zip(self._files, stops):
            if stop > start:
                f.write(values[start:stop].tobytes())
            start = stop

    def __iter__(self) -> Iterator[np.ndarray]:
        """Each file's values in turn, in ascending key range; a bucket is read only when its turn comes."""
        for f in self._files:
            f.close()
            yield np.fromfile(f.name, self.dtype)
