"""Asynchronous 1F1B: PipeDream-2BW (Narayanan et al. 2021, "Memory-Efficient Pipeline-Parallel DNN Training",
ICML, section 3.1) and, at one micro-batch per update, Pipelined Backpropagation (Kosson et al. 2021, MLSys).
Every device runs 1F1B's order, but no step ends in a flush: the next step's forwards enter the pipeline while
the last backwards drain, and each stage applies its update once its m backwards are done. The fill is paid
once per job, so a step of m micro-batches takes m times the steady state's cycle.

The cycle is the max-plus cycle time of 1F1B's op graph (Baccelli et al. 1992, "Synchronization and
Linearity", the eigenvalue of the max-plus matrix): in steady state stages i..j hold j - i + 1 micro-batches
in flight around a loop of their forwards and backwards and 2 (j - i) p2p transfers, so

    cycle = max over stage ranges i..j of (sum_k (F_k + B_k) + 2 (j - i) p2p) / (j - i + 1),

which is the slowest stage's F + B without p2p, and (F + B) + 2 (p - 1) p2p / p for equal stages.
tests/test_async_pipeline.py checks it against the marginal time of m more micro-batches in a long 1F1B
simulation. Memory: 2BW keeps two versions of each stage's weights (memory_phase.stage_memory adds one copy
of the weights as held on the device) and 1F1B's stashed activations (p - i micro-batches on stage i).
"""
from __future__ import annotations

import numpy as np

from planner.cost.schedules.one_f_one_b import OneFOneB
from planner.cost.schedules.registry import register


@register
class Async1F1B(OneFOneB):
    name = "async-1f1b"
    steady_state = True
    timeline_schedule = "1f1b"  # the first step from an empty pipeline runs (and fills) as 1F1B does

    def cycle_s(self, fb_s: np.ndarray, p2p_s: np.ndarray) -> np.ndarray:
        """Steady-state seconds per micro-batch. fb_s: (rows, stages) one micro-batch's F + B per stage;
        p2p_s: (rows,) one stage-to-stage transfer. The same numpy operations for one row or many."""
        rows, p = fb_s.shape
        prefix = np.concatenate([np.zeros((rows, 1)), np.cumsum(fb_s, axis=1)], axis=1)
        best = fb_s.max(axis=1)
        for span in range(2, p + 1):  # the loop through `span` adjacent stages
            loop = (prefix[:, span:] - prefix[:, :-span]).max(axis=1)
            best = np.maximum(best, (loop + 2 * (span - 1) * p2p_s) / span)
        return best

    def steady_step_s(self, fb_s: np.ndarray, p2p_s: np.ndarray, m: int) -> np.ndarray:
        """One step's pipeline seconds per row: m micro-batches at the steady state's cycle (fill amortised)."""
        return m * self.cycle_s(fb_s, p2p_s)

    def bubble_time(self, p: int, m: int, v: int, tf: float, tb: float, tw: float | None) -> float:
        return 0.0  # equal stages, no p2p: every device is busy every cycle (no flush, fill amortised)
