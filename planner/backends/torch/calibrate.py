"""`calibrate --backend torch`: measure this machine and write it into the catalog as the cluster preset
`local` (DESIGN.md section 3): a device profile for one rank (one CPU core running one torch thread, or
one GPU), a link profile for the collectives between local processes, and a node type `local` holding one
device per core (per GPU with CUDA), so that `plan --cluster local` and `estimate --cluster local` predict
runs of this machine. Every number is `provenance: measured`, with the date and the machine.

What is measured, and which profile field it sets:
- GEMM time over square and transformer-training shapes, one thread (on the CPU a linear layer's forward
  and backward GEMMs together, as training runs them): the 80th percentile rate is `peak_tflops` (fp32 on
  the CPU, bf16 on a GPU), `efficiency.matmul` 1.0 (the peak is already what a GEMM achieves), and
  `gemm_half_dim` fitted to the shape effect (rate = peak * d / (d + half) with d the smallest dim).
- memory bandwidth, `memory_bandwidth_gb_s` (`efficiency.memory` 1.0): on a GPU the copy of a large tensor;
  on the CPU an out-of-place op into a fresh tensor (median over 1-64 MiB), because that is what an eager
  op does there, and under the runner's malloc settings (every allocation above 64 KiB its own mmap) each
  fresh output pays its page faults: 2-3 GB/s on the 2-core box against 12-14 GB/s for a copy into a
  buffer that already exists.
- scaled_dot_product_attention, causal: `efficiency.attention` (its rate over the peak).
- eager dispatch of a tiny op: `kernel_overhead_us`. On a CPU the host *is* the device, so dispatch adds
  to compute rather than hiding under it: `host_dispatch_us` is 0 and the dispatch cost is charged per
  kernel through kernel_overhead_us.
- one training step of a small decoder in this process: whatever the terms above leave unexplained,
  per layer and pass, is `layer_overhead_us` (autograd, Python module calls, the optimizer's loop).
- gloo all-reduce, all-gather and send/recv between `nproc` local processes over message sizes: the link's
  `bandwidth_gb_s` and `latency_us` are fitted so that the planner's own formulas (planner.cost.comm)
  reproduce the measured times (least squares on log time); `achievable_fraction` 1.0.
- a DTensor tensor-parallel norm + MLP (the backend's own ColwiseParallel / RowwiseParallel plan, tiny
  sizes) over the same processes, forward + backward, against the plain one: what remains after the two
  all-reduces' link time is `tp_dispatch_us`, per sublayer and pass (a third of the forward + backward
  difference); with the sequence-parallel plan (SequenceParallel norm, all-gather + reduce-scatter),
  `sp_dispatch_us`.
- on the CPU, the same collectives inside a step-like loop (planner/backends/torch/calibrate_step.py): the
  link is fitted to these in-step times, not to the tight loop; an async all-reduce under GEMMs gives
  `comm_overlap`, and an FSDP2 stack against the plain one gives `shard_copy_ns_per_byte`.
- AdamW's step (foreach=False, the runner's optimizer) is timed as a check of the optimizer term (32 bytes
  per parameter at the memory bandwidth), not fitted.

Every device figure is measured in a process started the way the runner starts a rank (spawned, one
thread, the runner's malloc settings: runner._child_env), so the profile describes the stack the plans run
on, not the parent CLI process.

The profile is written to hardware_profiles/{devices,links,nodes}/local.yaml (or under --out-dir), each file
atomically; an existing file is replaced only with --force.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from planner.errors import BadInput

DEVICE_NAME = "local-cpu"
GPU_DEVICE_NAME = "local-gpu"
LINK_NAME = "local-gloo"
NODE_NAME = "local"


# ---------------------------------------------------------------------------------------------------
# timing


def _median_time_s(fn, reps: int, min_time_s: float = 0.0) -> float:
    """Median wall time of fn() over `reps` calls after one warm-up (and at least min_time_s in total)."""
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * reps:
            break
    return statistics.median(times)


def gemm_shapes(quick: bool, gpu: bool = False) -> list[tuple[int, int, int]]:
    """(m, n, k): squares, and the GEMMs of a decoder's training step (tokens x hidden x ffn/vocab): a
    small decoder's on a CPU, Llama 8B-sized ones (h 4096, ffn 14336, vocab 128256) on a GPU."""
    if quick:
        return [(256, 256, 256), (512, 512, 512), (512, 1024, 384)]
    if gpu:
        squares = [(d, d, d) for d in (256, 512, 1024, 2048, 4096, 8192, 16384)]
        widths = [(4096, 4096), (6144, 4096), (4096, 14336), (14336, 4096), (28672, 4096), (128256, 4096),
                  (1024, 1024), (2048, 1024), (768, 768), (2048, 768)]
        return squares + [(t, n, k) for t in (1024, 4096, 16384) for n, k in widths]
    squares = [(d, d, d) for d in (64, 128, 256, 512, 768, 1024, 1536)]
    # 64 and 128 tokens: the micro-batches of the local validation study (mbs 1-2 x seq 64)
    tokens = (64, 128, 256, 1024, 2048)
    widths = [(384, 384), (384, 1024), (1024, 384), (384, 1536), (1536, 384), (384, 16000), (16000, 384)]
    return squares + [(t, n, k) for t in tokens for n, k in widths]


