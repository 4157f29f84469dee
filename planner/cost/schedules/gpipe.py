"""GPipe (Huang et al. 2019): every device runs all m forwards, then all m backwards in micro-batch order."""
from __future__ import annotations

from planner.cost.schedules.base import Op, PipelineScheduleSpec, backward_items
from planner.cost.schedules.registry import register


@register
class GPipe(PipelineScheduleSpec):
    name = "gpipe"

    def device_order(self, p: int, i: int, m: int, v: int, n: int) -> list[Op]:
        return [("F", j, 0) for j in range(m * n)] + [("B", j, 0) for j in backward_items(m, n)]

    def warmup(self, p: int, i: int, m: int, v: int, n: int) -> int:
        return m * n  # every forward comes first

    def bubble_time(self, p: int, m: int, v: int, tf: float, tb: float, tw: float | None) -> float:
        return (p - 1) * (tf + tb)  # Narayanan et al. 2021 section 2.2.1: t_pb = (p-1)(t_f+t_b)

    def inflight_microbatches(self, p: int, m: int, stage: int, v: int, n: int) -> float:
        return float(m * n)  # every forward's activations wait for the backwards
