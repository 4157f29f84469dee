"""Per-device op orders of the pipeline schedules: which forward (F), backward (B) and weight-gradient (W)
ops each device runs, in which order, as lists of (kind, work item, chunk) or as flat arrays. What
pipeline.simulate times and batch_dag turns into DAGs. Pure functions (reference/formulas.md section 3).

Per-device orders:
  gpipe             all m forwards, then all m backwards (micro-batch order), Huang et al. 2019.
  1f1b              PipeDream-Flush (Narayanan et al. 2021 section 2.2.1): rank i runs min(p-i-1, m)
                    warm-up forwards, then alternates F, B, then drains the remaining B. This is
                    Megatron's `forward_backward_pipelining_without_interleaving`.
  interleaved-1f1b  Megatron's `forward_backward_pipelining_with_interleaving` with
                    microbatch_group_size_per_vp_stage = p: warm-up 2(p-i-1) + (v-1)p forwards (all of
                    them when that reaches m*v), then F, B alternately; the k-th forward runs chunk
                    (k mod pv) // p on micro-batch (k // pv) * p + k mod p, backwards run chunks in
                    reverse. Requires m % p == 0.
  zb-h1             Qi et al. 2023 (Zero Bubble PP, section 3.1, ZB-H1): backward split into B (input
                    grad, on the critical path) and W (weight grad). Rank i runs the 1F1B order but
                    defers the W of its first i backward passes to the very end of the step, where they
                    fill the cool-down bubble; every other W runs right after its B. At most i W's are
                    pending on rank i, and F-minus-B in-flight stays at 1F1B's p-i, matching the paper's
                    memory (p-i+1) M_B + (i-1) M_W for 1-based worker i. The same job list as
                    PaddlePaddle's `pipeline_scheduler_ZBH1` pass.
"""
from __future__ import annotations

import numpy as np

SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")


def _backward_items(m: int, n: int) -> list[int]:
    """Work items in backward order: micro-batch by micro-batch, and within one the sequence chunks last
    first, because chunk c's dK/dV collect from every later chunk's backward (TeraPipe, Li et al. 2021
    section 3; Seq1F1B, Sun et al. 2024). Item q*n + c is chunk c of micro-batch q; n = 1: 0..m-1."""
    return [q * n + c for q in range(m) for c in reversed(range(n))]


def _order_gpipe(m: int, n: int = 1) -> list[tuple[str, int, int]]:
    return [("F", j, 0) for j in range(m * n)] + [("B", j, 0) for j in _backward_items(m, n)]


def _order_1f1b(p: int, i: int, m: int, n: int = 1) -> list[tuple[str, int, int]]:
    # Seq1F1B (Sun et al. 2024): a stage's first backward is the last chunk of the first micro-batch, so
    # the warm-up runs n - 1 more forwards than 1F1B's p - i - 1 (n = 1: PipeDream-Flush unchanged)
    total = m * n
    back = _backward_items(m, n)
    warm = min(p - i - 1 + n - 1, total)
    ops = [("F", j, 0) for j in range(warm)]
    nf, nb = warm, 0
    while nf < total:
        ops.append(("F", nf, 0))
        nf += 1
        ops.append(("B", back[nb], 0))
        nb += 1
    ops += [("B", back[k], 0) for k in range(nb, total)]
    return ops


def _order_zb_h1(p: int, i: int, m: int) -> list[tuple[str, int, int]]:
    deferred: list[int] = []
    ops: list[tuple[str, int, int]] = []
    for kind, j, c in _order_1f1b(p, i, m):
        ops.append((kind, j, c))
        if kind == "B":
            if len(deferred) < i:
                deferred.append(j)
            else:
                ops.append(("W", j, c))
    ops += [("W", j, 0) for j in deferred]
    return ops


def interleaved_warmup(p: int, i: int, m: int, v: int) -> int:
    """Warm-up forwards (chunk-micro-batches) on rank i under Megatron's interleaved schedule."""
    total = m * v
    w = 2 * (p - i - 1) + (v - 1) * p
    return min(w, total)


