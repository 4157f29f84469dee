"""`validate PLAN.json --backend torch`: run a saved plan for real and put the measurement beside the
planner's prediction for the same model, cluster, workload and plan.

The prediction is `estimate()` for the workload as executed: on the CPU the run computes in fp32 (see
runner.executed_dtype), so the prediction is made for fp32 too, or it would compare 2-byte predictions with
4-byte tensors. When more processes than cores share this machine (4 ranks on 2 cores), each rank gets
cores/nproc of a core: the prediction divides the device's FLOP/s and memory bandwidth by the same factor
and multiplies its host costs per op, layer and tensor-parallel sublayer by its inverse, since on the CPU
the host is the device (time-sharing is not in the cost model, which assumes one device per rank).

Memory is compared two ways: the planner's peak (`predicted_peak_memory_bytes`, the contract figure, which
includes its allocator and CUDA-context allowance) and its tensor bytes alone (peak minus that allowance,
what torch's counters see: planner/backends/torch/memory.py), which gives `memory_error_pct`.
"""
from __future__ import annotations

import os

from planner import catalog
from planner.backends.torch.launch import choose_device, launch
from planner.backends.torch.runner import Job, RunOptions, executed_dtype
from planner.core.errors import BadInput, Infeasible
from planner.core.plan import PlanFile


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def shared_core_cluster(cluster, nproc: int, device_type: str):
    """The cluster as `nproc` CPU ranks see it when they outnumber the cores: each device's FLOP/s and
    memory bandwidth times cores/nproc. Unchanged on CUDA or when every rank has a core."""
    cores = usable_cores()
    if device_type != "cpu" or nproc <= cores:
        return cluster, 1.0
    share = cores / nproc
    devices = []
    for ref in cluster.devices:
        d = ref.device
        e = d.efficiency
        host = {k: getattr(e, k) / share for k in ("kernel_overhead_us", "layer_overhead_us", "host_dispatch_us",
                                                    "tp_dispatch_us", "sp_dispatch_us", "tp_dispatch_ns_per_byte",
                                                    "shard_copy_ns_per_byte", "grad_accum_ns_per_param")
                if getattr(e, k) is not None}
        slower = d.model_copy(update={"peak_tflops": {k: v * share for k, v in d.peak_tflops.items()},
                                      "memory_bandwidth_gb_s": d.memory_bandwidth_gb_s * share,
                                      "efficiency": e.model_copy(update=host)})
        devices.append(ref.model_copy(update={"device": slower}))
    return cluster.model_copy(update={"devices": devices}), share


def predict(pf: PlanFile, nproc: int, device_type: str):
    """(Estimate, executed workload, core share) for the plan as this backend will run it."""
    from planner.cost.estimate import estimate
    from planner.importers import load_model

    graph = load_model(pf.model)
    workload = pf.workload.model_copy(update={"dtype": executed_dtype(device_type, pf.workload.dtype)})
    cluster = catalog.load_cluster(pf.cluster, pf.nodes)
    cluster, share = shared_core_cluster(cluster, nproc, device_type)
    est = estimate(graph, cluster, workload, pf.plan)
    bubble = est.breakdown.get("pipeline_bubble_s", 0.0)
    if share < 1 and bubble:
        # With more ranks than cores, the ranks of the stages that fill and drain the pipeline run while the
        # others idle, so they get whole cores: the bubble, priced above at the shared speed, takes
        # `share` of that time (the steady state keeps every rank busy at the shared speed).
        step = est.step_time_s - bubble * (1 - share)
        est = est.model_copy(update={"step_time_s": step, "tokens_per_s": est.tokens_per_s * est.step_time_s / step,
                                     "breakdown": {**est.breakdown, "pipeline_bubble_s": bubble * share}})
    return graph, workload, est, share


# Processes one validate run may start: 4 per usable core (more ranks than cores already time-share, see
# shared_core_cluster; past 4x each rank gets under a quarter core and the run measures the scheduler) and
# never more than 1024, as many as any single machine's GPUs and far past them.
PROCS_PER_CORE = 4
MAX_NPROC = 1024


def max_nproc() -> int:
    return min(PROCS_PER_CORE * usable_cores(), MAX_NPROC)


def check_nproc(nproc: int | None, devices: int) -> int:
    """The process count to run a plan of `devices` devices with: --nproc, or the plan's own; BadInput when
    it is past max_nproc() or is not the plan's world size (one rank per device)."""
    cap = max_nproc()
    if nproc is not None and nproc > cap:
        raise BadInput(f"--nproc {nproc} is past this machine's cap of {cap} processes ({PROCS_PER_CORE} per core on "
                       f"{usable_cores()} cores, {MAX_NPROC} at most)")
    if nproc is not None and nproc != devices:
        raise BadInput(f"the plan uses dp*tp*pp*cp = {devices} devices; --nproc {nproc} cannot run it "
                       f"(use --nproc {devices})")
    if devices > cap:
        raise BadInput(f"the plan uses dp*tp*pp*cp = {devices} devices, one process each, past this machine's cap "
                       f"of {cap} processes ({PROCS_PER_CORE} per core on {usable_cores()} cores, {MAX_NPROC} at "
                       "most); validate a plan for fewer devices")
    return devices