def measure_gemm(device: torch.device, dtype: torch.dtype, quick: bool) -> list[dict]:
    """GEMM rates by shape (m tokens, n output, k input columns). GPU: one a @ b. CPU: a linear layer's
    forward and backward as autograd runs them (y = x W^T, then dX = dY W and dW = dY^T X, 3 x 2mnk FLOPs),
    because that is what layer_time charges at this rate, and on one core the backward's GEMMs, whose
    transposed operands and reduction over the m tokens make them the slow ones (weight gradient at 64
    tokens: about 25 GFLOP/s against 45-60 for the forward), set the step. Each shape cycles through
    several weights, as a step does (see below), so that no weight is timed from the cache."""
    shapes = gemm_shapes(quick, device.type == "cuda")
    first = [_gemm_row(m, n, k, device, dtype, quick) for m, n, k in shapes]
    if quick:
        return first
    # A second pass in reverse order, each shape keeping its faster one: a slow minute on a shared machine
    # (another process, the host's neighbours) then costs one pass of a few shapes, not a stretch of the fit.
    second = [_gemm_row(m, n, k, device, dtype, quick) for m, n, k in reversed(shapes)][::-1]
    return [a if a["time_s"] <= b["time_s"] else b for a, b in zip(first, second)]


def _gemm_row(m: int, n: int, k: int, device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    import torch.nn.functional as F

    if device.type == "cuda":
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        t = _median_time_s(lambda: a @ b, reps=3 if quick else 5, min_time_s=0.0 if quick else 0.2)
        return {"m": m, "n": n, "k": k, "time_s": t, "flops_per_s": 2.0 * m * n * k / t}
    # In a step every GEMM meets its layer's weight cold (the model's weights far exceed the caches):
    # cycle through enough weights to fill 64 MiB (at most 16), one linear step each.
    copies = max(1, min(16, -(-64 * 2**20 // (4 * n * k))))
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    ws = [torch.randn(n, k, device=device, dtype=dtype, requires_grad=True) for _ in range(copies)]
    dy = torch.randn(m, n, device=device, dtype=dtype)

    def linear_steps():
        for w in ws:
            F.linear(x, w).backward(dy)
            x.grad = w.grad = None

    t = _median_time_s(linear_steps, reps=3 if quick else 5, min_time_s=0.0 if quick else 0.2) / copies
    return {"m": m, "n": n, "k": k, "passes": "forward+backward", "weights": copies, "time_s": t,
            "flops_per_s": 6.0 * m * n * k / t}


def measure_memory_bandwidth(device: torch.device, quick: bool) -> dict:
    """Bytes read + written per second. GPU: copy of a tensor far larger than the caches into an existing
    one. CPU: also that (`copy_bytes_per_s`, for reference), but the figure used is an out-of-place op
    (x * 1.0 into a fresh tensor), the median over 1-64 MiB: eager ops allocate their outputs, and the
    first touch of fresh pages is part of their cost on the CPU (the caching allocator hides it on a GPU)."""
    nbytes = (32 if quick else 256) * 2**20
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = _median_time_s(lambda: dst.copy_(src), reps=3 if quick else 7)
    out = {"bytes": nbytes, "time_s": t, "copy_bytes_per_s": 2 * nbytes / t, "bytes_per_s": 2 * nbytes / t}
    if device.type == "cpu":
        rates = []
        for mib in ((1, 16) if quick else (1, 4, 16, 64)):
            x = torch.ones(mib * 2**20 // 4)
            tt = _median_time_s(lambda: torch.mul(x, 1.0), reps=3 if quick else 9)
            rates.append({"bytes": mib * 2**20, "time_s": tt, "bytes_per_s": 2 * mib * 2**20 / tt})
        out["fresh_output"] = rates
        out["bytes_per_s"] = statistics.median(r["bytes_per_s"] for r in rates)
    return out


def measure_adamw(device: torch.device, quick: bool) -> dict:
    """Seconds per parameter of the runner's optimizer step (AdamW, foreach=False) on 8M (quick: 1M)
    parameters in 1M-element tensors: a check of the optimizer term, recorded beside its prediction."""
    from planner.backends.torch.runner import make_optimizer

    n = 1 if quick else 8
    params = [torch.nn.Parameter(torch.randn(2**20, device=device)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make_optimizer(params, 1e-3)
    t = _median_time_s(opt.step, reps=3 if quick else 5)
    return {"params": n * 2**20, "time_s": t, "s_per_param": t / (n * 2**20)}


def measure_dispatch(device: torch.device) -> dict:
    """Per-op cost of eager dispatch: a one-element add, timed in a loop of 1000."""
    x = torch.ones(1, device=device)

    def many():
        for _ in range(1000):
            torch.add(x, x)

    t = _median_time_s(many, reps=5)
    return {"op_s": t / 1000}


def measure_attention(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    import torch.nn.functional as F

    b, h, s, d = (1, 4, 128, 64) if quick else (2, 6, 256, 64)
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype) for _ in range(3))
    t = _median_time_s(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps=5)
    flops = 4.0 * b * s * s * h * d * 0.5  # QK^T and AV, causal half (as Layer.attention_core_flops)
    return {"shape": [b, h, s, d], "time_s": t, "flops_per_s": flops / t}


# ---------------------------------------------------------------------------------------------------
# collectives between local processes


def collective_sizes(quick: bool) -> list[int]:
    if quick:
        return [4096, 262144]
    return [2**p for p in range(12, 27, 2)]  # 4 KiB .. 64 MiB


def _tp_mlp_times(world: int, timed) -> dict:
    """Forward + backward of the backend's norm + MLP split tp = world ways with parallel.apply_tp's DTensor
    plan for an MLP, against a plain norm + MLP with the rank's share of the FFN (ffn / tp: the GEMM work a
    TP rank does), at two sizes: tiny (hidden 64, ffn 128, 16 tokens: the fixed host cost; with sequence
    parallelism too) and a small model's (hidden 512, ffn 2048, 512 tokens: what grows with the activation
    DTensor moves and copies). `timed` takes the median after a barrier."""
    out = {"tp": world}
    out.update(_tp_mlp_case(world, 64, 128, 16, timed, sp_too=True))
    big = _tp_mlp_case(world, 512, 2048, 512, timed, sp_too=False)
    out["large"] = {"hidden": 512, "ffn_hidden": 2048, "tokens": 512, **big}
    return out


def _tp_mlp_case(world: int, hidden: int, ffn: int, tokens: int, timed, sp_too: bool) -> dict:
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel, parallelize_module,
    )

    from planner.backends.torch.model import DecoderSpec, FeedForward, _norm

    def holder(ffn_hidden):
        spec = DecoderSpec(name="calibrate-mlp", vocab=16, hidden=hidden, positions=0, blocks=1, heads=world,
                           kv_heads=world, head_dim=8, ffn_hidden=ffn_hidden, gated=True, norm="rmsnorm",
                           bias=False, qkv_bias=False, tied=False)

        class Holder(nn.Module):  # norm + MLP under the names parallel.apply_tp gives them inside a block
            def __init__(self):
                super().__init__()
                self.ffn_norm = _norm(spec.norm, spec.hidden)
                self.feed_forward = FeedForward(spec)

            def forward(self, x):
                return self.feed_forward(self.ffn_norm(x))

        return Holder()

    mesh = init_device_mesh("cpu", (world,))
    out = {"hidden": hidden, "ffn_hidden": ffn, "tokens": tokens}
    for sp in ((False, True) if sp_too else (False,)):
        # parallel.apply_tp's plan for one MLP sublayer: the stream replicated, or sequence-sharded (sp)
        stream = Shard(1) if sp else Replicate()
        sharded = holder(ffn)
        plan = {"feed_forward": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
                "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=stream)}
        if sp:
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(sharded, mesh, plan)
        x = torch.randn(1, tokens // world if sp else tokens, hidden, requires_grad=True)
        out["sp_dtensor_fwd_bwd_s" if sp else "dtensor_fwd_bwd_s"] = timed(lambda: sharded(x).sum().backward())
    plain = holder(ffn // world)
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    out["plain_fwd_bwd_s"] = timed(lambda: plain(x).sum().backward())
    return out


def _collective_worker(rank: int, world: int, port: int, sizes: list[int], reps: int, tp_mlp: bool,
                       outdir: str) -> None:
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        from planner.backends.torch.calibrate_step import exchange

        def timed(fn, n=reps):
            fn()
            ts = []
            for _ in range(n):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)

        rows = []
        for nbytes in sizes:
            x = torch.ones(nbytes // 4)
            out = torch.empty(nbytes // 4 * world)
            ar = timed(lambda: dist.all_reduce(x))
            # all-gather of nbytes in total (nbytes / world per rank), as comm.all_gather_time_s counts it
            part = torch.ones(nbytes // 4 // world)
            gathered = out[: part.numel() * world]
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            ag = timed(lambda: gather(gathered, part))

            pp = timed(lambda: exchange(rank, x)) / 2  # one way
            rows.append({"bytes": nbytes, "all_reduce_s": ar, "all_gather_s": ag, "p2p_s": pp})
        # the tensor-parallel MLP takes milliseconds: four times the repetitions, for a steadier median
        tp = _tp_mlp_times(world, lambda fn: timed(fn, 4 * reps)) if tp_mlp else None
        step = None
        if tp_mlp:  # the CPU stack: what a collective costs inside a step (calibrate_step)
            from planner.backends.torch import calibrate_step as cs

            step = {"in_step": cs.in_step_collectives(rank, world, sizes, max(3, reps // 2)),
                    "overlap": cs.comm_overlap(reps), "fsdp": cs.fsdp_copy(world, reps)}
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            Path(outdir, "collectives.json").write_text(json.dumps({"rows": rows, "tp_mlp": tp, "step": step}))
    except BaseException as e:  # noqa: BLE001 - reported by the parent as one line
        Path(outdir, f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}".splitlines()[0])
        os._exit(1)


def _spawned(fn, nprocs: int, args: tuple, result: str, what: str):
    """Run fn(rank, *args, outdir) on `nprocs` spawned processes started as the runner starts its ranks
    (runner._child_env: one thread, its malloc settings) and return the JSON they left in `result`."""
    import torch.multiprocessing as mp

    from planner.backends.torch.runner import RunFailed, RunOptions, _child_env

    with tempfile.TemporaryDirectory(prefix="planner-calibrate-") as outdir:
        with _child_env(RunOptions(threads=1)):
            ctx = mp.start_processes(fn, args=(*args, outdir), nprocs=nprocs, start_method="spawn", join=False)
        try:
            while not ctx.join(timeout=1.0):
                pass
        except (mp.ProcessExitedException, mp.ProcessRaisedException):
            errs = sorted(Path(outdir).glob("error*.txt"))
            msg = errs[0].read_text() if errs else "a process died"
            raise RunFailed(f"{what} failed: {msg}") from None
        return json.loads(Path(outdir, result).read_text())


def measure_collectives(nproc: int, quick: bool, tp_mlp: bool = False) -> dict:
    """{"rows": per message size, "tp_mlp": _tp_mlp_times or None} from `nproc` local gloo processes."""
    from planner.backends.torch.runner import _free_port

    sizes = collective_sizes(quick)
    return _spawned(_collective_worker, nproc, (nproc, _free_port(), sizes, 3 if quick else 15, tp_mlp),
                    "collectives.json", "collective measurement")


def _device_worker(rank: int, quick: bool, outdir: str) -> None:
    """The one-rank device measurements, in a process started as a rank is (see _spawned). Every rank of
    measure_device runs them at once; rank 0's are kept."""
    try:
        torch.set_num_threads(1)
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        dtype = torch.bfloat16 if cuda else torch.float32
        out = {"gemm": measure_gemm(device, dtype, quick), "memory_bandwidth": measure_memory_bandwidth(device, quick),
               "dispatch": measure_dispatch(device), "attention": measure_attention(device, dtype, quick),
               "decoder_step_s": measure_decoder_step(quick), "adamw": measure_adamw(device, quick)}
        if rank == 0:
            Path(outdir, "device.json").write_text(json.dumps(out))
    except BaseException as e:  # noqa: BLE001 - reported by the parent as one line
        Path(outdir, f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}".splitlines()[0])
        os._exit(1)


def measure_device(quick: bool, nproc: int = 1) -> dict:
    """The device measurements of one rank while `nproc` ranks run them at once: a plan's ranks share the
    machine's memory system, caches and spare cycles (one core each, no idle core left to absorb the
    interpreter's and gloo's threads or anything else), and the profile should describe a rank of a run,
    not a process alone on the machine."""
    return _spawned(_device_worker, nproc, (quick,), "device.json", "device measurement")


# ---------------------------------------------------------------------------------------------------
# fitting the profile fields


def fit_gemm(rows: list[dict]) -> tuple[float, float]:
    """(peak FLOP/s, gemm_half_dim): the 80th percentile of the measured rates (one lucky, cache-resident
    shape on a shared machine should not set the peak), and the half-dim that best explains the rest as
    peak * d / (d + half), d = min(m, n, k) (least squares on log rate, grid search)."""
    import numpy as np

    peak = float(np.percentile([r["flops_per_s"] for r in rows], 80))
    best = (float("inf"), 0.0)
    for half in [0.0] + [2 ** (i / 4) for i in range(0, 48)]:
        err = 0.0
        for r in rows:
            d = min(r["m"], r["n"], r["k"])
            pred = peak * d / (d + half)
            err += math.log(pred / r["flops_per_s"]) ** 2
        best = min(best, (err, half))
    return peak, best[1]


def fit_link(rows: list[dict], nproc: int) -> tuple[float, float, float]:
    """(bytes/s, latency s, rms log error) for which planner.cost.comm's all-reduce, all-gather and p2p
    formulas best match the measured times (grid search, least squares on log time)."""
    import numpy as np

    from planner.cost import comm
    from planner.hardware import CollectiveLink

    best = (float("inf"), 0.0, 0.0)
    for bw in np.logspace(7, 11.5, 91):
        for lat in np.logspace(-6.5, -2, 91):
            link = CollectiveLink(bus_bytes_per_s=bw, latency_s=lat, level="intra-node", ranks=nproc, nodes=1)
            err = 0.0
            for r in rows:
                s = r["bytes"]
                err += math.log(comm.all_reduce_time_s(s, link) / r["all_reduce_s"]) ** 2
                err += math.log(comm.all_gather_time_s(s, link) / r["all_gather_s"]) ** 2
                err += math.log(comm.p2p_time_s(s, bw, lat) / r["p2p_s"]) ** 2
            if err < best[0]:
                best = (err, float(bw), float(lat))
    err, bw, lat = best
    return bw, lat, math.sqrt(err / (3 * len(rows)))


def _decoder_step_case():
    """The decoder and workload whose one-process training step fits layer_overhead_us: small enough
    (hidden 64, 64 tokens) that the step is mostly the host's per-op work, which is what the fit is for;
    with a larger one (hidden 128, 256 tokens) the residual is a small difference of large, noisy times."""
    from planner.backends.torch.model import tiny_graph
    from planner.plan import Workload

    graph = tiny_graph("llama", layers=4, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab=256, max_seq=64)
    return graph, Workload(global_batch=2, seq_len=32, dtype="fp32")


def measure_decoder_step(quick: bool) -> float:
    """Median seconds of one training step (forward, backward, AdamW) of _decoder_step_case's decoder."""
    from planner.backends.torch.model import build_decoder
    from planner.backends.torch.runner import global_batch, loss_fn, make_optimizer

    graph, workload = _decoder_step_case()
    model = build_decoder(graph)
    opt = make_optimizer(model.parameters(), 1e-3)
    x, y = global_batch(0, 0, workload, model.spec.vocab)

    def step():
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    return _median_time_s(step, reps=3 if quick else 21)


def fit_layer_overhead_s(device_fields: dict, measured: float) -> dict:
    """Charge what the device profile does not explain of the decoder step's measured time (`measured`
    seconds, measure_decoder_step) to every layer's forward and backward passes (3 passes' worth per layer
    per micro-batch)."""
    from planner.cost.estimate import estimate
    from planner.plan import ParallelPlan

    graph, workload = _decoder_step_case()
    cluster = _one_device_cluster(device_fields, layer_overhead_us=0.0)
    predicted = estimate(graph, cluster, workload, ParallelPlan(mbs=workload.global_batch)).step_time_s
    layers = len(graph.layers)
    overhead = max(0.0, (measured - predicted) / (3 * layers))
    return {"model_params": graph.params, "measured_step_s": measured, "predicted_without_s": predicted,
            "layers": layers, "layer_overhead_s": overhead}


def fit_tp_dispatch(tp_mlp: dict, bytes_per_s: float, latency_s: float) -> dict:
    """tp_dispatch_s: a third (one forward, two backward passes' worth, as layer_time charges overheads) of
    what the tiny DTensor MLP's forward + backward takes beyond the plain one (the rank's FFN share) and the
    two all-reduces (forward output, backward input gradient) that planner.cost.comm charges on the fitted
    link; never negative. tp_dispatch_ns_per_byte: the same at the small model's size, less that fixed
    part, per byte of the sublayer's activation (tokens x hidden x 4 B, what DTensor redistributes)."""
    from planner.cost import comm
    from planner.hardware import CollectiveLink

    link = CollectiveLink(bus_bytes_per_s=bytes_per_s, latency_s=latency_s, level="intra-node",
                          ranks=tp_mlp["tp"], nodes=1)

    def beyond(case, key="dtensor_fwd_bwd_s"):
        nbytes = case["tokens"] * case["hidden"] * 4
        link_s = 2 * float(comm.all_reduce_time_s(nbytes, link))
        return case[key] - case["plain_fwd_bwd_s"] - link_s, link_s, nbytes

    extra, link_s, _ = beyond(tp_mlp)
    # sequence parallel: an all-gather and a reduce-scatter of the same bytes in each pass
    nbytes = tp_mlp["tokens"] * tp_mlp["hidden"] * 4
    sp_link_s = 2 * float(comm.all_gather_time_s(nbytes, link) + comm.reduce_scatter_time_s(nbytes, link))
    sp_extra = tp_mlp["sp_dtensor_fwd_bwd_s"] - tp_mlp["plain_fwd_bwd_s"] - sp_link_s
    fixed = max(0.0, extra) / 3
    out = {"link_s": link_s, "tp_dispatch_s": fixed, "sp_link_s": sp_link_s, "sp_dispatch_s": max(0.0, sp_extra) / 3}
    if "large" in tp_mlp:
        big, big_link_s, big_bytes = beyond(tp_mlp["large"])
        out.update({"large_link_s": big_link_s, "large_extra_s": big,
                    "tp_dispatch_ns_per_byte": max(0.0, big / 3 - fixed) / big_bytes * 1e9})
    return out


def fit_shard_copy(fsdp: dict, bytes_per_s: float, latency_s: float, nproc: int) -> dict:
    """ns per byte copied (Efficiency.shard_copy_ns_per_byte) from calibrate_step.fsdp_copy: the FSDP2 stack's
    time beyond the plain stack and its collectives on the fitted link (per block, a gather in forward and
    again in backward, a reduce-scatter of the gradients: estimate.dp_sync_s's ZeRO-3 count), over the
    bytes estimate.shard_copy_s charges for it (fp32: 2 gathers x 4 B + 4 B of gradient per parameter)."""
    from planner.cost import comm
    from planner.hardware import CollectiveLink

    link = CollectiveLink(bus_bytes_per_s=bytes_per_s, latency_s=latency_s, level="intra-node", ranks=nproc,
                          nodes=1)
    link_s = sum(2 * float(comm.all_gather_time_s(p * 4, link)) + float(comm.reduce_scatter_time_s(p * 4, link))
                 for p in fsdp["per_layer_params"])
    extra = fsdp["fsdp_fwd_bwd_s"] - fsdp["plain_fwd_bwd_s"] - link_s
    copied = fsdp["params"] * (2 * 4 + 4)
    return {"link_s": link_s, "extra_s": extra, "bytes": copied, "ns_per_byte": max(0.0, extra) / copied * 1e9}


def _one_device_cluster(device_fields: dict, **efficiency):
    """A one-device cluster carrying a device built from `device_fields` (for fitting, before the profile
    is written): any one-device node type of the catalog with its device swapped."""
    from planner import catalog
    from planner.hardware import Device

    dev = Device.model_validate(device_fields)
    if efficiency:
        dev = dev.model_copy(update={"efficiency": dev.efficiency.model_copy(update=efficiency)})
    for name in catalog.names("nodes"):
        node = catalog.node_type(name)
        if sum(s.count for s in node.devices) == 1:
            cluster = catalog.load_cluster(name, 1)
            refs = [cluster.devices[0].model_copy(update={"device": dev})]
            return cluster.model_copy(update={"devices": refs})
    raise BadInput("the catalog has no one-device node type to fit against")  # pragma: no cover


# ---------------------------------------------------------------------------------------------------
# the machine and the profile files


def machine_description() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    from planner.backends.torch.validate import usable_cores

    out = {"cpu": model, "cores": usable_cores(), "memory_bytes": mem, "os": platform.platform(),
           "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpus"] = torch.cuda.device_count()
    if hasattr(os, "getloadavg"):
        out["load_average_1m"] = round(os.getloadavg()[0], 2)
    return out


def _shown(path: Path) -> str:
    """A written file as the record keeps it: relative to the catalog's folder or the working directory
    when inside one, so a committed calibration record names no machine's absolute paths."""
    from planner import catalog

    path = Path(path).resolve()
    for base in (catalog.profiles_dir().resolve().parent, Path.cwd().resolve()):
        try:
            return str(path.relative_to(base))
        except ValueError:
            continue
    return str(path)


def calibrate(nproc: int | None = None, quick: bool = False, out_dir: str | None = None, force: bool = False,
              dry_run: bool = False) -> dict:
    from planner import catalog

    root = Path(out_dir) if out_dir else catalog.profiles_dir()
    targets = {s: root / s / f"{NODE_NAME}.yaml" for s in ("devices", "links", "nodes")}
    if not dry_run:
        if out_dir is not None and not root.is_dir():
            raise BadInput(f"--out-dir {root}: no such directory")
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing and not force:
            raise BadInput(f"{existing[0]} exists (a previous calibration); use --force to replace it, or "
                           "--out-dir DIR to write elsewhere")
    machine = machine_description()
    cuda = torch.cuda.is_available()
    if nproc is None:
        nproc = max(2, machine.get("gpus", 0) if cuda else machine["cores"])
    dtype_name = "bf16" if cuda else "fp32"
    date = _dt.date.today().isoformat()

    meas = measure_device(quick, 1 if cuda else min(nproc, machine["cores"]))
    gemm, membw, dispatch, attn = meas["gemm"], meas["memory_bandwidth"], meas["dispatch"], meas["attention"]
    peak, half = fit_gemm(gemm)
    coll = measure_collectives(nproc, quick, tp_mlp=not cuda)
    colls, tp_mlp, step = coll["rows"], coll["tp_mlp"], coll.get("step")
    # the link as a step sees it (calibrate_step); the tight-loop figures stay in the record
    bw, lat, link_rms = fit_link(step["in_step"] if step else colls, nproc)
    tp_fit = fit_tp_dispatch(tp_mlp, bw, lat) if tp_mlp else None
    copy_fit = fit_shard_copy(step["fsdp"], bw, lat, nproc) if step else None

    per_rank_mem = machine["memory_bytes"] / machine["cores"] if not cuda else \
        torch.cuda.get_device_properties(0).total_memory
    where = (f"{machine.get('gpu', machine['cpu'])}, {machine['cores']} cores, "
             f"{machine['memory_bytes'] / 1e9:.1f} GB RAM, {machine['os']}, torch {machine['torch']}")
    source = f"measured by `planner calibrate --backend torch` on {date}: {where}"
    device_fields = {
        "name": GPU_DEVICE_NAME if cuda else DEVICE_NAME,
        "kind": "gpu" if cuda else "cpu",
        "vendor": "this machine",
        "peak_tflops": {dtype_name: round(peak / 1e12, 6)},
        "memory_gb": round(per_rank_mem / 1e9, 3),
        "memory_bandwidth_gb_s": round(membw["bytes_per_s"] / 1e9, 3),
        "source": source,
        "provenance": "measured",
        "efficiency": {
            "matmul": 1.0, "memory": 1.0,
            "attention": round(min(1.0, max(0.01, attn["flops_per_s"] / peak)), 4),
            "gemm_half_dim": round(half, 2),
            "kernel_overhead_us": round(dispatch["op_s"] * 1e6, 3),
            "host_dispatch_us": 0.0,
            "layer_overhead_us": 0.0,
            "tp_dispatch_us": round(tp_fit["tp_dispatch_s"] * 1e6, 1) if tp_fit else 0.0,
            "tp_dispatch_ns_per_byte": round(tp_fit.get("tp_dispatch_ns_per_byte", 0.0), 4) if tp_fit else 0.0,
            "sp_dispatch_us": round(tp_fit["sp_dispatch_s"] * 1e6, 1) if tp_fit else None,
            "comm_overlap": round(step["overlap"]["comm_overlap"], 3) if step else 1.0,
            "shard_copy_ns_per_byte": round(copy_fit["ns_per_byte"], 3) if copy_fit else 0.0,
            "source": source,
        },
    }
    layer = fit_layer_overhead_s(device_fields, meas["decoder_step_s"])
    device_fields["efficiency"]["layer_overhead_us"] = round(layer["layer_overhead_s"] * 1e6, 2)
    adamw = meas["adamw"]
    adamw["predicted_s_per_param"] = 32 / membw["bytes_per_s"]  # estimate's optimizer term (AdamW, 32 B/param)
    device_fields["notes"] = (
        f"One rank = one {'GPU' if cuda else 'CPU core running one torch thread'}. peak = 80th percentile of "
        f"{dtype_name} GEMM rates over {len(gemm)} shapes{'' if cuda else ' (linear forward + backward)'} "
        f"({peak / 1e9:.1f} GFLOP/s); memory bandwidth = "
        + (f"copy of {membw['bytes'] // 2**20} MiB" if cuda else
           "an out-of-place op into fresh pages, median over 1-64 MiB (what an eager op sees; a copy of "
           f"{membw['bytes'] // 2**20} MiB into an existing buffer: {membw['copy_bytes_per_s'] / 1e9:.1f} GB/s)")
        + f"; memory_gb = {'the GPU' if cuda else 'RAM / cores'}; attention = causal "
        f"SDPA {attn['shape']}; kernel_overhead_us = eager dispatch of a tiny op; layer_overhead_us fitted on "
        f"a {layer['model_params']:,}-parameter decoder step ({layer['measured_step_s'] * 1e3:.1f} ms measured, "
        f"{layer['predicted_without_s'] * 1e3:.1f} ms explained by the other terms); "
        + (f"tp_dispatch_us = a third of what a tp{tp_mlp['tp']} DTensor MLP's forward + backward "
           f"({tp_mlp['dtensor_fwd_bwd_s'] * 1e3:.2f} ms) takes beyond the plain MLP "
           f"({tp_mlp['plain_fwd_bwd_s'] * 1e3:.2f} ms) and two all-reduces on the link "
           f"({tp_fit['link_s'] * 1e3:.2f} ms), sp_dispatch_us the same with sequence parallelism "
           f"({tp_mlp['sp_dtensor_fwd_bwd_s'] * 1e3:.2f} ms, link {tp_fit['sp_link_s'] * 1e3:.2f} ms); "
           f"tp_dispatch_ns_per_byte = the same at hidden 512, ffn 2048, 512 tokens "
           f"({tp_mlp['large']['dtensor_fwd_bwd_s'] * 1e3:.1f} ms against {tp_mlp['large']['plain_fwd_bwd_s'] * 1e3:.1f} "
           f"ms for the plain MLP with the rank's FFN share, link {tp_fit['large_link_s'] * 1e3:.1f} ms) less the "
           f"fixed part, per byte of the activation; "
           if tp_fit else "")
        + (f"comm_overlap = (T_gemms + T_allreduce - T_both) / min with a {step['overlap']['bytes'] // 2**20} MiB "
           f"async all-reduce under GEMMs ({step['overlap']['compute_s'] * 1e3:.1f} + {step['overlap']['comm_s'] * 1e3:.1f}"
           f" ms alone, {step['overlap']['both_s'] * 1e3:.1f} ms together); shard_copy_ns_per_byte = what an FSDP2 "
           f"stack of {step['fsdp']['params']:,} parameters takes beyond the plain stack "
           f"({step['fsdp']['fsdp_fwd_bwd_s'] * 1e3:.1f} vs {step['fsdp']['plain_fwd_bwd_s'] * 1e3:.1f} ms) and its "
           f"gathers and reduce-scatter on the link ({copy_fit['link_s'] * 1e3:.1f} ms), per byte copied; "
           if step else "")
        + f"AdamW (foreach=False) {adamw['s_per_param'] * 1e9:.1f} ns/param measured, "
        f"{adamw['predicted_s_per_param'] * 1e9:.1f} predicted (32 B/param). Measured in a process started "
        f"as a rank is (one thread, the runner's malloc settings). Load average "
        f"{machine.get('load_average_1m', 'n/a')} while measuring.")
    link_fields = {
        "name": LINK_NAME,
        "kind": "memory",
        "bandwidth_gb_s": round(bw / 1e9, 6),
        "latency_us": round(lat * 1e6, 3),
        "achievable_fraction": 1.0,
        "source": source,
        "provenance": "measured",
        "notes": (f"{'NCCL' if cuda else 'gloo (TCP over loopback)'} between {nproc} local processes: all-reduce, "
                  f"all-gather and send/recv of {colls[0]['bytes']}..{colls[-1]['bytes']} bytes"
                  + (", each inside a step-like loop (GEMM, fresh op output, collective) less the same loop "
                     "without it" if step else "")
                  + f"; bandwidth and latency fitted to planner.cost.comm's formulas (rms error of log time "
                  f"{link_rms:.2f})."),
    }
    count = machine.get("gpus", 1) if cuda else machine["cores"]
    node_fields = {
        "name": NODE_NAME,
        "source": source,
        "provenance": "measured",
        "devices": [{"device": device_fields["name"], "count": count}],
        "intra_link": LINK_NAME,
        # A "NIC" over the same loopback link, so that --nodes 2 (more ranks than cores) still resolves.
        "nics": {"link": LINK_NAME, "count": 1, "devices_per_nic": count},
        # The cores share the machine's RAM, but memory_gb already gives each rank its share of it, so the
        # node is not a shared-pool device pair (the planner's phone / Jetson case).
        "shared_memory": False,
        "notes": f"This machine as one node: {count} {'GPUs' if cuda else 'cores'}, one rank each.",
    }
    result = {
        "date": date, "machine": machine, "nproc": nproc, "quick": quick,
        "profile": {"device": device_fields, "link": link_fields, "node": node_fields},
        "measurements": {"gemm": gemm, "memory_bandwidth": membw, "dispatch": dispatch, "attention": attn,
                         "collectives": colls, "layer_overhead_fit": layer, "link_fit_rms_log": link_rms,
                         "tp_mlp": tp_mlp, "tp_dispatch_fit": tp_fit, "adamw": adamw,
                         "in_step": step, "shard_copy_fit": copy_fit},
        "written": [],
    }
    if not dry_run:
        import yaml

        from planner.files import write_atomic

        for section, fields in (("devices", device_fields), ("links", link_fields), ("nodes", node_fields)):
            path = targets[section]
            path.parent.mkdir(parents=True, exist_ok=True)
            text = (f"# Written by `planner calibrate --backend torch` on {date}; re-run it to re-measure.\n"
                    + yaml.safe_dump(fields, sort_keys=False, width=110))
            write_atomic(path, text)
            result["written"].append(_shown(path))
        catalog._hardware_catalog.cache_clear()
    return result


def report_text(r: dict) -> str:
    d, link = r["profile"]["device"], r["profile"]["link"]
    e = d["efficiency"]
    peak = next(iter(d["peak_tflops"].values()))
    lines = [f"calibrated {r['machine'].get('gpu', r['machine']['cpu'])} ({r['machine']['cores']} cores) on {r['date']}"
             + (" [quick: not a profile to trust]" if r["quick"] else ""),
             f"  device {d['name']}: peak {peak * 1e3:.2f} GFLOP/s, memory {d['memory_bandwidth_gb_s']:.2f} GB/s, "
             f"gemm_half_dim {e['gemm_half_dim']}, attention {e['attention']:.2f}, kernel overhead "
             f"{e['kernel_overhead_us']:.2f} us, layer overhead {e['layer_overhead_us']:.1f} us",
             f"  link {link['name']}: {link['bandwidth_gb_s']:.3f} GB/s, latency {link['latency_us']:.1f} us "
             f"({r['nproc']} processes)"]
    if r["written"]:
        lines.append("  wrote " + ", ".join(r["written"]))
        lines.append("  use it: planner plan --cluster local ... / planner estimate --cluster local ...")
    else:
        lines.append("  (dry run: nothing written)")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `planner calibrate --backend torch`")
