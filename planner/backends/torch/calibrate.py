"""`calibrate --backend torch`: measure this machine and write it into the user's data folder as the cluster
preset `local` (docs/ARCHITECTURE.md#contracts): a device profile for one rank (one CPU core running one torch thread, or
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
  reproduce the measured times (least squares on log time, a grid refined by Nelder-Mead);
  `achievable_fraction` 1.0.
- one of the backend's own decoder blocks split tensor-parallel by DTensor (parallel.apply_tp), with and
  without sequence parallelism, at 64, 256 and 1024 tokens, against the plain block with one rank's share
  of heads and FFN, in paired repetitions: what remains after the four all-reduces' link time gives
  `tp_dispatch_us`, `sp_dispatch_us` (per sublayer and pass) and `tp_dispatch_ns_per_byte` (per byte of
  the sublayer's activation), fitted jointly by non-negative least squares.
- on the CPU, the same collectives inside a step-like loop (planner/backends/torch/calibrate_step.py): the
  link is fitted to these in-step times, not to the tight loop; an async all-reduce under GEMMs gives
  `comm_overlap`, and an FSDP2 stack against the plain one gives `shard_copy_ns_per_byte`. Each of these
  is a small difference of two noisy times, so they are taken in paired rounds (the loop with and without
  the collective back to back, the median of the differences: calibrate_step.median_paired_s): separate
  medians had put a 16 KiB all-reduce at 0.01 ms and a 4 KiB one at 4.2 ms in the same calibration.
- AdamW's step (foreach=False, the runner's optimizer) is timed as a check of the optimizer term (32 bytes
  per parameter at the memory bandwidth), not fitted.

Every device figure is measured in a process started the way the runner starts a rank (spawned, one
thread, the runner's malloc settings: launch.child_env), so the profile describes the stack the plans run
on, not the parent CLI process.

The profile is written to {devices,links,nodes}/local.yaml and calibration.json (this whole record: date,
machine, every measurement) in the user's data folder (planner.userdata.calibration_dir(), e.g.
~/.local/share/parallel-planner/calibration), or under --out-dir DIR (created; `--cluster DIR` plans on it),
each file atomically; never into the installed package or the checkout. A full calibration is replaced only
with --force; a --quick one (a first look) is replaced by the next calibration without it.

The measurements live in calibrate_measure.py, the fits in calibrate_fit.py; this module runs them and writes
the profile and the report. Every name they define stays importable from here.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time as _time
from pathlib import Path

import torch

from planner import userdata
from planner.backends.torch import calibrate_progress

# Re-exported, each the same object as in its module: every name this module had stays importable from it.
from planner.backends.torch.calibrate_fit import (
    fit_gemm,
    fit_layer_overhead_s,
    fit_link,
    fit_shard_copy,
    fit_tp_dispatch,
    one_device_cluster,  # noqa: F401
)
from planner.backends.torch.calibrate_measure import (  # noqa: F401
    collective_sizes,
    collective_worker,
    decoder_step_case,
    device_worker,
    gemm_row,
    gemm_shapes,
    measure_adamw,
    measure_attention,
    measure_collectives,
    measure_decoder_step,
    measure_device,
    measure_dispatch,
    measure_gemm,
    measure_memory_bandwidth,
    median_time_s,
    spawned,
    tp_block_times,
)
from planner.core.errors import BadInput

DEVICE_NAME, GPU_DEVICE_NAME = userdata.LOCAL_DEVICES  # "local-cpu", "local-gpu"
LINK_NAME = userdata.LOCAL_LINK  # "local-gloo"
NODE_NAME = userdata.LOCAL_NODE  # "local"


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
    """A written file as the record keeps it: relative to the working directory when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _refuse_package_folder(root: Path) -> None:
    """Never write into the installed package or the catalog it ships: a calibration there would become
    a shipped `local`, every user's silent default."""
    import planner
    from planner import catalog

    where = root.resolve()
    for inside in (Path(planner.__file__).resolve().parent, catalog.profiles_dir().resolve()):
        if where == inside or inside in where.parents:
            raise BadInput(f"--out-dir {root}: inside the planner's own files ({inside}); give a folder of your "
                           f"own, or leave --out-dir out to write to {userdata.calibration_dir()}")


def _previous_was_quick(root: Path) -> bool:
    """Whether the calibration already in root is a --quick one (calibration.json says so)."""
    from planner.files import read_input

    record = root / userdata.CALIBRATION_RECORD
    try:
        return json.loads(read_input(record, "calibration record")).get("quick") is True
    except (BadInput, ValueError, AttributeError):
        return False


