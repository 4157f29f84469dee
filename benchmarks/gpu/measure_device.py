#!/usr/bin/env python3
"""Measure one accelerator so the planner's cost model can be checked against it (benchmarks/gpu/README.md).

Writes, atomically, into --out:
  gemm.csv       bf16 and fp8 GEMM time over square and transformer-training shapes
  membw.csv      device memory bandwidth of copy, elementwise (x*2+y) and a read-only sum, 1 MiB..4 GiB
  launch.csv     host dispatch time per eager kernel and device time per tiny kernel
  attention.csv  scaled_dot_product_attention (flash backend where available), causal, fwd and fwd+bwd
  nccl.csv       a 1-process NCCL all_reduce over sizes: the per-call latency floor (CUDA only)
  device.json    device properties, versions, clocks (nvidia-smi) and date

Depends on torch and the Python standard library only: the GPU machine may have no numpy, pandas or scipy.
Without CUDA it runs on the CPU with tiny sizes, so the script itself can be tested anywhere.

Timing method: every timed call sits between its own pair of CUDA events, after a write of a 256 MiB
buffer that evicts the L2 cache (as triton.testing.do_bench does), so back-to-back repeats of a small
GEMM do not find their operands in L2; the median of the repeats is reported.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MiB = 2**20
GiB = 2**30
L2_FLUSH_BYTES = 256 * MiB  # larger than any current L2 (H100 50 MB, B200 126 MB)


# ----------------------------------------------------------------------------------------------------
# output helpers

def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="raise", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _fmt(r.get(c, "")) for c in columns})
    atomic_write_text(path, buf.getvalue())
    print(f"wrote {path} ({len(rows)} rows)", flush=True)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# ----------------------------------------------------------------------------------------------------
# timing

class Timer:
    """Median time of a callable on `device`: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, flush_l2: bool = True):
        self.device = device
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) \
            if (self.cuda and flush_l2) else None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once_s(self, fn) -> float:
        """One call, timed alone (no L2 flush): used to size warmup and repeats."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def median_s(self, fn, budget_s: float = 0.1, min_reps: int = 5, max_reps: int = 100,
                 warmup_s: float = 0.02) -> tuple[float, int]:
        """(median seconds of one call, repeats). Repeats fill about `budget_s`, within [min, max]."""
        est = max(self.once_s(fn), 1e-6)
        for _ in range(max(1, min(20, int(warmup_s / est)))):
            fn()
        reps = max(min_reps, min(max_reps, int(budget_s / est)))
        times = []
        if self.cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for i in range(reps):
                if self.flush is not None:
                    self.flush.zero_()
                starts[i].record()
                fn()
                ends[i].record()
            self.sync()
            times = [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times), reps


# ----------------------------------------------------------------------------------------------------
# GEMM

# (label, n, k): output width n, reduction k, as a weight of shape (n, k) in y = x @ W^T with x (m, k).
# Llama 3 8B: h 4096, ffn 14336, 8 kv heads of 128 (qkv out 6144); 70B: h 8192, ffn 28672, qkv out
# 10240; 405B: h 16384, ffn 53248, qkv out 18432 (Llama 3 paper, arXiv:2407.21783, Table 3). tp8 rows
# are Megatron column/row splits of those weights over 8 GPUs. Small models: GPT-3 XL-like h 2048 / ffn
# 8192 and h 1024 / ffn 4096 (Brown et al. 2020, Table 2.1, with 4h MLPs).
WEIGHT_SHAPES = [
    ("h1024.ffn_up", 4096, 1024), ("h1024.ffn_down", 1024, 4096),
    ("h2048.qkv", 6144, 2048), ("h2048.ffn_up", 8192, 2048), ("h2048.ffn_down", 2048, 8192),
    ("l3-8b.qkv", 6144, 4096), ("l3-8b.o", 4096, 4096), ("l3-8b.gate_up", 28672, 4096),
    ("l3-8b.down", 4096, 14336), ("l3-8b.lm_head", 128256, 4096),
    ("l3-70b.qkv", 10240, 8192), ("l3-70b.o", 8192, 8192), ("l3-70b.up", 28672, 8192),
    ("l3-70b.down", 8192, 28672),
    ("l3-70b.tp8.qkv", 1280, 8192), ("l3-70b.tp8.o", 8192, 1024), ("l3-70b.tp8.gate_up", 7168, 8192),
    ("l3-70b.tp8.down", 8192, 3584),
    ("l3-405b.tp8.qkv", 2304, 16384), ("l3-405b.tp8.o", 16384, 2048),
    ("l3-405b.tp8.up", 6656, 16384), ("l3-405b.tp8.down", 16384, 6656),
]
SQUARES = [256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384]
TOKENS = [1024, 2048, 4096, 8192, 16384, 32768]
BWD_TOKENS = [4096, 16384]  # backward shapes (dgrad, wgrad) at these token counts
MAX_GEMM_FLOP = 2 * 32768 * 28672 * 8192  # skip the very largest products to keep the sweep short


def gemm_grid(quick: bool, cpu: bool) -> list[dict]:
    """Shapes as (m, n, k): C (m x n) = A (m x k) @ B (k x n), what planner.cost.compute.gemm_time_s takes."""
    if cpu:
        return [dict(m=s, n=s, k=s, shape_class="square", label=f"sq{s}") for s in (64, 128)] + [
            dict(m=128, n=192, k=64, shape_class="llm", label="tiny.fwd"),
            dict(m=128, n=64, k=192, shape_class="bwd-dgrad", label="tiny.dgrad"),
            dict(m=64, n=192, k=128, shape_class="bwd-wgrad", label="tiny.wgrad"),
        ]
    squares = [256, 1024, 4096, 8192] if quick else SQUARES
    tokens = [4096] if quick else TOKENS
    weights = WEIGHT_SHAPES[::3] if quick else WEIGHT_SHAPES
    bwd_tokens = [] if quick else BWD_TOKENS
    out = [dict(m=s, n=s, k=s, shape_class="square", label=f"sq{s}") for s in squares]
    for label, n, k in weights:
        cls = "llm-tp" if ".tp" in label else ("lm-head" if "lm_head" in label else "llm")
        for m in tokens:
            out.append(dict(m=m, n=n, k=k, shape_class=cls, label=f"{label}.fwd"))
        for m in bwd_tokens:
            # backward of y = x W^T: dX (m x k) = dY (m x n) @ W (n x k); dW (n x k) = dY^T (n x m) @ X (m x k)
            out.append(dict(m=m, n=k, k=n, shape_class="bwd-dgrad", label=f"{label}.dgrad"))
            out.append(dict(m=n, n=k, k=m, shape_class="bwd-wgrad", label=f"{label}.wgrad"))
    seen, grid = set(), []
    for g in out:
        key = (g["m"], g["n"], g["k"])
        if key in seen or 2 * g["m"] * g["n"] * g["k"] > MAX_GEMM_FLOP:
            continue
        seen.add(key)
        grid.append(g)
    return grid


def fp8_support(device: torch.device) -> str:
    """'' when torch._scaled_mm with e4m3 works here, else why not."""
    if device.type != "cuda":
        return "not CUDA"
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return "torch has no float8_e4m3fn / _scaled_mm"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "FP8 tensor cores need compute capability 8.9+"
    try:
        a = torch.randn(32, 32, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(32, 32, device=device).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device, dtype=torch.float32)
        _scaled_mm(a, b, one, one)
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - any failure means: no fp8 here
        return f"torch._scaled_mm failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return ""


def _scaled_mm(a, b, scale_a, scale_b):
    """torch._scaled_mm with bf16 output; its signature and return type changed across torch releases."""
    try:
        out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    except TypeError:
        out = torch._scaled_mm(a, b, out_dtype=torch.bfloat16, scale_a=scale_a, scale_b=scale_b)
    return out[0] if isinstance(out, tuple) else out


def measure_gemm(device, timer: Timer, quick: bool) -> tuple[list[dict], dict]:
    cpu = device.type != "cuda"
    grid = gemm_grid(quick, cpu)
    why_no_fp8 = fp8_support(device)
    dtypes = ["bf16"] + ([] if why_no_fp8 else ["fp8", "fp8_cast"])
    rows = []
    t_start = time.perf_counter()
    for dt in dtypes:
        for g in grid:
            m, n, k = g["m"], g["n"], g["k"]
            if dt == "fp8_cast" and g["shape_class"] not in ("square", "llm", "llm-tp"):
                continue  # the cast-included variant only on forward shapes (keeps the sweep short)
            try:
                fn, free = _gemm_fn(dt, m, n, k, device)
                t, reps = timer.median_s(fn, budget_s=0.02 if quick else 0.1, min_reps=3 if quick else 5)
                del fn
                free()
            except (torch.cuda.OutOfMemoryError, MemoryError):
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"gemm {dt} {m}x{n}x{k}: out of memory, skipped", file=sys.stderr)
                continue
            flops = 2.0 * m * n * k
            rows.append(dict(m=m, n=n, k=k, dtype=dt, time_s=t, tflops=flops / t / 1e12,
                             shape_class=g["shape_class"], label=g["label"], reps=reps))
            print(f"gemm {dt:8s} {m:6d} x {n:6d} x {k:6d}  {t * 1e3:9.3f} ms  {flops / t / 1e12:7.1f} TFLOP/s",
                  flush=True)
    info = {"gemm_fp8": "measured" if not why_no_fp8 else f"skipped: {why_no_fp8}",
            "gemm_seconds": round(time.perf_counter() - t_start, 1)}
    return rows, info


def _gemm_fn(dt: str, m: int, n: int, k: int, device):
    """A zero-argument callable doing one GEMM of (m, n, k), and a function that frees its tensors."""
    g = torch.Generator(device=device).manual_seed(0)
    if dt == "bf16":
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g)
        b = torch.randn(k, n, device=device, dtype=torch.bfloat16, generator=g)
        return (lambda: torch.matmul(a, b)), (lambda: None)
    # fp8: cuBLASLt wants A row-major (m, k) and B column-major (k, n), i.e. B = (n, k) row-major, transposed.
    a16 = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g)
    b8 = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=g).to(torch.float8_e4m3fn).t()
    sa = torch.ones((), device=device, dtype=torch.float32)
    sb = torch.ones((), device=device, dtype=torch.float32)
    if dt == "fp8":
        a8 = a16.to(torch.float8_e4m3fn)
        del a16
        return (lambda: _scaled_mm(a8, b8, sa, sb)), (lambda: None)
    # fp8_cast: the Transformer Engine pattern the planner models: cast the bf16 input, then the fp8 GEMM
    return (lambda: _scaled_mm(a16.to(torch.float8_e4m3fn), b8, sa, sb)), (lambda: None)


# ----------------------------------------------------------------------------------------------------
# memory bandwidth

def measure_membw(device, timer: Timer, quick: bool) -> list[dict]:
    if device.type != "cuda":
        sizes = [1 * MiB, 4 * MiB]
    elif quick:
        sizes = [1 * MiB, 16 * MiB, 256 * MiB, 1 * GiB]
    else:
        free = torch.cuda.mem_get_info(device)[0]
        sizes = [2**p * MiB for p in range(0, 13)]  # 1 MiB .. 4 GiB
        sizes = [s for s in sizes if 3 * s + L2_FLUSH_BYTES < 0.9 * free]
    rows = []
    for size in sizes:
        n = size // 2  # bf16 elements
        x = torch.ones(n, device=device, dtype=torch.bfloat16)
        y = torch.ones(n, device=device, dtype=torch.bfloat16)
        z = torch.empty(n, device=device, dtype=torch.bfloat16)
        ops = [
            ("copy", lambda: z.copy_(x), 2 * size),                            # read x, write z
            ("axpy", lambda: torch.add(y, x, alpha=2, out=z), 3 * size),       # z = x*2 + y
            ("sum", lambda: x.sum(dtype=torch.float32), size),  # read only
        ]
        for op, fn, moved in ops:
            t, reps = timer.median_s(fn, budget_s=0.02 if quick else 0.05)
            rows.append(dict(op=op, size_bytes=size, bytes_moved=moved, time_s=t, gb_s=moved / t / 1e9,
                             reps=reps))
            print(f"membw {op:5s} {size / MiB:8.0f} MiB  {moved / t / 1e9:8.1f} GB/s", flush=True)
        del x, y, z
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------
# launch overheads

def measure_launch(device, quick: bool) -> list[dict]:
    """host_dispatch_us: wall time per eager op issued back to back (the device keeps up, so the host is
    what is measured). kernel_overhead_us: device time per tiny kernel replayed from a CUDA graph (no
    host in the loop): launch latency plus the gap between dependent kernels."""
    cuda = device.type == "cuda"
    n = 200 if quick else 2000
    x = torch.zeros(1, device=device, dtype=torch.float32)
    a = torch.randn(16, 16, device=device, dtype=torch.bfloat16)
    rows = []

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def host_per_op(fn) -> float:
        best = []
        for _ in range(5):
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            t1 = time.perf_counter()
            sync()
            best.append((t1 - t0) / n)
        return statistics.median(best)

    for name, fn in [("add_", lambda: x.add_(1.0)), ("mm_16", lambda: torch.mm(a, a)),
                     ("empty_like", lambda: torch.empty_like(x))]:
        host_per_op(fn)  # warmup
        rows.append(dict(metric="host_dispatch_us", op=name, value_us=host_per_op(fn) * 1e6,
                         method=f"wall time of {n} back-to-back eager calls / {n}, median of 5"))

    # round trip: one tiny op and a synchronize
    def roundtrip():
        x.add_(1.0)
        sync()
    rows.append(dict(metric="sync_roundtrip_us", op="add_+synchronize", value_us=host_per_op(roundtrip) * 1e6,
                     method="wall time of one eager op followed by synchronize"))

    if cuda:
        k = 100 if quick else 500
        try:
            s = torch.cuda.Stream(device)
            s.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(s):
                for _ in range(3):
                    x.add_(1.0)
            torch.cuda.current_stream(device).wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(k):
                    x.add_(1.0)
            graph.replay()
            sync()
            times = []
            for _ in range(10):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                graph.replay()
                e1.record()
                sync()
                times.append(e0.elapsed_time(e1) * 1e-3 / k)
            rows.append(dict(metric="kernel_overhead_us", op="add_ (1 element)",
                             value_us=statistics.median(times) * 1e6,
                             method=f"CUDA graph of {k} dependent tiny kernels, device time / {k}, median of 10"))
        except Exception as e:  # noqa: BLE001 - graphs unavailable: fall back to queued eager kernels
            print(f"launch: CUDA graph capture failed ({type(e).__name__}); using queued eager kernels",
                  file=sys.stderr)
        # eager, events around k queued kernels: device time per kernel when the host is the feeder
        sync()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(k):
            x.add_(1.0)
        e1.record()
        sync()
        rows.append(dict(metric="eager_kernel_interval_us", op="add_ (1 element)",
                         value_us=e0.elapsed_time(e1) * 1e3 / k,
                         method=f"device time between events around {k} eager launches / {k}"))
    else:
        rows.append(dict(metric="kernel_overhead_us", op="add_ (1 element)",
                         value_us=host_per_op(lambda: x.add_(1.0)) * 1e6,
                         method="CPU: no separate device; same as host time"))
    for r in rows:
        print(f"launch {r['metric']:26s} {r['op']:18s} {r['value_us']:8.2f} us", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------
# attention

ATTN_SHAPES = [  # (batch, heads, seq, head_dim)
    (1, 32, 2048, 128), (1, 32, 4096, 128), (1, 32, 8192, 128), (1, 64, 8192, 128), (1, 8, 16384, 128),
    (4, 32, 2048, 128), (2, 16, 2048, 64), (8, 16, 1024, 64), (1, 16, 4096, 64), (1, 64, 4096, 128),
    (1, 128, 4096, 128),
]


def _sdpa_context(device):
    """(context manager factory, backend name): flash on CUDA where torch offers the selector."""
    import contextlib

    if device.type == "cuda":
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            return (lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)), "flash"
        except ImportError:
            pass
    return contextlib.nullcontext, "default"


def measure_attention(device, timer: Timer, quick: bool) -> list[dict]:
    import contextlib

    import torch.nn.functional as F

    if device.type != "cuda":
        shapes = [(1, 2, 128, 32), (1, 4, 256, 16)]
    else:
        shapes = ATTN_SHAPES[:3] + ATTN_SHAPES[6:7] if quick else ATTN_SHAPES
    ctx, backend = _sdpa_context(device)
    rows = []
    for b, h, s, d in shapes:
        q, k, v = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16)
        used = backend
        try:
            with ctx():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
        except RuntimeError:
            used = "default"  # the flash backend refused this shape or device: let torch choose
        use_ctx = ctx if used == backend else contextlib.nullcontext

        def fwd():
            with use_ctx():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwd_bwd():
            # autograd.grad rather than backward(): no accumulation into q.grad between repeats
            torch.autograd.grad(fwd(), (q, k, v), dout)

        budget = 0.02 if quick else 0.1
        with torch.no_grad():
            t_f, _ = timer.median_s(fwd, budget_s=budget)
        t_fb, _ = timer.median_s(fwd_bwd, budget_s=budget)
        # causal: half of QK^T and AV, 4*b*h*s^2*d FLOPs for the full square (FlashAttention convention)
        flops_fwd = 4.0 * b * h * s * s * d / 2
        rows.append(dict(batch=b, heads=h, seq=s, head_dim=d, causal=1, backend=used, fwd_s=t_f,
                         fwd_bwd_s=t_fb, bwd_s=max(t_fb - t_f, 0.0), fwd_flops=flops_fwd,
                         fwd_tflops=flops_fwd / t_f / 1e12, fwd_bwd_tflops=3.5 * flops_fwd / t_fb / 1e12))
        print(f"attention b{b} h{h} s{s} d{d} ({used}): fwd {t_f * 1e3:.3f} ms "
              f"{flops_fwd / t_f / 1e12:.0f} TFLOP/s, fwd+bwd {t_fb * 1e3:.3f} ms", flush=True)
        del q, k, v, dout
    return rows


# ----------------------------------------------------------------------------------------------------
# NCCL

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_nccl(device, quick: bool) -> list[dict]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        print("nccl: torch.distributed has no NCCL, skipped", file=sys.stderr)
        return []
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1)
    rows = []
    try:
        sizes = [2**p for p in range(10, 31, 2 if quick else 1)]  # 1 KiB .. 1 GiB
        for size in sizes:
            t = torch.ones(size // 4, device=device, dtype=torch.float32)
            for _ in range(5):
                dist.all_reduce(t)
            torch.cuda.synchronize(device)
            n = 20 if size <= 16 * MiB else 5
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            e0.record()
            for _ in range(n):
                dist.all_reduce(t)
            e1.record()
            torch.cuda.synchronize(device)
            wall = (time.perf_counter() - t0) / n
            dev_s = e0.elapsed_time(e1) * 1e-3 / n
            rows.append(dict(op="all_reduce", world_size=1, size_bytes=size, time_s=dev_s, host_wall_s=wall))
            print(f"nccl all_reduce {size:11d} B  {dev_s * 1e6:9.1f} us (wall {wall * 1e6:.1f} us)", flush=True)
            del t
    finally:
        dist.destroy_process_group()
    return rows


# ----------------------------------------------------------------------------------------------------
# device description

def device_info(device) -> dict:
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "python": sys.version.split()[0], "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda, "device_type": device.type,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "matmul_allow_bf16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        props = {}
        for name in dir(p):
            if name.startswith("_"):
                continue
            v = getattr(p, name)
            if isinstance(v, (int, float, str, bool)):
                props[name] = v
            elif v is not None and not callable(v):
                props[name] = str(v)
        info["properties"] = props
        info["capability"] = list(torch.cuda.get_device_capability(device))
        try:
            info["cudnn"] = torch.backends.cudnn.version()
        except Exception:  # noqa: BLE001
            pass
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None
        info["nvidia_smi"] = _nvidia_smi()
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def _nvidia_smi() -> dict | str:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return "nvidia-smi not found"
    fields = ["name", "driver_version", "pci.bus_id", "memory.total", "clocks.sm", "clocks.mem",
              "clocks.max.sm", "clocks.max.mem", "power.limit", "power.max_limit", "temperature.gpu",
              "persistence_mode", "compute_mode", "mig.mode.current"]
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"
    if out.returncode != 0:
        return f"nvidia-smi failed: {out.stderr.strip()[:200]}"
    gpus = []
    for line in out.stdout.strip().splitlines():
        gpus.append(dict(zip(fields, [v.strip() for v in line.split(",")])))
    return {"gpus": gpus}


# ----------------------------------------------------------------------------------------------------

SECTIONS = ("gemm", "membw", "launch", "attention", "nccl")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for the CSVs and device.json")
    ap.add_argument("--quick", action="store_true", help="a short sweep (seconds), for smoke tests")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {list(SECTIONS)}")
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))
        print("measure_device: no CUDA device, running tiny CPU sizes (for testing the script only)",
              file=sys.stderr)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = device_info(device)
    info["quick"] = args.quick
    timer = Timer(device)
    timings = {}

    if "gemm" in only:
        t = time.perf_counter()
        rows, ginfo = measure_gemm(device, timer, args.quick)
        info.update(ginfo)
        write_csv(out / "gemm.csv", ["m", "n", "k", "dtype", "time_s", "tflops", "shape_class", "label", "reps"],
                  rows)
        timings["gemm"] = time.perf_counter() - t
    if "membw" in only:
        t = time.perf_counter()
        write_csv(out / "membw.csv", ["op", "size_bytes", "bytes_moved", "time_s", "gb_s", "reps"],
                  measure_membw(device, timer, args.quick))
        timings["membw"] = time.perf_counter() - t
    if "launch" in only:
        t = time.perf_counter()
        write_csv(out / "launch.csv", ["metric", "op", "value_us", "method"], measure_launch(device, args.quick))
        timings["launch"] = time.perf_counter() - t
    if "attention" in only:
        t = time.perf_counter()
        write_csv(out / "attention.csv", ["batch", "heads", "seq", "head_dim", "causal", "backend", "fwd_s",
                                          "fwd_bwd_s", "bwd_s", "fwd_flops", "fwd_tflops", "fwd_bwd_tflops"],
                  measure_attention(device, timer, args.quick))
        timings["attention"] = time.perf_counter() - t
    if "nccl" in only and device.type == "cuda":
        t = time.perf_counter()
        try:
            rows = measure_nccl(device, args.quick)
        except Exception as e:  # noqa: BLE001 - NCCL problems must not lose the other measurements
            print(f"nccl: failed ({type(e).__name__}: {e}); nccl.csv not written", file=sys.stderr)
            rows = []
        if rows:
            write_csv(out / "nccl.csv", ["op", "world_size", "size_bytes", "time_s", "host_wall_s"], rows)
        timings["nccl"] = time.perf_counter() - t

    if device.type == "cuda":
        info["nvidia_smi_end"] = _nvidia_smi()  # clocks and temperature right after the sweeps
    info["section_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    info["total_seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "device.json", json.dumps(info, indent=2, default=str) + "\n")
    print(f"wrote {out / 'device.json'}; total {info['total_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
