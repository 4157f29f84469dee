"""What one pipeline schedule declares, and the F/B pattern every schedule here shares.

A schedule is a class registered under its plan name (planner/cost/schedules/__init__.py), one module
each, the way torch.distributed.pipelining keeps one class per schedule behind get_schedule_class. It
gives the per-device op order twice: `device_order`, the readable definition (lists of (kind, item,
chunk) tuples), and the parameters of the fast array form `order_arrays` that the simulator compiles
(tests/test_batch_dag_compiled.py checks the two op for op). The plan-level rules (vpp, seq_chunks,
micro-batch multiples) are declared in planner/core/dims.py, where ParallelPlan can see them.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

Op = tuple[str, int, int]  # (kind F/B/W, work item, chunk on the device)


def backward_items(m: int, n: int) -> list[int]:
    """Work items in backward order: micro-batch by micro-batch, and within one the sequence chunks last
    first, because chunk c's dK/dV collect from every later chunk's backward (TeraPipe, Li et al. 2021
    section 3; Seq1F1B, Sun et al. 2024). Item q*n + c is chunk c of micro-batch q; n = 1: 0..m-1."""
    return [q * n + c for q in range(m) for c in reversed(range(n))]


class PipelineScheduleSpec:
    """One pipeline schedule. Subclasses set `name` and override the order and closed-form methods.

    splits_backward: the backward runs as B (input gradient, on the critical path) and W (weight
    gradient) ops, W taking half of the backward unless told otherwise (Qi et al. 2023)."""

    name: ClassVar[str]
    splits_backward: ClassVar[bool] = False
    # True: the pipeline never flushes, so one step's time is its closed form `steady_step_s` in both the
    # one-plan and the batch path (pipeline.simulate_times, batch._time_problems); the op order still gives
    # the in-flight micro-batches (activation memory)
    steady_state: ClassVar[bool] = False

    # --- the op order ----------------------------------------------------------------------------------
    def device_order(self, p: int, i: int, m: int, v: int, n: int) -> list[Op]:
        """Device i's ops in the order it runs them (the readable definition)."""
        raise NotImplementedError

    def op_sequences(self, p: int, m: int, v: int, n: int) -> tuple[np.ndarray, ...]:
        """(forward item, forward chunk, backward item, backward chunk) of the k-th forward and the k-th
        backward on a device, k = 0 .. ops per kind - 1: the same sequences on every device."""
        total = m * n
        k = np.arange(total, dtype=np.int64)
        zero = np.zeros(total, dtype=np.int64)
        return k, zero, (k // n) * n + (n - 1 - k % n), zero  # backward_items as an array

    def warmup(self, p: int, i: int, m: int, v: int, n: int) -> int:
        """Forwards device i runs before its first backward."""
        raise NotImplementedError

    def order_arrays(self, p: int, m: int, v: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """device_order as flat arrays, device after device: kind (0 F, 1 B, 2 W), item, chunk, and the op
        count per device (the same on every device). Building the 10^5-10^6 order tuples and unpacking them
        again was over a third of the compile time at 512 GPUs (bench_search.py speed).

        Every schedule here runs the same F/B pattern per device: w warm-up forwards, then F and B
        alternating, then w backwards (w = all forwards: GPipe), forwards and backwards each taken in
        op_sequences' order."""
        kind, item, chunk, _, _ = self.fb_pattern(p, m, v, n)
        return kind.ravel(), item.ravel(), chunk.ravel(), kind.shape[1]

    def fb_pattern(self, p: int, m: int, v: int, n: int) -> tuple[np.ndarray, ...]:
        """The F/B pattern as (devices x places) arrays: kind, item, chunk, whether a place is a backward,
        and which backward of the sequence it runs."""
        f_item, f_chunk, b_item, b_chunk = self.op_sequences(p, m, v, n)
        total = len(f_item)  # forwards (and backwards) per device
        r = np.arange(2 * total, dtype=np.int64)
        w = np.asarray([self.warmup(p, i, m, v, n) for i in range(p)], dtype=np.int64)[:, None]
        is_b = (r >= 2 * total - w) | ((r >= w) & ((r - w) % 2 == 1))
        f_at = np.cumsum(~is_b, axis=1) - 1  # which forward (backward) of the sequence each place runs
        b_at = np.cumsum(is_b, axis=1) - 1
        item = np.where(is_b, b_item[b_at], f_item[f_at])
        chunk = np.where(is_b, b_chunk[b_at], f_chunk[f_at])
        return is_b.astype(np.int64), item, chunk, is_b, b_at

    # --- closed forms (equal stages) ---------------------------------------------------------------------
    def bubble_time(self, p: int, m: int, v: int, tf: float, tb: float, tw: float | None) -> float:
        """Bubble time for equal stages, no p2p (tf, tb: one stage's forward and full backward)."""
        raise NotImplementedError

    def inflight_microbatches(self, p: int, m: int, stage: int, v: int, n: int) -> float:
        """Micro-batches' worth of activations device `stage` holds at its peak (unit: one micro-batch's
        activations for all layers of the device; sequence chunks with n > 1)."""
        raise NotImplementedError
