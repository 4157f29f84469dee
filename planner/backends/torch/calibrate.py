"""`calibrate --backend torch`: measure this machine and write it into the catalog as the cluster preset
`local` (DESIGN.md section 3): a device profile for one rank (one CPU core running one torch thread, or
one GPU), a link profile for the collectives between local processes, and a node type `local` holding one
device per core (per GPU with CUDA), so that `plan --cluster local` and `estimate --cluster local` predict
runs of this machine. Every number is `provenance: measured`, with the date and the machine.

What is measured, and which profile field it sets:
- GEMM time over square and transformer-training shapes, one thread: the best rate is `peak_tflops`
  (fp32 on the CPU, bf16 on a GPU), `efficiency.matmul` 1.0 (the peak is already what a GEMM achieves),
  and `gemm_half_dim` fitted to the shape effect (rate = peak * d / (d + half) with d the smallest dim).
- copy bandwidth of a large tensor: `memory_bandwidth_gb_s`, `efficiency.memory` 1.0.
- scaled_dot_product_attention, causal: `efficiency.attention` (its rate over the peak).
- eager dispatch of a tiny op: `kernel_overhead_us`. On a CPU the host *is* the device, so dispatch adds
  to compute rather than hiding under it: `host_dispatch_us` is 0 and the dispatch cost is charged per
  kernel through kernel_overhead_us.
- one training step of a small decoder in this process: whatever the terms above leave unexplained,
  per layer and pass, is `layer_overhead_us` (autograd, Python module calls, the optimizer's loop).
- gloo all-reduce, all-gather and send/recv between `nproc` local processes over message sizes: the link's
  `bandwidth_gb_s` and `latency_us` are fitted so that the planner's own formulas (planner.cost.comm)
  reproduce the measured times (least squares on log time); `achievable_fraction` 1.0.

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
    tokens = (256, 1024, 2048)
    widths = [(384, 384), (384, 1024), (1024, 384), (384, 1536), (1536, 384), (384, 16000), (16000, 384)]
    return squares + [(t, n, k) for t in tokens for n, k in widths]


def measure_gemm(device: torch.device, dtype: torch.dtype, quick: bool) -> list[dict]:
    rows = []
    for m, n, k in gemm_shapes(quick, device.type == "cuda"):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        t = _median_time_s(lambda: a @ b, reps=3 if quick else 5, min_time_s=0.0 if quick else 0.2)
        rows.append({"m": m, "n": n, "k": k, "time_s": t, "flops_per_s": 2.0 * m * n * k / t})
    return rows


def measure_memory_bandwidth(device: torch.device, quick: bool) -> dict:
    """Copy bandwidth (bytes read + written per second) of a tensor far larger than the caches."""
    nbytes = (32 if quick else 256) * 2**20
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = _median_time_s(lambda: dst.copy_(src), reps=3 if quick else 7)
    return {"bytes": nbytes, "time_s": t, "bytes_per_s": 2 * nbytes / t}


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


def _collective_worker(rank: int, world: int, port: int, sizes: list[int], reps: int, outdir: str) -> None:
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        rows = []
        for nbytes in sizes:
            x = torch.ones(nbytes // 4)
            out = torch.empty(nbytes // 4 * world)

            def timed(fn):
                fn()
                ts = []
                for _ in range(reps):
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                return statistics.median(ts)

            ar = timed(lambda: dist.all_reduce(x))
            # all-gather of nbytes in total (nbytes / world per rank), as comm.all_gather_time_s counts it
            part = torch.ones(nbytes // 4 // world)
            gathered = out[: part.numel() * world]
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            ag = timed(lambda: gather(gathered, part))

            def ping_pong():
                if rank == 0:
                    dist.send(x, 1)
                    dist.recv(x, 1)
                elif rank == 1:
                    dist.recv(x, 0)
                    dist.send(x, 0)

            pp = timed(ping_pong) / 2  # one way
            rows.append({"bytes": nbytes, "all_reduce_s": ar, "all_gather_s": ag, "p2p_s": pp})
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            Path(outdir, "collectives.json").write_text(json.dumps(rows))
    except BaseException as e:  # noqa: BLE001 - reported by the parent as one line
        Path(outdir, f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}".splitlines()[0])
        os._exit(1)


def measure_collectives(nproc: int, quick: bool) -> list[dict]:
    import torch.multiprocessing as mp

    from planner.backends.torch.runner import RunFailed, RunOptions, _child_env, _free_port

    sizes = collective_sizes(quick)
    with tempfile.TemporaryDirectory(prefix="planner-calibrate-") as outdir:
        with _child_env(RunOptions(threads=1)):
            ctx = mp.start_processes(_collective_worker, args=(nproc, _free_port(), sizes, 3 if quick else 15, outdir),
                                     nprocs=nproc, start_method="spawn", join=False)
        try:
            while not ctx.join(timeout=1.0):
                pass
        except (mp.ProcessExitedException, mp.ProcessRaisedException):
            errs = sorted(Path(outdir).glob("error*.txt"))
            msg = errs[0].read_text() if errs else "a process died"
            raise RunFailed(f"collective measurement failed: {msg}") from None
        return json.loads(Path(outdir, "collectives.json").read_text())


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


def fit_layer_overhead_s(device_fields: dict, quick: bool) -> dict:
    """Time one training step of a small decoder in this process and charge what the device profile does
    not explain to every layer's forward and backward passes (3 passes' worth per layer per micro-batch)."""
    from planner.backends.torch.model import tiny_graph
    from planner.backends.torch.runner import global_batch, loss_fn, make_optimizer
    from planner.backends.torch.model import build_decoder
    from planner.cost.estimate import estimate
    from planner.plan import ParallelPlan, Workload

    graph = tiny_graph("llama", layers=4, hidden=128, heads=4, kv_heads=2, ffn_hidden=256, vocab=512, max_seq=64)
    workload = Workload(global_batch=4, seq_len=64, dtype="fp32")
    model = build_decoder(graph)
    opt = make_optimizer(model.parameters(), 1e-3)
    x, y = global_batch(0, 0, workload, 512)

    def step():
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    measured = _median_time_s(step, reps=3 if quick else 9)
    cluster = _one_device_cluster(device_fields, layer_overhead_us=0.0)
    predicted = estimate(graph, cluster, workload, ParallelPlan(mbs=4)).step_time_s
    layers = len(graph.layers)
    overhead = max(0.0, (measured - predicted) / (3 * layers))
    return {"model_params": graph.params, "measured_step_s": measured, "predicted_without_s": predicted,
            "layers": layers, "layer_overhead_s": overhead}


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
    torch.set_num_threads(1)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    dtype_name = "bf16" if cuda else "fp32"
    date = _dt.date.today().isoformat()

    gemm = measure_gemm(device, dtype, quick)
    peak, half = fit_gemm(gemm)
    membw = measure_memory_bandwidth(device, quick)
    dispatch = measure_dispatch(device)
    attn = measure_attention(device, dtype, quick)
    colls = measure_collectives(nproc, quick)
    bw, lat, link_rms = fit_link(colls, nproc)

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
            "source": source,
        },
    }
    layer = fit_layer_overhead_s(device_fields, quick)
    device_fields["efficiency"]["layer_overhead_us"] = round(layer["layer_overhead_s"] * 1e6, 2)
    device_fields["notes"] = (
        f"One rank = one {'GPU' if cuda else 'CPU core running one torch thread'}. peak = 80th percentile of "
        f"{dtype_name} GEMM rates over {len(gemm)} shapes ({peak / 1e9:.1f} GFLOP/s); memory bandwidth = copy of "
        f"{membw['bytes'] // 2**20} MiB; memory_gb = {'the GPU' if cuda else 'RAM / cores'}; attention = causal "
        f"SDPA {attn['shape']}; kernel_overhead_us = eager dispatch of a tiny op; layer_overhead_us fitted on "
        f"a {layer['model_params']:,}-parameter decoder step ({layer['measured_step_s'] * 1e3:.1f} ms measured, "
        f"{layer['predicted_without_s'] * 1e3:.1f} ms explained by the other terms). Load average "
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
                  f"all-gather and send/recv of {colls[0]['bytes']}..{colls[-1]['bytes']} bytes; bandwidth and "
                  f"latency fitted to planner.cost.comm's formulas (rms error of log time {link_rms:.2f})."),
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
                         "collectives": colls, "layer_overhead_fit": layer, "link_fit_rms_log": link_rms},
        "written": [],
    }
    if not dry_run:
        import yaml

        for section, fields in (("devices", device_fields), ("links", link_fields), ("nodes", node_fields)):
            path = targets[section]
            path.parent.mkdir(parents=True, exist_ok=True)
            text = (f"# Written by `planner calibrate --backend torch` on {date}; re-run it to re-measure.\n"
                    + yaml.safe_dump(fields, sort_keys=False, width=110))
            _write_atomic(path, text)
            result["written"].append(str(path))
        catalog._hardware_catalog.cache_clear()
    return result


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
