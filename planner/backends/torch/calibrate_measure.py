"""The measurements of `calibrate --backend torch`: GEMM rates, memory bandwidth, AdamW, eager dispatch,
attention, a small decoder's training step, and the collectives between spawned local processes.

Separate from the fitting (calibrate_fit.py) and from calibrate() (calibrate.py): everything here runs torch
and returns raw times, in a process started as the runner starts a rank; nothing here turns them into profile
fields.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------------------
# timing


def median_time_s(fn, reps: int, min_time_s: float = 0.0) -> float:
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
    first = [gemm_row(m, n, k, device, dtype, quick) for m, n, k in shapes]
    if quick:
        return first
    # A second pass in reverse order, each shape keeping its faster one: a slow minute on a shared machine
    # (another process, the host's neighbours) then costs one pass of a few shapes, not a stretch of the fit.
    second = [gemm_row(m, n, k, device, dtype, quick) for m, n, k in reversed(shapes)][::-1]
    return [a if a["time_s"] <= b["time_s"] else b for a, b in zip(first, second)]


def gemm_row(m: int, n: int, k: int, device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    import torch.nn.functional as F

    if device.type == "cuda":
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        t = median_time_s(lambda: a @ b, reps=3 if quick else 5, min_time_s=0.0 if quick else 0.2)
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

    t = median_time_s(linear_steps, reps=3 if quick else 5, min_time_s=0.0 if quick else 0.2) / copies
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
    t = median_time_s(lambda: dst.copy_(src), reps=3 if quick else 7)
    out = {"bytes": nbytes, "time_s": t, "copy_bytes_per_s": 2 * nbytes / t, "bytes_per_s": 2 * nbytes / t}
    if device.type == "cpu":
        rates = []
        for mib in ((1, 16) if quick else (1, 4, 16, 64)):
            x = torch.ones(mib * 2**20 // 4)
            tt = median_time_s(lambda: torch.mul(x, 1.0), reps=3 if quick else 9)
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
    t = median_time_s(opt.step, reps=3 if quick else 5)
    return {"params": n * 2**20, "time_s": t, "s_per_param": t / (n * 2**20)}


def measure_grad_accum(device: torch.device, quick: bool) -> dict:
    """Seconds per parameter of adding a micro-batch's gradients into the accumulated ones, as autograd's
    AccumulateGrad does on eager PyTorch (`grad.add_(new)`), over 8M (quick: 1M) fp32 parameters in
    1M-element tensors."""
    n = 1 if quick else 8
    grads = [torch.randn(2**20, device=device) for _ in range(n)]
    news = [torch.randn(2**20, device=device) for _ in range(n)]

    def accumulate():
        for g, x in zip(grads, news):
            g.add_(x)

    t = median_time_s(accumulate, reps=3 if quick else 7)
    return {"params": n * 2**20, "time_s": t, "s_per_param": t / (n * 2**20)}


def measure_dispatch(device: torch.device) -> dict:
    """Per-op cost of eager dispatch: a one-element add, timed in a loop of 1000."""
    x = torch.ones(1, device=device)

    def many():
        for _ in range(1000):
            torch.add(x, x)

    t = median_time_s(many, reps=5)
    return {"op_s": t / 1000}


def measure_attention(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    import torch.nn.functional as F

    b, h, s, d = (1, 4, 128, 64) if quick else (2, 6, 256, 64)
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype) for _ in range(3))
    t = median_time_s(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps=5)
    flops = 4.0 * b * s * s * h * d * 0.5  # QK^T and AV, causal half (as Layer.attention_core_flops)
    return {"shape": [b, h, s, d], "time_s": t, "flops_per_s": flops / t}


def decoder_step_case():
    """The decoder and workload whose one-process training step fits layer_overhead_us: small enough
    (hidden 64, 64 tokens) that the step is mostly the host's per-op work, which is what the fit is for;
    with a larger one (hidden 128, 256 tokens) the residual is a small difference of large, noisy times."""
    from planner.backends.torch.model import tiny_graph
    from planner.core.plan import Workload

    graph = tiny_graph("llama", layers=4, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab=256, max_seq=64)
    return graph, Workload(global_batch=2, seq_len=32, dtype="fp32")


def measure_decoder_step(quick: bool) -> float:
    """Median seconds of one training step (forward, backward, AdamW) of decoder_step_case's decoder."""
    from planner.backends.torch.model import build_decoder
    from planner.backends.torch.runner import global_batch, loss_fn, make_optimizer

    graph, workload = decoder_step_case()
    model = build_decoder(graph)
    opt = make_optimizer(model.parameters(), 1e-3)
    x, y = global_batch(0, 0, workload, model.spec.vocab)

    def step():
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    return median_time_s(step, reps=3 if quick else 21)