def memory_per_process(device_type: str, nproc: int) -> tuple[float, str]:
    """(bytes one rank may use, what they are): on CUDA the free memory of the emptiest-used GPU (rank i on GPU
    i); on the CPU, where every rank shares the host, MemAvailable (Linux /proc/meminfo, else free physical
    pages) over nproc."""
    if device_type == "cuda":
        import torch

        free = min(torch.cuda.mem_get_info(i)[0] for i in range(nproc))
        return float(free), f"{free / 1e9:.1f} GB free on the fullest of GPUs 0..{nproc - 1}"
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024  # the kernel reports kB (KiB)
    except (OSError, ValueError, IndexError):
        avail = None
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):  # pragma: no cover - no way to tell: do not refuse
            return float("inf"), "unknown"
    return avail / nproc, f"{avail / 1e9:.1f} GB available on this machine for {nproc} processes"


def check_memory(est, device_type: str, nproc: int, force: bool) -> None:
    """Infeasible (exit 1) when the plan's own predicted peak per rank exceeds what a rank has here: a run
    would swap or be killed by the OOM killer (105 GB per rank on a 13 GB machine). --force runs it anyway."""
    if force:
        return
    per_proc, what = memory_per_process(device_type, nproc)
    need = est.peak_memory_bytes
    if need > per_proc:
        raise Infeasible(f"the plan's predicted peak is {need / 1e9:.1f} GB per process, this machine has "
                         f"{per_proc / 1e9:.1f} GB per process ({what}); validate a smaller plan or give --force")


def validate(pf: PlanFile, nproc: int | None = None, opts: RunOptions = RunOptions(), force: bool = False) -> dict:
    nproc = check_nproc(nproc, pf.plan.devices)
    device_type = choose_device(opts.device, nproc)
    graph, workload, est, share = predict(pf, nproc, device_type)
    check_memory(est, device_type, nproc, force)
    res = launch([Job(graph, workload, pf.plan)], nproc, opts)[0]
    measured_t = res["measured_step_time_s"]
    overhead = est.memory.get("overhead_bytes", 0.0)
    tensor_bytes = est.peak_memory_bytes - overhead
    measured_mem = res["measured_peak_memory_bytes"]
    states = res["model_state_bytes_per_rank"]
    measured_states = max(s["weights"] + s["gradients"] + s["optimizer"] for s in states)
    predicted_states = sum(est.memory.get(k, 0.0) for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes"))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "model": pf.model, "cluster": pf.cluster, "nodes": pf.nodes, "plan": pf.plan.model_dump(),
        "workload": workload.model_dump(), "backend": "torch", "device": device_type, "nproc": nproc,
        "core_share": share,
        "measured_step_time_s": measured_t,
        "predicted_step_time_s": est.step_time_s,
        "error_pct": 100.0 * (est.step_time_s - measured_t) / measured_t,
        "measured_peak_memory_bytes": measured_mem,
        "predicted_peak_memory_bytes": est.peak_memory_bytes,
        "predicted_tensor_memory_bytes": tensor_bytes,
        "memory_error_pct": 100.0 * (tensor_bytes - measured_mem) / measured_mem if measured_mem > 0 else None,
        "measured_model_state_bytes": measured_states,
        "predicted_model_state_bytes": predicted_states,
        "memory_method": res["memory_method"],
        "measured_rss_peak_bytes": res.get("measured_rss_peak_bytes"),
        "losses": res["losses"],
        "step_times_s": res["step_times_s"],
        "measured_step_time_min_s": res["measured_step_time_min_s"],
        "peak_memory_bytes_per_rank": res["peak_memory_bytes_per_rank"],
        "predicted_breakdown": est.breakdown,
        "predicted_why": est.why,
        "load_average_1m": load[0],
        "steps": opts.steps, "warmup": opts.warmup,
    }


def report_text(r: dict) -> str:
    p = r["plan"]
    head = (f"{r['model']} on {r['cluster']}: {r['nproc']} processes, {r['device']} "
            f"({'nccl' if r['device'] == 'cuda' else 'gloo'}), {r['workload']['dtype']}, "
            f"gbs {r['workload']['global_batch']} seq {r['workload']['seq_len']}; dp{p['dp']} tp{p['tp']} "
            f"pp{p['pp']} vpp{p['vpp']} zero{p['zero']}{' sp' if p['sp'] else ''} mbs{p['mbs']} "
            f"recompute {p['recompute']} {p['schedule']}")
    mem_err = r["memory_error_pct"]
    lines = [head,
             f"{'':<24}{'measured':>14}{'predicted':>14}{'error':>9}",
             f"{'step time (median) s':<24}{r['measured_step_time_s']:>14.4f}{r['predicted_step_time_s']:>14.4f}"
             f"{r['error_pct']:>8.1f}%",
             f"{'peak memory MB':<24}{r['measured_peak_memory_bytes'] / 1e6:>14.1f}"
             f"{r['predicted_tensor_memory_bytes'] / 1e6:>14.1f}"
             + (f"{mem_err:>8.1f}%" if mem_err is not None else f"{'-':>9}")
             + f"   (planner peak with its allocator allowance: {r['predicted_peak_memory_bytes'] / 1e6:.1f} MB)",
             f"{'model states MB':<24}{r['measured_model_state_bytes'] / 1e6:>14.1f}"
             f"{r['predicted_model_state_bytes'] / 1e6:>14.1f}",
             f"losses: {' '.join(f'{x:.4f}' for x in r['losses'])}",
             f"memory: {r['memory_method']}; {r['steps']} steps, {r['warmup']} warm-up; "
             f"load average {r['load_average_1m']:.2f}"
             + (f"; {r['nproc']} ranks share {usable_cores()} cores (prediction scaled by {r['core_share']:.2f})"
                if r["core_share"] < 1 else "")]
    return "\n".join(lines)
