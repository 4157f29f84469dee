"""Run plans for real on N local processes and measure them: losses, step time, peak memory per rank.

Launch: torch.multiprocessing with the spawn start method (one fresh interpreter per rank), rendezvous over
TCP on 127.0.0.1. Backend: NCCL with one GPU per rank when CUDA has at least N devices, gloo on the CPU
otherwise (or as `device` says). The same code runs world size 1..N on either: nothing here knows which.

Several jobs (plans) can run one after the other in one group of processes, each with its own device mesh:
the loss-equivalence tests pay the process start-up (importing torch) once for many plans. The processes
are started and their results gathered in launch.py; this module is what one rank runs.

Data: synthetic token ids, a function of (seed, step) only, so every plan and the single-process reference
see the same global batch; data-parallel rank d takes rows [d*B/dp, (d+1)*B/dp), split into micro-batches
of `mbs` rows. Loss: mean cross-entropy over the global batch (each micro-batch's mean, averaged), which is
what a single process computes on the whole batch.

Measurements:
- step time: each step starts after a barrier; a rank's step ends after its optimizer step (and a CUDA
  synchronize); the step's time is the slowest rank's; reported as the median after `warmup` steps.
- peak memory, CUDA: torch.cuda.max_memory_allocated (torch's allocator counter), reset after the model is
  built and sharded, so it holds the states and activations of the timed steps, no CUDA context.
- peak memory, CPU: torch keeps no running counter of its CPU allocations, but its profiler records each
  one: one more step after the timed ones runs under it, and its peak is the tensors live at its start plus
  the highest running sum of its allocations less frees (planner/backends/torch/memory.py). The resident-set
  peak of the timed steps is kept beside it for reference (glibc is told to mmap every allocation above
  64 KiB, so a freed tensor leaves the resident set at once).
- model-state bytes: the exact bytes of this rank's local parameters, gradients and optimizer states (sums of
  tensor sizes; DTensor and FSDP shards counted locally), checked against the planner's memory terms.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from planner.backends.torch import memory as mem
from planner.core.errors import PlannerError
from planner.core.model import ModelGraph
from planner.core.plan import ParallelPlan, Workload
from planner.files import write_atomic

MMAP_THRESHOLD_BYTES = 65536


class RunFailed(PlannerError):
    """A rank failed while running a valid plan (exit status 1, as for an infeasible request)."""

    exit_code = 1


@dataclass(frozen=True)
class RunOptions:
    steps: int = 5
    warmup: int = 2
    seed: int = 0
    lr: float = 1e-3
    device: str = "auto"  # auto, cpu or cuda
    threads: int = 1  # torch intra-op threads per process
    timeout_s: float = 900.0


@dataclass(frozen=True)
class Job:
    graph: ModelGraph
    workload: Workload
    plan: ParallelPlan


# ---------------------------------------------------------------------------------------------------
# data, loss, reference


def global_batch(step: int, seed: int, workload: Workload, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of one step: token ids of shape (global_batch, seq), labels shifted by one."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    toks = torch.randint(0, vocab, (workload.global_batch, workload.seq_len + 1), generator=gen)
    return toks[:, :-1].contiguous(), toks[:, 1:].contiguous()


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    # foreach=False: the same per-parameter update everywhere (plain tensors, DTensors, FSDP shards), so
    # a sharded run and the reference differ only by the order of floating-point sums.
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=False)


def train_single(graph: ModelGraph, workload: Workload, steps: int, seed: int = 0, lr: float = 1e-3) -> list[float]:
    """The reference: the same model, data and optimizer in this one process, whole batch at once."""
    from planner.backends.torch.model import build_decoder

    model = build_decoder(graph, init_seed=seed)
    opt = make_optimizer(model.parameters(), lr)
    losses = []
    for step in range(steps):
        x, y = global_batch(step, seed, workload, model.spec.vocab)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


# ---------------------------------------------------------------------------------------------------
# memory probes (Linux /proc; zeros elsewhere)


def _tensor_bytes(t) -> int:
    if t is None:
        return 0
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def _model_state_bytes(params, optimizer) -> dict:
    # `params` as given to the optimizer: DDP over tensor-parallel modules swaps the modules' own
    # parameters for local views, so the modules cannot be asked.
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer holds the local AdamW
    opt_bytes = sum(_tensor_bytes(v) for st in inner.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"weights": sum(_tensor_bytes(p) for p in params),
            "gradients": sum(_tensor_bytes(p.grad) for p in params),
            "optimizer": opt_bytes}


# ---------------------------------------------------------------------------------------------------
# one job on one rank


def _autocast(device: torch.device, dtype: str):
    if device.type == "cuda" and dtype in ("bf16", "fp16", "fp8"):
        return torch.autocast("cuda", dtype=torch.float16 if dtype == "fp16" else torch.bfloat16)
    return contextlib.nullcontext()


def executed_dtype(device_type: str, dtype: str) -> str:
    """What a run computes in: the plan's 16-bit dtype under autocast on CUDA (fp8 as bf16); fp32 on the
    CPU, where 16-bit matmuls are slow emulations that no one trains with."""
    if device_type == "cpu":
        return "fp32"
    return "bf16" if dtype == "fp8" else dtype


def run_job(job: Job, opts: RunOptions, device: torch.device) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from planner.backends.torch.model import spec_from_graph
    from planner.backends.torch.parallel import (
        apply_dp,
        apply_tp,
        set_recompute,
        stage_modules,
        uses_zero_redundancy_optimizer,
    )

    plan, workload = job.plan, job.workload
    spec = spec_from_graph(job.graph)
    rank = dist.get_rank()
    mesh = init_device_mesh(device.type, (plan.pp, plan.dp, plan.tp), mesh_dim_names=("pp", "dp", "tp"))
    pp_rank, dp_rank, tp_rank = (mesh.get_local_rank(d) for d in ("pp", "dp", "tp"))

    mem.trim()
    base_anon = mem.status_kb("RssAnon") * 1024
    # CPU: allocator events from before the build to the end of the warm-up step give the live set between
    # steps (planner/backends/torch/memory.py); the warm-up step is not timed, so its profiling costs nothing
    ledger = mem.start_allocation_profile() if device.type == "cpu" and opts.warmup >= 1 else None
    live_bytes = None
    torch.manual_seed(opts.seed)
    chunk_ids, modules = stage_modules(job.graph, plan, pp_rank, opts.seed)
    modules = [m.to(device) for m in modules]
    for m in modules:
        set_recompute(m, plan)
        if plan.tp > 1:
            # without a pipeline the loss runs vocabulary-parallel (Megatron's and torchtitan's way); a
            # pipeline's last stage hands the schedule plain, gathered logits
            apply_tp(m, mesh["tp"], plan.sp, loss_parallel=plan.pp == 1)
    modules = apply_dp(modules, plan, mesh["dp"], device)
    params = [p for m in modules for p in m.parameters()]
    if uses_zero_redundancy_optimizer(plan):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW,
                                      process_group=mesh["dp"].get_group(), lr=opts.lr, betas=(0.9, 0.95),
                                      eps=1e-8, weight_decay=0.0, foreach=False)
    else:
        opt = make_optimizer(params, opts.lr)

    m_micro = plan.microbatches(workload)
    local_rows = workload.global_batch // plan.dp
    n_chunks = plan.pp * plan.vpp
    first = 0 in chunk_ids
    last = (n_chunks - 1) in chunk_ids
    schedule = None
    if plan.pp > 1:
        schedule = _pipeline_schedule(modules, chunk_ids, n_chunks, plan, workload, spec, mesh, device, m_micro)

    def rank_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = global_batch(step, opts.seed, workload, spec.vocab)
        return (x[dp_rank * local_rows:(dp_rank + 1) * local_rows].to(device),
                y[dp_rank * local_rows:(dp_rank + 1) * local_rows].to(device))

    def train_step(x: torch.Tensor, y: torch.Tensor) -> float:
        with _autocast(device, workload.dtype):
            if schedule is not None:
                mb_losses: list = []
                # return_outputs=False: the last stage would otherwise keep every micro-batch's logits
                # until the step ends, to hand them back merged, which no trainer needs (Megatron keeps none)
                schedule.step(*([x] if first else []), target=y if last else None,
                              losses=mb_losses if last else None, return_outputs=False)
                step_loss = float(torch.stack([v.detach().float() for v in mb_losses]).mean()) if last else 0.0
            else:
                step_loss = _accumulate(modules[0], x, y, m_micro, plan)
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep gradient buffers: they are part of the measured peak
        return step_loss

    rss_reset = False
    times, losses = [], []
    for step in range(opts.steps):
        if step == min(1, opts.warmup):
            # The peak is taken from the second step on: the first one also pays one-time costs (lazy
            # initialisation, library pages) that are no part of training's steady state.
            mem.trim()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            rss_reset = mem.reset_peak_rss()
        x, y = rank_batch(step)
        dist.barrier()
        prof = _step_profiler(step == opts.steps - 1, rank)
        t0 = time.perf_counter()
        with prof:
            step_loss = train_step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if prof is not None and hasattr(prof, "key_averages"):
            _write_profile(prof, rank)
        # The loss of the step: the last stage's, once per data-parallel replica (tp rank 0), averaged.
        share = step_loss if (last and tp_rank == 0) else 0.0
        t = torch.tensor([share], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        losses.append(float(t) / plan.dp)
        if ledger is not None and step == 0:
            live_bytes = mem.stop_allocation_profile(ledger)
            ledger = None
    rss_peak = None
    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
        method = "torch.cuda.max_memory_allocated"
    else:
        rss_peak = mem.rss_peak_bytes(base_anon)
        # one more (untimed) step under the profiler's allocator events (planner/backends/torch/memory.py)
        x, y = rank_batch(opts.steps)
        dist.barrier()
        method = mem.PROFILER_METHOD if live_bytes is not None else mem.PROFILER_GC_METHOD
        if live_bytes is None:
            live_bytes = mem.live_tensor_bytes(params)
        peak = mem.profiled_step_peak_bytes(lambda: train_step(x, y), live_bytes)
        if not rss_reset:
            rss_peak = None  # VmHWM since process start would include the set-up
    states = _model_state_bytes(params, opt)
    out = {"rank": rank, "coords": {"pp": pp_rank, "dp": dp_rank, "tp": tp_rank}, "losses": losses,
           "step_times_s": times, "peak_memory_bytes": peak, "memory_method": method, "rss_peak_bytes": rss_peak,
           "model_state_bytes": states}
    del schedule, modules, opt, params
    mem.trim()
    return out


def _step_profiler(last_step: bool, rank: int):
    """torch.profiler over the last step when PLANNER_TORCH_PROFILE names a folder (a study's diagnosis:
    where a rank's time goes, by op); a no-op context otherwise."""
    folder = os.environ.get("PLANNER_TORCH_PROFILE")
    if not (folder and last_step):
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU])