# ---------------------------------------------------------------------------------------------------
# collectives between local processes


def collective_sizes(quick: bool) -> list[int]:
    if quick:
        return [4096, 262144]
    return [2**p for p in range(12, 27, 2)]  # 4 KiB .. 64 MiB


# The block calibrate splits tensor-parallel: a small Llama's (GQA, SwiGLU), at token counts spanning what
# a small model's micro-batches hand a TP group (64 .. 1024 tokens), so the fixed and the per-byte part of
# DTensor's cost are fitted jointly (calibrate_fit.fit_tp_dispatch) instead of each from one size.
TP_BLOCK = {"hidden": 512, "heads": 8, "kv_heads": 4, "head_dim": 64, "ffn_hidden": 1536}
TP_BLOCK_TOKENS = (64, 256, 1024)


def tp_block_times(world: int, reps: int, barrier, tokens: tuple[int, ...] = TP_BLOCK_TOKENS) -> dict:
    """Forward + backward of one of the backend's own decoder blocks (attention and MLP sublayers with
    their norms, as a middle pipeline stage holds it) split tp = world ways by parallel.apply_tp, with and
    without sequence parallelism, against the plain block with one rank's share of the heads and the FFN
    (the GEMM and attention work a TP rank does). Each repetition times the plain block and then the split
    one, both started together on every rank, and keeps their difference: a slow stretch on the machine then
    lands on both halves of a pair instead of on one size's figure."""
    from torch.distributed.device_mesh import init_device_mesh

    from planner.backends.torch.calibrate_step import median_paired_s
    from planner.backends.torch.model import Decoder, DecoderSpec
    from planner.backends.torch.parallel import apply_tp

    def block(share: int):  # one block, no embedding or head; `share` = ways its heads and FFN are split
        spec = DecoderSpec(name="calibrate-block", vocab=16, hidden=TP_BLOCK["hidden"], positions=0, blocks=1,
                           heads=TP_BLOCK["heads"] // share, kv_heads=TP_BLOCK["kv_heads"] // share,
                           head_dim=TP_BLOCK["head_dim"], ffn_hidden=TP_BLOCK["ffn_hidden"] // share, gated=True,
                           norm="rmsnorm", bias=False, qkv_bias=False, tied=False)
        return Decoder(spec, init_seed=0).chunk(0, 1, first=False, last=False)

    mesh = init_device_mesh("cpu", (world,))
    plain = block(world)
    rows = []
    for sp in (False, True):
        split = block(1)
        apply_tp(split, mesh, sp=sp)
        for t in tokens:
            x_plain = torch.randn(1, t, TP_BLOCK["hidden"], requires_grad=True)
            # under sp the stream between blocks is sequence-sharded: each rank holds t / tp of it
            x_split = torch.randn(1, t // world if sp else t, TP_BLOCK["hidden"], requires_grad=True)

            def run_plain():
                plain(x_plain).sum().backward()

            def run_split():
                split(x_split).sum().backward()

            n = reps if t >= 1024 else 2 * reps
            plain_s, diff_s = median_paired_s([run_plain, run_split], n, barrier)
            rows.append({"tokens": t, "sp": sp, "plain_fwd_bwd_s": plain_s, "dtensor_fwd_bwd_s": plain_s + diff_s,
                         "extra_s": diff_s, "reps": n})
    return {"tp": world, **TP_BLOCK, "rows": rows}


def collective_worker(rank: int, world: int, port: int, sizes: list[int], reps: int, tp_block: bool,
                       progress: tuple[float, bool] | None, outdir: str) -> None:
    """progress = (the calibration's start time, quick) for the progress lines, or None (silent)."""
    import torch.distributed as dist

    tick = _ticker(rank, progress, first=7)

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        from planner.backends.torch.calibrate_step import exchange, median_together_s

        def timed(fn, n=reps):  # median after a warm-up, every call started together
            return median_together_s(fn, n, dist.barrier)

        rows = []
        tick(0)
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
        tick(1)
        tp = tp_block_times(world, reps, dist.barrier) if tp_block else None
        step = None
        if tp_block:  # the CPU stack: what a collective costs inside a step (calibrate_step)
            from planner.backends.torch import calibrate_step as cs

            # paired rounds (calibrate_step.median_paired_s): three times the rounds of the tight loop,
            # since a collective's share of a GEMM loop is a small difference of two noisy times
            tick(2)
            step = {"in_step": cs.in_step_collectives(rank, world, sizes, 3 * reps)}
            tick(3)
            step["overlap"] = cs.comm_overlap(reps)
            tick(4)
            step["fsdp"] = cs.fsdp_copy(world, reps)
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            Path(outdir, "collectives.json").write_text(json.dumps({"rows": rows, "tp_block": tp, "step": step}))
    except BaseException as e:  # noqa: BLE001 - reported by the parent as one line
        Path(outdir, f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}".splitlines()[0])
        os._exit(1)


def spawned(fn, nprocs: int, args: tuple, result: str, what: str):
    """Run fn(rank, *args, outdir) on `nprocs` spawned processes started as the runner starts its ranks
    (launch.child_env: one thread, its malloc settings) and return the JSON they left in `result`."""
    import torch.multiprocessing as mp

    from planner.backends.torch.launch import child_env
    from planner.backends.torch.runner import RunFailed, RunOptions

    with tempfile.TemporaryDirectory(prefix="planner-calibrate-") as outdir:
        with child_env(RunOptions(threads=1)):
            ctx = mp.start_processes(fn, args=(*args, outdir), nprocs=nprocs, start_method="spawn", join=False)
        try:
            while not ctx.join(timeout=1.0):
                pass
        except (mp.ProcessExitedException, mp.ProcessRaisedException):
            errs = sorted(Path(outdir).glob("error*.txt"))
            msg = errs[0].read_text() if errs else "a process died"
            raise RunFailed(f"{what} failed: {msg}") from None
        return json.loads(Path(outdir, result).read_text())


def measure_collectives(nproc: int, quick: bool, tp_block: bool = False, t0: float | None = None) -> dict:
    """{"rows": per message size, "tp_block": tp_block_times or None, "step": calibrate_step's} from `nproc`
    local gloo processes; t0 (the calibration's start) turns on the progress lines."""
    from planner.backends.torch.launch import free_port

    sizes = collective_sizes(quick)
    progress = (t0, quick) if t0 is not None else None
    return spawned(collective_worker, nproc, (nproc, free_port(), sizes, 3 if quick else 15, tp_block, progress),
                    "collectives.json", "collective measurement")


def _ticker(rank: int, progress: tuple[float, bool] | None, first: int):
    """tick(i): rank 0 says that its i-th step (calibrate_progress.STEPS[first + i]) starts; silent when
    progress (the calibration's start time, quick) is None."""
    from planner.backends.torch.calibrate_progress import tick as say

    cuda = torch.cuda.is_available()

    def tick(i: int) -> None:
        if rank == 0 and progress is not None:
            say(first + i, progress[1], cuda, progress[0])
    return tick


def device_worker(rank: int, quick: bool, t0: float | None, outdir: str) -> None:
    """The one-rank device measurements, in a process started as a rank is (see spawned). Every rank of
    measure_device runs them at once; rank 0's are kept. t0: the calibration's start (progress lines)."""
    try:
        torch.set_num_threads(1)
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        dtype = torch.bfloat16 if cuda else torch.float32
        tick = _ticker(rank, (t0, quick) if t0 is not None else None, first=0)
        steps = (("gemm", lambda: measure_gemm(device, dtype, quick)),
                 ("memory_bandwidth", lambda: measure_memory_bandwidth(device, quick)),
                 ("dispatch", lambda: measure_dispatch(device)),
                 ("attention", lambda: measure_attention(device, dtype, quick)),
                 ("decoder_step_s", lambda: measure_decoder_step(quick)),
                 ("adamw", lambda: measure_adamw(device, quick)),
                 ("grad_accum", lambda: measure_grad_accum(device, quick)))
        out = {}
        for i, (key, measure) in enumerate(steps):
            tick(i)
            out[key] = measure()
        if rank == 0:
            Path(outdir, "device.json").write_text(json.dumps(out))
    except BaseException as e:  # noqa: BLE001 - reported by the parent as one line
        Path(outdir, f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}".splitlines()[0])
        os._exit(1)


def measure_device(quick: bool, nproc: int = 1, t0: float | None = None) -> dict:
    """The device measurements of one rank while `nproc` ranks run them at once: a plan's ranks share the
    machine's memory system, caches and spare cycles (one core each, no idle core left to absorb the
    interpreter's and gloo's threads or anything else), and the profile should describe a rank of a run,
    not a process alone on the machine."""
    return spawned(device_worker, nproc, (quick, t0), "device.json", "device measurement")
