"""Launch a plan's ranks and gather what they measured: N fresh processes (torch.multiprocessing, spawn),
rendezvous over TCP on 127.0.0.1, NCCL with one GPU per rank when there are enough GPUs and gloo on the
CPU otherwise. Each rank runs runner.run_job for every job and leaves its figures in a JSON file; a failure
on any rank becomes one line (BadInput or RunFailed) in the parent. summarize() reduces the ranks' figures
to one job's: the slowest rank per step, the median after warm-up, the highest peak memory."""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from planner.backends.torch.runner import MMAP_THRESHOLD_BYTES, Job, RunFailed, RunOptions, run_job
from planner.core.errors import BadInput


def choose_device(device: str, nproc: int) -> str:
    """'cuda' when asked for or (auto) when there is one GPU per rank; 'cpu' otherwise."""
    if device not in ("auto", "cpu", "cuda"):
        raise BadInput(f"device must be auto, cpu or cuda, got {device!r}")
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda" and have < nproc:
        raise BadInput(f"--device cuda needs one GPU per process: {nproc} processes, {have} GPUs")
    if device == "auto":
        return "cuda" if have >= nproc else "cpu"
    return device


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _preload() -> None:
    """Import every module a job may use before the first job measures its memory baseline: a module's
    code objects are anonymous memory that would otherwise count as that job's peak."""
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.optim  # noqa: F401
    import torch.distributed.pipelining  # noqa: F401
    import torch.distributed.tensor.parallel  # noqa: F401
    import torch.nn.parallel  # noqa: F401
    import torch.utils.checkpoint  # noqa: F401


def _worker(rank: int, world: int, port: int, jobs: list[Job], opts: RunOptions, device_type: str,
            outdir: str) -> None:
    """One rank: join the group, run every job, write rank{r}.json (or rank{r}.error.json and exit 1)."""
    import torch.distributed as dist

    out = Path(outdir)
    try:
        torch.set_num_threads(opts.threads)
        if device_type == "cuda":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=_dt.timedelta(seconds=opts.timeout_s),
                                **({"device_id": device} if device_type == "cuda" else {}))
        _preload()
        results = [run_job(job, opts, device) for job in jobs]
        dist.barrier()
        dist.destroy_process_group()
        _write_json(out / f"rank{rank}.json", results)
    except BaseException as e:  # noqa: BLE001 - every failure becomes one line for the parent
        if os.environ.get("PLANNER_BACKEND_DEBUG"):  # the full traceback, for developing the backend
            import traceback

            traceback.print_exc()
        kind = "BadInput" if isinstance(e, BadInput) else "error"
        where = ""
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" ({Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})"
        _write_json(out / f"rank{rank}.error.json",
                    {"kind": kind, "message": _one_line(e) + where})
        sys.stdout.flush()
        os._exit(1)  # skip interpreter teardown: peers may be blocked in a collective with us


def _one_line(e: BaseException) -> str:
    """The first non-empty line of an exception (torch's pipelining errors start with a blank line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@contextlib.contextmanager
def child_env(opts: RunOptions):
    """Environment the spawned ranks start with: one OpenMP thread each, and glibc returning freed
    tensors to the OS at once (see the module docstring on CPU memory)."""
    want = {"OMP_NUM_THREADS": str(opts.threads), "MKL_NUM_THREADS": str(opts.threads),
            "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES), "MALLOC_TRIM_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}
    old = {k: os.environ.get(k) for k in want}
    os.environ.update(want)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch(jobs: list[Job], nproc: int, opts: RunOptions = RunOptions()) -> list[dict]:
    """Run `jobs` one after the other on `nproc` fresh processes; one summary per job (see summarize)."""
    import torch.multiprocessing as mp

    from planner.backends.torch.model import spec_from_graph
    from planner.backends.torch.parallel import check_runnable

    if nproc < 1:
        raise BadInput(f"--nproc must be a positive integer, got {nproc}")
    if opts.steps <= opts.warmup:
        raise BadInput(f"--steps ({opts.steps}) must exceed the {opts.warmup} warm-up steps")
    for job in jobs:
        check_runnable(spec_from_graph(job.graph), job.workload, job.plan, nproc)
    device_type = choose_device(opts.device, nproc)
    with tempfile.TemporaryDirectory(prefix="planner-run-") as outdir:
        port = free_port()
        with child_env(opts):
            ctx = mp.start_processes(_worker, args=(nproc, port, jobs, opts, device_type, outdir), nprocs=nproc,
                                     start_method="spawn", join=False)
        deadline = time.monotonic() + opts.timeout_s * max(1, len(jobs))
        failure = None
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise RunFailed(f"the run did not finish within {opts.timeout_s * len(jobs):.0f} s")
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
            failure = e
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        errors = sorted(Path(outdir).glob("rank*.error.json"))
        if errors:
            err = json.loads(errors[0].read_text())
            rank = errors[0].name.split(".")[0]
            cls = BadInput if err["kind"] == "BadInput" else RunFailed
            raise cls(f"{rank}: {err['message']}")
        if failure is not None:
            raise RunFailed(f"a rank died: {str(failure).splitlines()[0]}")
        per_rank = [json.loads((Path(outdir) / f"rank{r}.json").read_text()) for r in range(nproc)]
    return [summarize([per_rank[r][j] for r in range(nproc)], opts, device_type) for j in range(len(jobs))]


def summarize(ranks: list[dict], opts: RunOptions, device_type: str) -> dict:
    """One job's figures over its ranks: the slowest rank's time per step, median after warm-up."""
    steps = [max(r["step_times_s"][i] for r in ranks) for i in range(opts.steps)]
    timed = steps[opts.warmup:]
    return {
        "losses": ranks[0]["losses"],
        "step_times_s": steps,
        "measured_step_time_s": statistics.median(timed),
        "measured_step_time_min_s": min(timed),
        "measured_peak_memory_bytes": max(r["peak_memory_bytes"] for r in ranks),
        "peak_memory_bytes_per_rank": [r["peak_memory_bytes"] for r in ranks],
        "model_state_bytes_per_rank": [r["model_state_bytes"] for r in ranks],
        "memory_method": ranks[0]["memory_method"],
        # CPU: the resident-set peak beside the tensor count, for reference (memory.py); None on CUDA
        "measured_rss_peak_bytes": max((r["rss_peak_bytes"] for r in ranks if r.get("rss_peak_bytes") is not None),
                                       default=None),
        "device": device_type,
        "nproc": len(ranks),
        "options": asdict(opts),
    }
