"""Progress of `calibrate --backend torch` on stderr: how long it will take (said before anything is
measured), then which measurement runs, i of n, and an estimate of the time left.

The measurements run in spawned processes (calibrate_measure.spawned); rank 0 of each prints the lines for
its own steps, given the calibration's start time, so parent and children share one clock and one count.
The expected seconds per step are from the 2-core development box (AMD EPYC, 2 processes): --quick as
measured there (110 s in all, other jobs sharing the cores), the full ones apportioned to the 5-6 minutes
a full calibration took there (issue 16). The time left scales what remains by how fast the finished steps
went against their expectation, so a faster or slower machine gets a fair estimate after a step or two.
"""
from __future__ import annotations

import sys
import time

# (step, expected seconds with --quick, expected seconds for a full calibration), in the order they run.
# The last five run only on the CPU stack (calibrate passes tp_block=not cuda).
STEPS: tuple[tuple[str, float, float], ...] = (
    ("GEMM rates", 12, 55),  # includes starting the measuring process
    ("memory bandwidth", 2, 12),
    ("dispatch overhead", 1, 1),
    ("attention", 1, 2),
    ("decoder training step", 3, 8),
    ("AdamW step", 1, 5),
    ("gradient accumulation", 12, 15),  # includes starting the collective processes
    ("collectives (all-reduce, all-gather, send/recv)", 2, 40),
    ("tensor-parallel block (DTensor, with and without sp)", 50, 90),
    ("collectives inside a training step", 5, 70),
    ("all-reduce overlapped with GEMMs", 2, 15),
    ("FSDP2 copies", 15, 35),
)
CPU_ONLY = 5


def steps(cuda: bool) -> list[tuple[str, float, float]]:
    return list(STEPS[: len(STEPS) - CPU_ONLY] if cuda else STEPS)


def expected_s(quick: bool, cuda: bool) -> float:
    return sum(q if quick else f for _, q, f in steps(cuda))


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{max(5, round(seconds / 5) * 5):.0f} s"
    return f"{seconds / 60:.0f} min"


def announce(quick: bool, cuda: bool, nproc: int) -> None:
    """The line said before anything is measured."""
    total = expected_s(quick, cuda)
    what = "a quick calibration (a first look, not a profile to trust)" if quick else "a full calibration"
    more = "" if quick else f"; `--quick` takes about {_minutes(expected_s(True, cuda))}"
    print(f"calibrate: {what} of {len(steps(cuda))} measurements with {nproc} processes takes about "
          f"{_minutes(total)} on a 2-core machine{more}", file=sys.stderr, flush=True)


def tick(index: int, quick: bool, cuda: bool, t0: float) -> None:
    """Say that step `index` (0-based, in STEPS order) starts, with the time left; t0 = time.time() at the
    calibration's start (a wall clock, shared by the spawned processes)."""
    table = steps(cuda)
    if not 0 <= index < len(table):
        return
    col = 1 if quick else 2
    elapsed = max(0.0, time.time() - t0)
    done = sum(row[col] for row in table[:index])
    left = sum(row[col] for row in table[index:])
    # how fast this machine runs against the expectation, bounded so one odd step cannot swing it wildly
    pace = min(4.0, max(0.25, elapsed / done)) if done > 0 and elapsed > 0 else 1.0
    print(f"calibrate: [{index + 1}/{len(table)}] {table[index][0]} ({elapsed:.0f} s so far, about "
          f"{_minutes(left * pace)} left)", file=sys.stderr, flush=True)
