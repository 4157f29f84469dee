"""ZB-H1 (Qi et al. 2023, Zero Bubble PP, section 3.1): the backward splits into B (input gradient, on the
critical path) and W (weight gradient). Rank i runs the 1F1B order but defers the W of its first i backward
passes to the very end of the step, where they fill the cool-down bubble; every other W runs right after
its B. At most i W's are pending on rank i, and F-minus-B in-flight stays at 1F1B's p-i, matching the
paper's memory (p-i+1) M_B + (i-1) M_W for 1-based worker i. The same job list as PaddlePaddle's
`pipeline_scheduler_ZBH1` pass."""
from __future__ import annotations

import numpy as np

from planner.cost.schedules.base import Op
from planner.cost.schedules.one_f_one_b import OneFOneB
from planner.cost.schedules.registry import register


@register
class ZeroBubbleH1(OneFOneB):
    name = "zb-h1"
    splits_backward = True

    def device_order(self, p: int, i: int, m: int, v: int, n: int) -> list[Op]:
        deferred: list[int] = []
        ops: list[Op] = []
        for kind, j, c in super().device_order(p, i, m, v, 1):
            ops.append((kind, j, c))
            if kind == "B":
                if len(deferred) < i:
                    deferred.append(j)
                else:
                    ops.append(("W", j, c))
        return ops + [("W", j, 0) for j in deferred]

    def order_arrays(self, p: int, m: int, v: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        # 1F1B's arrays, each B past rank i's first i run twice, the copy being its W; the deferred W's last
        kind, item, chunk, is_b, b_at = self.fb_pattern(p, m, v, n)
        b_item = self.op_sequences(p, m, v, n)[2]
        total = m * n
        r = np.arange(2 * total, dtype=np.int64)
        zero = np.zeros(total, dtype=np.int64)
        kinds, items, chunks = [], [], []
        for i in range(p):
            src = np.repeat(r, 1 + (is_b[i] & (b_at[i] >= i)))
            again = np.zeros(len(src), dtype=bool)
            again[1:] = src[1:] == src[:-1]
            nd = min(i, total)
            kinds += [np.where(again, 2, kind[i][src]), np.full(nd, 2, dtype=np.int64)]
            items += [item[i][src], b_item[:nd]]
            chunks += [chunk[i][src], zero[:nd]]
        return np.concatenate(kinds), np.concatenate(items), np.concatenate(chunks), 3 * total

    def bubble_time(self, p: int, m: int, v: int, tf: float, tb: float, tw: float | None) -> float:
        # Qi et al. 2023 Table 2: (p-1)(T_F+T_B-T_W), T_B = tb - tw the input-grad part; exact against the
        # simulation when m >= p and T_W <= min(T_F, T_B) (the paper's handcrafted regime; tests check it)
        tw = tb / 2 if tw is None else tw
        return (p - 1) * max(tf + (tb - tw) - tw, 0.0)
