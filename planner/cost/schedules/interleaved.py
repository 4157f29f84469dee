"""Interleaved 1F1B (Narayanan et al. 2021 section 2.2.2), Megatron-Core's
`forward_backward_pipelining_with_interleaving`: v model chunks per device. Micro-batches run in groups of
N = microbatch_group_size_per_vp_stage: each group goes through chunk 0, then chunk 1, ... (Megatron-Core's
get_schedule_table); backwards walk the same table with the chunks reversed. Warm-up 2(p-i-1) + (v-1)N
forwards (all of them when that reaches m*v), then F and B alternately (get_pp_rank_microbatches).

N is p (Megatron-Core's default, the depth-first schedule of the paper) when p divides m; otherwise the
smallest N that Megatron-Core accepts (`microbatch_group_size`), which is how Megatron-Core and Llama 3
(Dubey et al. 2024 section 3.3.2, "N flexible") run a micro-batch count that is not a multiple of p.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from planner.cost.schedules.base import Op, PipelineScheduleSpec
from planner.cost.schedules.registry import register


@lru_cache(maxsize=4096)  # asked per device and per plan shape
def microbatch_group_size(p: int, m: int) -> int:
    """Megatron-Core's microbatch_group_size_per_vp_stage N for m micro-batches on p stages.

    Megatron-LM megatron/core/pipeline_parallel/schedules.py (main @ d98e8a64dd, 2026-08-22),
    forward_backward_pipelining_with_interleaving: ValueError unless p <= N <= m, RuntimeError when the last
    group is short (0 < m % N < p, "dependency bubbles"); N defaults to p (model_parallel_config.py). So any
    m >= p runs (N = m always qualifies); m < p never does (planner/core/dims.py refuses it)."""
    if m % p == 0:
        return p
    return next((n for n in range(p + 1, m + 1) if m % n == 0 or m % n >= p), m)


def schedule_table(p: int, m: int, v: int) -> list[tuple[int, int]]:
    """(micro-batch, chunk) of the k-th forward on every device: Megatron-Core's get_schedule_table, groups
    of N micro-batches (the last group is what is left, at least p), each group chunk by chunk."""
    n = microbatch_group_size(p, m)
    return [(j, c) for g in range(0, m, n) for c in range(v) for j in range(g, min(g + n, m))]


def interleaved_warmup(p: int, i: int, m: int, v: int) -> int:
    """Warm-up forwards (chunk-micro-batches) on rank i under Megatron's interleaved schedule."""
    return min(2 * (p - i - 1) + (v - 1) * microbatch_group_size(p, m), m * v)


@register
class Interleaved1F1B(PipelineScheduleSpec):
    name = "interleaved-1f1b"

    def device_order(self, p: int, i: int, m: int, v: int, n: int) -> list[Op]:
        table = schedule_table(p, m, v)
        total = m * v

        def fwd(k: int) -> Op:
            return ("F", table[k][0], table[k][1])

        def bwd(k: int) -> Op:
            return ("B", table[k][0], v - 1 - table[k][1])

        warm = interleaved_warmup(p, i, m, v)
        ops = [fwd(k) for k in range(warm)]
        for k in range(total - warm):
            ops.append(fwd(k + warm))
            ops.append(bwd(k))
        ops += [bwd(k) for k in range(total - warm, total)]
        return ops

    def op_sequences(self, p: int, m: int, v: int, n: int) -> tuple[np.ndarray, ...]:
        # schedule_table as arrays: the k-th entry's group g (of `size` micro-batches from `start`) and its
        # offset inside the group's size*v entries give micro-batch start + offset % size, chunk offset // size
        group = microbatch_group_size(p, m)
        k = np.arange(m * v, dtype=np.int64)
        if m % group == 0:  # equal groups (always when p divides m): the closed form, a third of the time
            item = (k // (group * v)) * group + k % group
            f_chunk = (k % (group * v)) // group
            return item, f_chunk, item, v - 1 - f_chunk
        start = np.arange(0, m, group, dtype=np.int64)
        size = np.minimum(group, m - start)
        g = np.repeat(np.arange(len(start)), size * v)
        first = np.concatenate(([0], np.cumsum(size * v)[:-1]))
        off = k - first[g]
        item = start[g] + off % size[g]
        f_chunk = off // size[g]
        return item, f_chunk, item, v - 1 - f_chunk

    def warmup(self, p: int, i: int, m: int, v: int, n: int) -> int:
        return interleaved_warmup(p, i, m, v)

    def bubble_time(self, p: int, m: int, v: int, tf: float, tb: float, tw: float | None) -> float:
        return (p - 1) * (tf + tb) / v  # Narayanan et al. 2021 section 2.2.2

    def inflight_microbatches(self, p: int, m: int, stage: int, v: int, n: int) -> float:
        # the warm-up plus one, in chunk units, capped at m*v; over v: p + (p-1)/v on the first stage, i.e.
        # L(1 + (p-1)/(pv)) layers' worth (Korthikanti et al. 2022 section 4.2.3)
        return min(interleaved_warmup(p, stage, m, v) + 1, m * v) / v
