"""Pool-sized columns processed one key range at a time, in bounded memory.

Values are spread over up to 2^k temporary files by the top k bits of a uint64 key (uids are uniform hashes, so the
files are even), then read back and sorted two files at a time, in key order. Aggregate uses it to find repeated
uids, publish to sort the kept uids for ``subset.npy``; neither ever holds the whole column.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BUCKET_ROWS = 4_000_000  # per file: 32-64 MB of uids (up to 2^MAX_BITS files; larger pools get larger files)
MAX_BITS = 8
SORT_THREADS = 2


class RadixBuckets:
    def __init__(self, dtype: np.dtype, expected_rows: int):
        self.dtype = np.dtype(dtype)
        self.bits = min(MAX_BITS, max(0, math.ceil(math.log2(max(1, expected_rows) / BUCKET_ROWS))))

    def __enter__(self) -> RadixBuckets:
        self._dir = tempfile.TemporaryDirectory(prefix="sieve-buckets-")
        self._files = []
        try:
            for b in range(1 << self.bits):
                self._files.append(open(os.path.join(self._dir.name, f"{b:03d}"), "wb"))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files:
            f.close()
        self._dir.cleanup()

    def add(self, values: np.ndarray, keys: np.ndarray | None = None) -> None:
        """Append ``values``, each to the file of its uint64 key (``keys=None``: the values are the keys)."""
        if not self.bits:
            self._files[0].write(values.tobytes())
            return
        if keys is None:  # sorting the keys themselves is cheaper than the radix pass, and leaves sorted runs
            values = np.sort(values)
            stops = np.searchsorted(values, np.arange(1, len(self._files), dtype=np.uint64) << np.uint64(64 - self.bits))
        else:
            bucket = (keys >> np.uint64(64 - self.bits)).astype(np.uint16)
            values = values[np.argsort(bucket, kind="stable")]  # a radix sort on 16-bit keys
            stops = np.cumsum(np.bincount(bucket, minlength=len(self._files)))[:-1]
        for f, start, stop in zip(self._files, np.concatenate([[0], stops]), np.concatenate([stops, [len(values)]])):
            if stop > start:
                f.write(values[start:stop].tobytes())

    def sorted_buckets(self, sort: Callable[[np.ndarray], np.ndarray]) -> Iterator[np.ndarray]:
        """Each file's values sorted by ``sort``, in ascending key range. Two files are read and sorted at a time
        on two threads (numpy's sorts release the GIL): memory holds two buckets with their sort's copies."""
        for f in self._files:
            f.close()
        load_and_sort = lambda f: sort(np.fromfile(f.name, self.dtype))  # noqa: E731
        with ThreadPoolExecutor(SORT_THREADS) as pool:
            for start in range(0, len(self._files), SORT_THREADS):
                yield from pool.map(load_and_sort, self._files[start : start + SORT_THREADS])