def calibrate(nproc: int | None = None, quick: bool = False, out_dir: str | None = None, force: bool = False,
              dry_run: bool = False, progress: bool = True) -> dict:
    from planner import catalog

    root = Path(out_dir).expanduser() if out_dir else userdata.calibration_dir()
    flag = "--out-dir" if out_dir else "the calibration folder"
    targets = {s: root / s / f"{NODE_NAME}.yaml" for s in userdata.SECTIONS}
    if not dry_run:
        _refuse_package_folder(root)
        userdata.make_dir(root, flag)
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing and not force and not _previous_was_quick(root):
            raise BadInput(f"{existing[0]} exists (a previous calibration); use --force to replace it, or "
                           "--out-dir DIR to write elsewhere")
    machine = machine_description()
    cuda = torch.cuda.is_available()
    if nproc is None:
        nproc = max(2, machine.get("gpus", 0) if cuda else machine["cores"])
    dtype_name = "bf16" if cuda else "fp32"
    date = _dt.date.today().isoformat()
    t0 = _time.time() if progress else None
    if progress:
        calibrate_progress.announce(quick, cuda, nproc)

    meas = measure_device(quick, 1 if cuda else min(nproc, machine["cores"]), t0=t0)
    gemm, membw, dispatch, attn = meas["gemm"], meas["memory_bandwidth"], meas["dispatch"], meas["attention"]
    peak, half = fit_gemm(gemm)
    coll = measure_collectives(nproc, quick, tp_block=not cuda, t0=t0)
    colls, tp_block, step = coll["rows"], coll["tp_block"], coll.get("step")
    # the link as a step sees it (calibrate_step); the tight-loop figures stay in the record
    bw, lat, link_rms = fit_link(step["in_step"] if step else colls, nproc)
    tp_fit = fit_tp_dispatch(tp_block, bw, lat) if tp_block else None
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
            # the runner accumulates gradients as eager autograd does (before layer_overhead_us is fitted)
            "grad_accum_ns_per_param": round(meas["grad_accum"]["s_per_param"] * 1e9, 4),
            "source": source,
        },
    }
    # the largest block size without sequence parallelism, quoted in the notes
    big = max((r for r in tp_block["rows"] if not r["sp"]), key=lambda r: r["tokens"]) if tp_block else None
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
        + (f"tp_dispatch_us, sp_dispatch_us and tp_dispatch_ns_per_byte = per sublayer and pass, fitted jointly "
           f"(non-negative least squares on relative error, rms {tp_fit['rms_rel_error'] * 100:.1f}%) to what one of "
           f"the backend's blocks (hidden {tp_block['hidden']}, {tp_block['heads']} heads, ffn {tp_block['ffn_hidden']}) "
           f"split tp{tp_block['tp']} by DTensor, with and without sequence parallelism, at "
           f"{'/'.join(str(r['tokens']) for r in tp_block['rows'] if not r['sp'])} tokens takes beyond the plain block "
           f"with one rank's share of heads and FFN (paired repetitions; at the largest size "
           f"{big['dtensor_fwd_bwd_s'] * 1e3:.1f} against {big['plain_fwd_bwd_s'] * 1e3:.1f} ms without sp), "
           f"less four all-reduces on the link; "
           if tp_fit else "")
        + (f"comm_overlap = (T_gemms + T_allreduce - T_both) / min with a {step['overlap']['bytes'] // 2**20} MiB "
           f"async all-reduce under GEMMs ({step['overlap']['compute_s'] * 1e3:.1f} + {step['overlap']['comm_s'] * 1e3:.1f}"
           f" ms alone, {step['overlap']['both_s'] * 1e3:.1f} ms together); shard_copy_ns_per_byte = what an FSDP2 "
           f"stack of {step['fsdp']['params']:,} parameters takes beyond the plain stack "
           f"({step['fsdp']['fsdp_fwd_bwd_s'] * 1e3:.1f} vs {step['fsdp']['plain_fwd_bwd_s'] * 1e3:.1f} ms) and its "
           f"gathers and reduce-scatter on the link ({copy_fit['link_s'] * 1e3:.1f} ms), per byte copied; "
           if step else "")
        + f"grad_accum_ns_per_param = grad.add_(new) over {meas['grad_accum']['params']:,} fp32 parameters; "
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
                         "tp_block": tp_block, "tp_dispatch_fit": tp_fit, "adamw": adamw,
                         "grad_accum": meas["grad_accum"],
                         "in_step": step, "shard_copy_fit": copy_fit},
        "written": [],
    }
    if not dry_run:
        import yaml

        from planner.files import write_atomic

        command = "planner calibrate --backend torch" + (" --quick" if quick else "")
        for section, fields in (("devices", device_fields), ("links", link_fields), ("nodes", node_fields)):
            path = targets[section]
            userdata.make_dir(path.parent, flag)
            text = (f"# Written by `{command}` on {date}; re-run it to re-measure.\n# Machine: {where}\n"
                    + yaml.safe_dump(fields, sort_keys=False, width=110))
            write_atomic(path, text)
            result["written"].append(_shown(path))
        # the whole record last: date, machine, every measurement (and whether it was --quick)
        record = root / userdata.CALIBRATION_RECORD
        result["written"].append(_shown(record))
        result["folder"] = str(root.resolve())
        write_atomic(record, json.dumps(result, indent=2, default=str) + "\n")
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
             f"({r['nproc']} processes)",
             f"  framework: tp dispatch {e['tp_dispatch_us']:.0f} us (sp {e['sp_dispatch_us']:.0f} us) + "
             f"{e['tp_dispatch_ns_per_byte']:.2f} ns/B, "
             f"comm overlap {e['comm_overlap']:.2f}, FSDP copies {e['shard_copy_ns_per_byte']:.2f} ns/B, "
             f"gradient accumulation {e['grad_accum_ns_per_param']:.2f} ns/param"]
    if r["written"]:
        lines.append("  wrote " + ", ".join(r["written"]))
        default = Path(r["folder"]) == userdata.calibration_dir().resolve()
        cluster = "local" if default else r["folder"]
        lines.append(f"  use it: planner plan --cluster {cluster} ... / planner estimate --cluster {cluster} ...")
        if r["quick"]:
            again = "" if default else f" --out-dir {r['folder']}"
            lines.append(f"  then the full calibration: planner calibrate --backend torch{again} (replaces this quick one)")
    else:
        lines.append("  (dry run: nothing written)")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `planner calibrate --backend torch`")
