#!/usr/bin/env python3
"""Validation study: run distinct plans of one model on this machine with the torch backend, predict each
with the cost model on the calibrated `local` cluster, and report the step-time MAPE, the Spearman rank
correlation of predicted vs measured step time, and the peak-memory error (docs/accuracy.md, "Local runs").

    python benchmarks/local_validation.py                      # the CPU study (2-4 processes, one thread each)
    python benchmarks/local_validation.py --suite gpu --cluster h100-x1 --model M   # one GPU, NCCL

Writes (atomically) CSV rows with the machine description, the load average at each run and the command,
plus a JSON summary beside it. Every row is `validate PLAN.json --backend torch` on a plan file written
here; the plan files are kept in the output folder so one row can be re-run with the CLI.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import shlex
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from planner.plan import ParallelPlan, PlanFile, StageAssignment, Workload  # noqa: E402

# The CPU study: tiny-llama-20m (21.7M parameters), 2 processes = the local node's 2 cores, 4 processes
# = two local "nodes" (two ranks per core; the prediction gives each rank half a core).
CPU_PLANS = {
    "dp2-mbs1": ParallelPlan(dp=2, mbs=1),
    "dp2-zero1-mbs2": ParallelPlan(dp=2, zero=1, mbs=2),
    "dp2-zero3-mbs4-full": ParallelPlan(dp=2, zero=3, mbs=4, recompute="full"),
    "tp2-mbs2": ParallelPlan(tp=2, mbs=2),
    "tp2-sp-mbs4-selective": ParallelPlan(tp=2, sp=True, mbs=4, recompute="selective"),
    "pp2-1f1b-mbs1": ParallelPlan(pp=2, mbs=1, schedule="1f1b"),
    "pp2-gpipe-mbs2": ParallelPlan(pp=2, mbs=2, schedule="gpipe"),
    "pp2-interleaved-vpp3-mbs2": ParallelPlan(pp=2, vpp=3, mbs=2, schedule="interleaved-1f1b"),
    "pp2-uneven-1f1b-mbs2-full": ParallelPlan(pp=2, mbs=2, schedule="1f1b", recompute="full", partition=[
        StageAssignment(layers=(0, 2)), StageAssignment(layers=(2, 6))]),
    "dp2xtp2-mbs2": ParallelPlan(dp=2, tp=2, mbs=2),
    "pp2xdp2-zero2-mbs1": ParallelPlan(pp=2, dp=2, zero=2, mbs=1, schedule="1f1b"),
}
GPU_PLANS = {
    "mbs1": ParallelPlan(mbs=1),
    "mbs2": ParallelPlan(mbs=2),
    "mbs4": ParallelPlan(mbs=4),
    "mbs2-full": ParallelPlan(mbs=2, recompute="full"),
    "mbs4-selective": ParallelPlan(mbs=4, recompute="selective"),
    "mbs8-full": ParallelPlan(mbs=8, recompute="full"),
}

COLUMNS = ["id", "model", "cluster", "nodes", "nproc", "device", "dp", "tp", "pp", "vpp", "zero", "sp", "mbs",
           "microbatches", "recompute", "schedule", "partition", "gbs", "seq", "dtype", "steps", "warmup",
           "measured_step_time_s", "measured_step_time_min_s", "predicted_step_time_s", "error_pct",
           "measured_peak_memory_bytes", "predicted_tensor_memory_bytes", "predicted_peak_memory_bytes",
           "memory_error_pct", "measured_model_state_bytes", "predicted_model_state_bytes", "first_loss",
           "last_loss", "core_share", "load_average_1m", "memory_method", "date", "machine", "command"]


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):
            idx = np.where(x == v)[0]
            r[idx] = r[idx].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def _atomic(path: Path, text: str) -> None:
    from planner.files import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--model", default="tiny-llama-20m")
    ap.add_argument("--cluster", default="local")
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", help="comma-separated plan ids")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/local/validation.csv"))
    args = ap.parse_args(argv)

    from planner.backends.torch.calibrate import machine_description
    from planner.backends.torch.runner import RunOptions
    from planner.backends.torch.validate import usable_cores, validate
    from planner.errors import PlannerError

    plans = CPU_PLANS if args.suite == "cpu" else GPU_PLANS
    if args.only:
        plans = {k: plans[k] for k in args.only.split(",")}
    out = Path(args.out)
    plan_dir = out.with_suffix("")
    plan_dir = plan_dir.parent / (plan_dir.name + "-plans")
    plan_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    machine_text = "; ".join(f"{k}={v}" for k, v in machine.items() if k != "load_average_1m")
    command = "python benchmarks/local_validation.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    date = _dt.date.today().isoformat()
    cores = usable_cores()
    rows = []
    for pid, plan in plans.items():
        nodes = None
        if args.suite == "cpu" and plan.devices > cores:
            nodes = -(-plan.devices // cores)
        workload = Workload(global_batch=args.gbs, seq_len=args.seq, dtype=args.dtype)
        pf = PlanFile(model=args.model, cluster=args.cluster, nodes=nodes, workload=workload, plan=plan)
        (plan_dir / f"{pid}.json").write_text(pf.model_dump_json(indent=2) + "\n")
        try:
            r = validate(pf, None, RunOptions(steps=args.steps, warmup=args.warmup, seed=0, threads=1))
        except PlannerError as e:
            print(f"{pid}: error: {e}", file=sys.stderr)
            continue
        p = r["plan"]
        row = {"id": pid, "model": args.model, "cluster": args.cluster, "nodes": nodes or "",
               "nproc": r["nproc"], "device": r["device"], **{k: p[k] for k in ("dp", "tp", "pp", "vpp", "zero", "sp",
                                                                                "mbs", "recompute", "schedule")},
               "microbatches": plan.microbatches(workload),
               "partition": "" if p["partition"] is None else
               " ".join(f"{a['layers'][0]}-{a['layers'][1]}" for a in p["partition"]),
               "gbs": args.gbs, "seq": args.seq, "dtype": r["workload"]["dtype"], "steps": args.steps,
               "warmup": args.warmup, "first_loss": r["losses"][0], "last_loss": r["losses"][-1],
               "date": date, "machine": machine_text, "command": command}
        for k in ("measured_step_time_s", "measured_step_time_min_s", "predicted_step_time_s", "error_pct",
                  "measured_peak_memory_bytes", "predicted_tensor_memory_bytes", "predicted_peak_memory_bytes",
                  "memory_error_pct", "measured_model_state_bytes", "predicted_model_state_bytes", "core_share",
                  "load_average_1m", "memory_method"):
            row[k] = r[k]
        rows.append(row)
        print(f"{pid:<28} measured {r['measured_step_time_s']:8.3f} s  predicted {r['predicted_step_time_s']:8.3f} s "
              f"({r['error_pct']:+6.1f}%)  memory {r['measured_peak_memory_bytes'] / 1e6:7.1f} MB vs "
              f"{r['predicted_tensor_memory_bytes'] / 1e6:7.1f} MB ({r['memory_error_pct']:+6.1f}%)  "
              f"load {r['load_average_1m']:.2f}", flush=True)
    if not rows:
        print("no plan ran", file=sys.stderr)
        return 1
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for row in rows:
        w.writerow(row)
    _atomic(out, buf.getvalue())
    meas = [r["measured_step_time_s"] for r in rows]
    pred = [r["predicted_step_time_s"] for r in rows]
    mem_err = [abs(r["memory_error_pct"]) for r in rows if r["memory_error_pct"] is not None]
    summary = {
        "rows": len(rows), "date": date, "machine": machine, "command": command,
        "step_time_mape_pct": float(np.mean([abs(r["error_pct"]) for r in rows])),
        "step_time_spearman": spearman(meas, pred) if len(rows) > 2 else None,
        "memory_mape_pct": float(np.mean(mem_err)) if mem_err else None,
        "model_state_max_error_pct": float(max(abs(r["predicted_model_state_bytes"] / r["measured_model_state_bytes"] - 1)
                                               for r in rows) * 100),
    }
    _atomic(out.with_suffix(".summary.json"), json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("machine",)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
