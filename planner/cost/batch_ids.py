"""Row ids for estimate_batch: distinct rows of integer columns, distinct float values, id ranges.

How estimate_batch finds what plans share (layer tuples, count groups, pipeline problems) without sorting
structured views; plain numpy helpers that know nothing of the cost model, hence their own module.
"""
from __future__ import annotations

import numpy as np


def _dense_rank(c: np.ndarray) -> np.ndarray:
    """Each value's rank among the column's distinct values (>= 0): a lookup table when the values are small,
    np.unique's inverse otherwise."""
    top = int(c.max())
    if top < 1 << 22:
        present = np.zeros(top + 1, dtype=np.int64)
        present[c] = 1
        return (np.cumsum(present) - 1)[c]
    return np.unique(c, return_inverse=True)[1].reshape(-1)


def row_ids(cols: list) -> tuple[np.ndarray, np.ndarray]:
    """(first row of each distinct row, id of every row's distinct row) for integer columns >= 0, with the
    distinct rows in lexicographic order (the first column most significant)."""
    cols = [np.asarray(c, dtype=np.int64) for c in cols]
    bits = [max(1, int(c.max()).bit_length()) if len(c) else 1 for c in cols]
    if sum(bits) > 62 and len(cols[0]):
        # too wide to pack: rank each column among its own few distinct values first (order-preserving)
        cols = [_dense_rank(c) if int(c.min()) >= 0 else c for c in cols]
        bits = [max(1, int(c.max()).bit_length()) for c in cols]
    if sum(bits) <= 62 and all(int(c.min()) >= 0 for c in cols if len(c)):
        key = np.zeros(len(cols[0]), dtype=np.int64)
        for c, nb in zip(cols, bits):
            key = (key << nb) | c
        space = 1 << sum(bits)
        if space <= 1 << 22:  # dense lookup table: no sort
            present = np.zeros(space, dtype=bool)
            present[key] = True
            uniq = np.flatnonzero(present)
            lut = np.empty(space, dtype=np.int64)
            lut[uniq] = np.arange(len(uniq))
            inv = lut[key]
            first = np.empty(len(uniq), dtype=np.int64)
            first[inv[::-1]] = np.arange(len(key))[::-1]
            return first, inv
        _, first, inv = np.unique(key, return_index=True, return_inverse=True)
        return first, inv.reshape(-1)
    _, first, inv = np.unique(np.stack(cols, axis=1), axis=0, return_index=True, return_inverse=True)
    return first, inv.reshape(-1)


def float_ids(a: np.ndarray) -> np.ndarray:
    """Id of each value among the distinct values of a float column (np.unique's inverse). A column that holds
    one value (offload fractions are usually all 0) skips np.unique's sort."""
    if len(a) == 0 or bool(np.all(a == a[0])):
        return np.zeros(len(a), dtype=np.int64)
    return np.unique(a, return_inverse=True)[1].reshape(-1)


def group_ranges(sorted_ids: np.ndarray, n: int) -> list[tuple[int, int]]:
    """(start, stop) of each id 0..n-1 in an array of ids in ascending order."""
    edges = np.searchsorted(sorted_ids, np.arange(n + 1))
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))
