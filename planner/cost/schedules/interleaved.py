"""Interleaved 1F1B (Narayanan et al. 2021 section 2.2.2), Megatron's
`forward_backward_pipelining_with_interleaving` with microbatch_group_size_per_vp_stage = p: v model chunks
per device; warm-up 2(p-i-1) + (v-1)p forwards (all of them when that reaches m*v), then F and B
alternately; the k-th forward runs chunk (k mod pv) // p on micro-batch (k // pv) * p + k mod p, backwards
run the chunks in reverse. Needs m % p == 0 (planner/core/dims.py)."""
from __future__ import annotations

import numpy as np

from planner.cost.schedules.base import Op, PipelineScheduleSpec
from planner.cost.schedules.registry import register


def interleaved_warmup(p: int, i: int, m: int, v: int) -> int:
    """Warm-up forwards (chunk-micro-batches) on rank i under Megatron's interleaved schedule."""
    return min(2 * (p - i - 1) + (v - 1) * p, m * v)


@register
class Interleaved1F1B(PipelineScheduleSpec):
    name = "interleaved-1f1b"

    def device_order(self, p: int, i: int, m: int, v: int, n: int) -> list[Op]:
        total = m * v

        def fwd(k: int) -> Op:
            return ("F", (k // (p * v)) * p + k % p, (k % (p * v)) // p)

        def bwd(k: int) -> Op:
            return ("B", (k // (p * v)) * p + k % p, v - 1 - (k % (p * v)) // p)

        warm = interleaved_warmup(p, i, m, v)
        ops = [fwd(k) for k in range(warm)]
        for k in range(total - warm):
            ops.append(fwd(k + warm))
            ops.append(bwd(k))
        ops += [bwd(k) for k in range(total - warm, total)]
        return ops

    def op_sequences(self, p: int, m: int, v: int, n: int) -> tuple[np.ndarray, ...]:
        k = np.arange(m * v, dtype=np.int64)
        item = (k // (p * v)) * p + k % p
        f_chunk = (k % (p * v)) // p
        return item, f_chunk, item, v - 1 - f_chunk

    def warmup(self, p: int, i: int, m: int, v: int, n: int) -> int:
        return interleaved_warmup(p, i, m, v)

    def bubble_time(self, p: int, m: int, v: int, tf: float, tb: float, tw: float | None) -> float:
        return (p - 1) * (tf + tb) / v  # Narayanan et al. 2021 section 2.2.2

    def inflight_microbatches(self, p: int, m: int, stage: int, v: int, n: int) -> float:
        # the warm-up plus one, in chunk units, capped at m*v; over v: p + (p-1)/v on the first stage, i.e.
        # L(1 + (p-1)/(pv)) layers' worth (Korthikanti et al. 2022 section 4.2.3)
        return min(interleaved_warmup(p, stage, m, v) + 1, m * v) / v
