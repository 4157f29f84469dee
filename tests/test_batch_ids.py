"""batch_ids.row_ids against np.unique(axis=0): the same distinct rows in the same (lexicographic) order,
each row's id, and the first row of each, for narrow columns (packed key, lookup table), wide ones (ranked
per column first) and negative values (np.unique itself)."""
from __future__ import annotations

import numpy as np
import pytest

from planner.cost.batch_ids import row_ids


@pytest.mark.parametrize("highs", [(3, 5, 2), (2**40, 7, 2**30, 3), (1024,) * 17, (2**62, 2**62)])
@pytest.mark.parametrize("seed", [0, 1])
def test_row_ids_equal_np_unique(highs, seed):
    rng = np.random.default_rng(seed)
    n = 5000
    # few distinct values per column (as plan columns have), spread over the column's range
    cols = [rng.choice(rng.integers(0, h, size=6, endpoint=True), size=n) for h in highs]
    first, inv = row_ids(cols)
    stacked = np.stack(cols, axis=1)
    uniq, want_first, want_inv = np.unique(stacked, axis=0, return_index=True, return_inverse=True)
    np.testing.assert_array_equal(stacked[first], uniq)
    np.testing.assert_array_equal(first, want_first)
    np.testing.assert_array_equal(inv, want_inv.reshape(-1))


def test_negative_values_fall_back_to_np_unique():
    cols = [np.array([-1, 2, -1, 2]), np.array([0, 0, 0, 1])]
    first, inv = row_ids(cols)
    np.testing.assert_array_equal(inv, [0, 1, 0, 2])
    np.testing.assert_array_equal(first, [0, 1, 3])
