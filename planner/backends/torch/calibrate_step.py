"""What communication costs inside a training step, measured between the runner's local processes.

A collective alone in a tight loop is the best case. Inside a step it meets a rank that has just run a
GEMM on its one core, a freshly allocated tensor (under the runner's malloc settings, fresh pages), and a
peer whose previous op took a little more or less time; and whatever it overlaps with fights for the
same core. `calibrate --backend torch` fits the local link to the in-step figures measured here (not to
the tight loop, which is kept beside them for reference), and sets two device fields:

- `comm_overlap`: with an all-reduce in flight (async) while the rank runs GEMMs,
  (T_compute + T_comm - T_both) / min(T_compute, T_comm): 1 when the collective is free, 0 when the two
  simply add up.
- `shard_copy_ns_per_byte`: a stack of linear layers under FSDP2 (`fully_shard`, reshard after forward,
  as the runner's ZeRO-3), forward + backward, against the same stack whole: what is left after the
  gathers' and the reduce-scatter's link time (the in-step link), per byte gathered or reduce-scattered.

All functions run inside a rank of calibrate_measure.collective_worker, with the gloo process group up.
"""
from __future__ import annotations

import statistics
import time

import torch

# the GEMM a rank runs between two collectives: a sublayer's worth on one core (~1-2 ms)
GEMM_SHAPE = (128, 384, 1536)
# collectives per timed repetition, so that the ranks drift apart as they do inside a step
PER_REP = 4


def _gemm_work():
    a = torch.randn(GEMM_SHAPE[0], GEMM_SHAPE[1])
    b = torch.randn(GEMM_SHAPE[1], GEMM_SHAPE[2])
    return lambda: a @ b


def median_together_s(fn, reps: int, barrier) -> float:
    """Median wall time of fn() over `reps` calls after one warm-up, each call started after `barrier()`
    (all ranks at once)."""
    fn()
    ts = []
    for _ in range(reps):
        barrier()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def median_paired_s(fns, reps: int, barrier) -> list[float]:
    """Median wall time of each of `fns` and of each one's excess over fns[0], over `reps` rounds after one
    warm-up round; within a round every fn runs once, in order, each started after `barrier()`. Returns
    [median of fns[0], median of (fn_i - fn_0) for i >= 1]: a slow stretch on the machine then lands on
    both halves of a pair instead of on one figure, which a difference of two separate medians does not."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            barrier()
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    base = times[0]
    return [statistics.median(base)] + [statistics.median([t - b for t, b in zip(ts, base)]) for ts in times[1:]]


def exchange(rank: int, z: torch.Tensor) -> None:
    """Ranks 0 and 1 swap z: 0 sends then receives, 1 receives then sends (two one-way transfers)."""
    import torch.distributed as dist

    if rank == 0:
        dist.send(z, 1)
        dist.recv(z, 1)
    elif rank == 1:
        dist.recv(z, 0)
        dist.send(z, 0)


def in_step_collectives(rank: int, world: int, sizes: list[int], reps: int) -> list[dict]:
    """Per message size: the extra seconds an all-reduce, an all-gather (nbytes in total) and a one-way
    send/recv add to a loop of GEMM -> fresh op output -> collective, over the same loop without it."""
    import torch.distributed as dist

    gemm = _gemm_work()
    # torch 2.13 renames all_gather_into_tensor (deprecated) to all_gather_single
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    rows = []
    for nbytes in sizes:
        src = torch.ones(nbytes // 4)
        part = torch.ones(nbytes // 4 // world)

        def base():
            for _ in range(PER_REP):
                gemm()
                src * 1.0  # the op that produced the tensor a collective sends: a fresh output

        def with_all_reduce():
            for _ in range(PER_REP):
                gemm()
                dist.all_reduce(src * 1.0)

        def with_all_gather():
            for _ in range(PER_REP):
                gemm()
                out = torch.empty(part.numel() * world)
                gather(out, part * 1.0)

        def with_p2p():  # a pipeline's activations one way and gradients back: two one-way transfers
            for _ in range(PER_REP):
                gemm()
                exchange(rank, src * 1.0)

        _, ar, ag, pp = median_paired_s([base, with_all_reduce, with_all_gather, with_p2p], reps, dist.barrier)
        floor = 1e-6  # a collective never costs less than a microsecond, whatever the noise says
        rows.append({"bytes": nbytes, "all_reduce_s": max(floor, ar / PER_REP),
                     "all_gather_s": max(floor, ag / PER_REP),
                     "p2p_s": max(floor, pp / (2 * PER_REP))})
    return rows


def comm_overlap(reps: int, nbytes: int = 16 * 2**20) -> dict:
    """How much of an async all-reduce hides under GEMMs on the same rank."""
    import torch.distributed as dist

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    x = torch.ones(nbytes // 4)

    def compute():
        for _ in range(6):
            a @ b

    def comm_only():
        dist.all_reduce(x)

    def both():
        work = dist.all_reduce(x, async_op=True)
        compute()
        work.wait()

    tc, ta_extra, tb_extra = median_paired_s([compute, comm_only, both], reps, dist.barrier)
    ta, tb = tc + ta_extra, tc + tb_extra
    overlap = (tc + ta - tb) / min(tc, ta)
    return {"bytes": nbytes, "compute_s": tc, "comm_s": ta, "both_s": tb,
            "comm_overlap": float(min(1.0, max(0.0, overlap)))}


def fsdp_copy(world: int, reps: int) -> dict:
    """Forward + backward of 4 blocks (512 -> 2048 -> 512, no bias, 32 tokens: little compute) under
    FSDP2 with resharding after forward, and of the same blocks whole. The caller subtracts the
    collectives' link time and divides by the bytes copied (calibrate_fit.fit_shard_copy). The blocks are
    large (8 MiB each) because the cost grows with the bytes: per collective about 5 ms at 0.5 MiB, 9 at
    2 MiB, 52 at 8 MiB and 156 at 32 MiB on the 2-core box, so a fixed cost per collective (the in-step
    link latency) explains only the small ones."""
    import torch.distributed as dist
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def blocks():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Sequential(nn.Linear(512, 2048, bias=False), nn.Linear(2048, 512, bias=False))
                               for _ in range(4)])

    mesh = init_device_mesh("cpu", (world,))
    sharded = blocks()
    for blk in sharded:
        fully_shard(blk, mesh=mesh, reshard_after_forward=True)
    fully_shard(sharded, mesh=mesh, reshard_after_forward=True)
    plain = blocks()
    x = torch.randn(32, 512)
    params = sum(p.numel() for p in plain.parameters())
    layers = [sum(p.numel() for p in blk.parameters()) for blk in plain]
    plain_s, extra_s = median_paired_s([lambda: plain(x).sum().backward(), lambda: sharded(x).sum().backward()],
                                       reps, dist.barrier)
    return {"params": params, "per_layer_params": layers, "tokens": 32, "blocks": len(layers),
            "fsdp_fwd_bwd_s": plain_s + extra_s, "plain_fwd_bwd_s": plain_s}