def _write_profile(prof, rank: int) -> None:
    folder = Path(os.environ["PLANNER_TORCH_PROFILE"])
    folder.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    write_atomic(folder / f"rank{rank}.txt", table)


def _vocab_parallel_loss(plan: ParallelPlan):
    """torch's loss_parallel context for tp > 1 without a pipeline (parallel.apply_tp's sharded logits)."""
    if plan.tp > 1 and plan.pp == 1:
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()
    return contextlib.nullcontext()


def _accumulate(module, x, y, m_micro: int, plan: ParallelPlan) -> float:
    """Forward and backward of m micro-batches without a pipeline; the gradient reduction runs once, with
    the last micro-batch (DDP no_sync / FSDP2 set_requires_gradient_sync)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    mbs = plan.mbs
    total = 0.0
    for i in range(m_micro):
        is_last = i == m_micro - 1
        ctx = contextlib.nullcontext()
        if isinstance(module, DDP) and not is_last:
            ctx = module.no_sync()
        elif hasattr(module, "set_requires_gradient_sync"):
            module.set_requires_gradient_sync(is_last)
        with ctx, _vocab_parallel_loss(plan):
            loss = loss_fn(module(x[i * mbs:(i + 1) * mbs]), y[i * mbs:(i + 1) * mbs]) / m_micro
            loss.backward()
        loss = loss.detach()
        total += float(loss.full_tensor() if hasattr(loss, "full_tensor") else loss)
    return total


def _pipeline_schedule(modules, chunk_ids, n_chunks, plan, workload, spec, mesh, device, m_micro):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    mbs, seq = plan.mbs, workload.seq_len
    seq_local = seq // plan.tp if plan.sp else seq
    act = torch.float32
    logits = torch.bfloat16 if (device.type == "cuda" and workload.dtype in ("bf16", "fp8")) else \
        torch.float16 if (device.type == "cuda" and workload.dtype == "fp16") else torch.float32
    group = mesh["pp"].get_group()
    stages = []
    for c, mod in zip(chunk_ids, modules):
        # Example tensors give the stage its shapes and dtypes up front (no shape-inference pass over
        # DTensor modules); requires_grad marks the activations that carry gradients back.
        inp = torch.zeros(mbs, seq, dtype=torch.long, device=device) if c == 0 else \
            torch.empty(mbs, seq_local, spec.hidden, dtype=act, device=device, requires_grad=True)
        out = torch.empty(mbs, seq, spec.vocab, dtype=logits, device=device, requires_grad=True) \
            if c == n_chunks - 1 else \
            torch.empty(mbs, seq_local, spec.hidden, dtype=act, device=device, requires_grad=True)
        stages.append(PipelineStage(mod, c, n_chunks, device, input_args=(inp,), output_args=(out,),
                                    group=group))
    if plan.schedule == "interleaved-1f1b":
        return ScheduleInterleaved1F1B(stages, m_micro, loss_fn=loss_fn)
    cls = ScheduleGPipe if plan.schedule == "gpipe" else Schedule1F1B
    return cls(stages[0], m_micro, loss_fn=loss_fn)
