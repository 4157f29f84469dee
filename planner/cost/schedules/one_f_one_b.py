"""1F1B, PipeDream-Flush (Narayanan et al. 2021 section 2.2.1), Megatron's
`forward_backward_pipelining_without_interleaving`: rank i runs min(p-i-1, m) warm-up forwards, then
alternates F and B, then drains the remaining B's. With seq_chunks n > 1 it is Seq1F1B (Sun et al. 2024)."""
from __future__ import annotations

from planner.cost.schedules.base import Op, PipelineScheduleSpec, backward_items
from planner.cost.schedules.registry import register


@register
class OneFOneB(PipelineScheduleSpec):
    name = "1f1b"

    def device_order(self, p: int, i: int, m: int, v: int, n: int) -> list[Op]:
        total = m * n
        back = backward_items(m, n)
        warm = self.warmup(p, i, m, v, n)
        ops = [("F", j, 0) for j in range(warm)]
        nf, nb = warm, 0
        while nf < total:
            ops.append(("F", nf, 0))
            nf += 1
            ops.append(("B", back[nb], 0))
            nb += 1
        ops += [("B", back[k], 0) for k in range(nb, total)]
        return ops

    def warmup(self, p: int, i: int, m: int, v: int, n: int) -> int:
        # Seq1F1B: a stage's first backward is the last chunk of the first micro-batch, so the warm-up runs
        # n - 1 more forwards than 1F1B's p - i - 1 (n = 1: PipeDream-Flush unchanged)
        return min(p - i - 1 + n - 1, m * n)

    def bubble_time(self, p: int, m: int, v: int, tf: float, tb: float, tw: float | None) -> float:
        return (p - 1) * (tf + tb)  # Narayanan et al. 2021 section 2.2.1

    def inflight_microbatches(self, p: int, m: int, stage: int, v: int, n: int) -> float:
        # Narayanan 2.2.1, Korthikanti Eq. 5: min(p - stage, m); with chunks, every chunk of the micro-batch
        # whose backward (last chunk first) the stage waits for, plus the warm-up
        return float(min(p - stage + n - 1, m * n))
