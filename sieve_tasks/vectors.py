"""Vectors into Arrow without a Python object per float: numpy arrays become fixed-size lists, stored at the
precision ``--embeddings`` chooses (fp32, fp16) or not at all (none). Whatever is chosen, the scores were
computed from the full-precision vectors before this point."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

STORED_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def fixed_size_column(rows: int, picked: np.ndarray, vectors: np.ndarray, dtype: type) -> pa.FixedSizeListArray:
    """``rows`` entries, ``vectors[i]`` at row ``picked[i]``, null elsewhere."""
    dim = vectors.shape[1]
    values = np.zeros((rows, dim), dtype)
    values[picked] = vectors
    valid = np.zeros(rows, bool)
    valid[picked] = True
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim, mask=pa.array(~valid))


def lists_column(rows: int, picked: np.ndarray, counts: np.ndarray, values: np.ndarray, dtype: type) -> pa.ListArray:
    """At row ``picked[i]`` (ascending) the next ``counts[i]`` entries of ``values`` (numbers, or vectors as
    fixed-size lists); null elsewhere."""
    if np.any(np.diff(picked) <= 0):
        raise ValueError("picked rows must be ascending")
    per_row = np.zeros(rows, np.int64)
    per_row[picked] = counts
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    valid = np.zeros(rows, bool)
    valid[picked] = True
    inner = pa.array(values.astype(dtype).reshape(-1))
    if values.ndim == 2:
        inner = pa.FixedSizeListArray.from_arrays(inner, values.shape[1])
    return pa.ListArray.from_arrays(pa.array(offsets), inner, mask=pa.array(~valid))


def store_vectors(table: pa.Table, choice: str, ok: np.ndarray, picked: np.ndarray,
                  columns: dict[str, np.ndarray]) -> pa.Table:
    """Append one fixed-size-list column per entry of ``columns`` (vectors of rows ``picked``), unless
    ``choice`` is ``none``; rows that are not ``ok`` get nulls."""
    if choice == "none":
        return table
    keep = ok[picked] if len(picked) else np.zeros(0, bool)
    for name, vectors in columns.items():
        table = table.append_column(name, fixed_size_column(table.num_rows, picked[keep], vectors[keep],
                                                            STORED_DTYPES[choice]))
    return table