def _order_interleaved(p: int, i: int, m: int, v: int) -> list[tuple[str, int, int]]:
    total = m * v

    def fwd(k: int) -> tuple[str, int, int]:
        return ("F", (k // (p * v)) * p + k % p, (k % (p * v)) // p)

    def bwd(k: int) -> tuple[str, int, int]:
        return ("B", (k // (p * v)) * p + k % p, v - 1 - (k % (p * v)) // p)

    warm = interleaved_warmup(p, i, m, v)
    ops = [fwd(k) for k in range(warm)]
    for k in range(total - warm):
        ops.append(fwd(k + warm))
        ops.append(bwd(k))
    ops += [bwd(k) for k in range(total - warm, total)]
    return ops


def schedule_order(schedule: str, p: int, m: int, v: int = 1, n: int = 1) -> list[list[tuple[str, int, int]]]:
    """The op order of every device: per device a list of (kind, item, chunk). n > 1 (gpipe, 1f1b): each
    micro-batch's sequence runs as n chunks, items q*n + c (`_backward_items`)."""
    _check_args(schedule, p, m, v, n)
    if schedule == "gpipe":
        return [_order_gpipe(m, n) for _ in range(p)]
    if schedule == "1f1b":
        return [_order_1f1b(p, i, m, n) for i in range(p)]
    if schedule == "zb-h1":
        return [_order_zb_h1(p, i, m) for i in range(p)]
    return [_order_interleaved(p, i, m, v) for i in range(p)]


def _order_arrays(schedule: str, p: int, m: int, v: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """schedule_order as flat arrays, device after device: kind (0 F, 1 B, 2 W), item, chunk, and the op
    count per device (the same on every device). Building schedule_order's 10^5-10^6 tuples and unpacking
    them again was over a third of _compiled's time at 512 GPUs (bench_search.py speed);
    tests/test_batch_dag_compiled.py checks these arrays against schedule_order op for op.

    Every schedule above is the same F/B pattern per device: w warm-up forwards, then F and B alternating,
    then w backwards (gpipe: w = all), the forwards and the backwards each taken in a fixed per-schedule
    sequence; zb-h1 then puts W(j) straight after B(j), except for rank i's first i backwards whose W's go last."""
    interleaved = schedule == "interleaved-1f1b"
    total = m * v if interleaved else m * n  # forwards (and backwards) per device
    k = np.arange(total, dtype=np.int64)
    zero = np.zeros(total, dtype=np.int64)
    if interleaved:
        f_item = b_item = (k // (p * v)) * p + k % p
        f_chunk = (k % (p * v)) // p
        b_chunk = v - 1 - f_chunk
        warm = [interleaved_warmup(p, i, m, v) for i in range(p)]
    else:
        f_item, f_chunk, b_chunk = k, zero, zero
        b_item = (k // n) * n + (n - 1 - k % n)  # _backward_items
        warm = [total] * p if schedule == "gpipe" else [min(p - i - 1 + n - 1, total) for i in range(p)]
    r = np.arange(2 * total, dtype=np.int64)
    w = np.asarray(warm, dtype=np.int64)[:, None]
    is_b = (r >= 2 * total - w) | ((r >= w) & ((r - w) % 2 == 1))
    f_at = np.cumsum(~is_b, axis=1) - 1  # which forward (backward) of the sequence each place runs
    b_at = np.cumsum(is_b, axis=1) - 1
    kind = is_b.astype(np.int64)
    item = np.where(is_b, b_item[b_at], f_item[f_at])
    chunk = np.where(is_b, b_chunk[b_at], f_chunk[f_at])
    if schedule != "zb-h1":
        return kind.ravel(), item.ravel(), chunk.ravel(), 2 * total
    kinds, items, chunks = [], [], []
    for i in range(p):
        # each B past rank i's first i is run twice, the copy being its W; the deferred W's close the order
        rep = 1 + (is_b[i] & (b_at[i] >= i))
        src = np.repeat(r, rep)
        again = np.zeros(len(src), dtype=bool)
        again[1:] = src[1:] == src[:-1]
        nd = min(i, total)
        kinds += [np.where(again, 2, kind[i][src]), np.full(nd, 2, dtype=np.int64)]
        items += [item[i][src], b_item[:nd]]
        chunks += [chunk[i][src], zero[:nd]]
    return np.concatenate(kinds), np.concatenate(items), np.concatenate(chunks), 3 * total


def _check_args(schedule: str, p: int, m: int, v: int, n: int = 1) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {SCHEDULES}")
    if p < 1 or m < 1 or v < 1 or n < 1:
        raise ValueError(f"p, m, v and seq_chunks must be >= 1 (got p={p}, m={m}, v={v}, seq_chunks={n})")
    if n > 1 and schedule not in ("gpipe", "1f1b"):
        raise ValueError(f"seq_chunks={n} needs schedule 'gpipe' or '1f1b' (TeraPipe, Seq1F1B), got {schedule!r}")
    if schedule == "interleaved-1f1b":
        if m % p != 0:
            raise ValueError(f"interleaved-1f1b needs the number of micro-batches ({m}) to be a "
                             f"multiple of the pipeline size ({p}) (Narayanan et al. 2021 section 2.2.2)")
    elif v != 1:
        raise ValueError(f"v={v} virtual stages needs schedule 'interleaved-1f1b', got {schedule!r}")


