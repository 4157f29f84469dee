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

from planner.core.plan import ParallelPlan, PlanFile, StageAssignment, Workload  # noqa: E402

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
           "last_loss", "core_share", "load_average_1m", "memory_method", "measured_rss_peak_bytes", "rounds", "measured_step_time_runs_s",
           "run_spread_pct", "date", "machine", "command"]


def spearman(a, b) -> float:
    """Spearman rank correlation (scipy; average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _atomic(path: Path, text: str) -> None:
    from planner.files import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)


def summarize(rows: list[dict], by_round: list[list[float]], date: str, machine, command: str) -> dict:
    meas = [float(r["measured_step_time_s"]) for r in rows]
    pred = [float(r["predicted_step_time_s"]) for r in rows]
    mem_err = [abs(float(r["memory_error_pct"])) for r in rows if r["memory_error_pct"] not in (None, "")]
    return {
        "rows": len(rows), "date": date, "machine": machine, "command": command,
        "step_time_mape_pct": float(np.mean([abs(float(r["error_pct"])) for r in rows])),
        "step_time_spearman": spearman(meas, pred) if len(rows) > 2 else None,
        "memory_mape_pct": float(np.mean(mem_err)) if mem_err else None,
        # the noise floor: how well one round's measured times rank-correlate with another's
        "round_to_round_spearman": (float(np.mean([spearman(a, b) for i, a in enumerate(by_round)
                                                   for b in by_round[i + 1:]])) if len(by_round) > 1 else None),
        "model_state_max_error_pct": float(max(abs(float(r["predicted_model_state_bytes"])
                                                   / float(r["measured_model_state_bytes"]) - 1) for r in rows) * 100),
    }


def repredict(out: Path) -> int:
    """Re-predict a study's measured rows with the current model and `local` profile (nothing is re-run)."""
    from planner.backends.torch.validate import predict

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    plan_dir = out.parent / (out.with_suffix("").name + "-plans")
    for row in rows:
        pf = PlanFile.model_validate_json((plan_dir / f"{row['id']}.json").read_text())
        _, _, est, _ = predict(pf, int(row["nproc"]), row["device"])
        row["predicted_step_time_s"] = est.step_time_s
        row["error_pct"] = (est.step_time_s / float(row["measured_step_time_s"]) - 1) * 100
        print(f"{row['id']:<28} measured {float(row['measured_step_time_s']):8.3f} s  predicted "
              f"{est.step_time_s:8.3f} s ({float(row['error_pct']):+6.1f}%)")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    _atomic(out, buf.getvalue())
    runs = [[float(t) for t in str(r.get("measured_step_time_runs_s") or "").split()] for r in rows]
    k = min((len(x) for x in runs), default=0)
    by_round = [[x[i] for x in runs] for i in range(k)] if k > 1 else []
    old = json.loads(out.with_suffix(".summary.json").read_text()) if out.with_suffix(".summary.json").exists() else {}
    summary = summarize(rows, by_round, old.get("date", ""), old.get("machine"), old.get("command", ""))
    summary["repredicted"] = _dt.datetime.now().isoformat(timespec="minutes")
    _atomic(out.with_suffix(".summary.json"), json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=2))
    return 0


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
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every plan this many times, round-robin (each round starts one plan later), and "
                         "keep the median: a slow minute on a shared machine then hits every plan once instead of "
                         "one plan every time")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/local/validation.csv"))
    ap.add_argument("--repredict", action="store_true",
                    help="measure nothing: re-predict the rows of --out (their plan files beside it) with this "
                         "checkout's model and the catalog's current `local` profile, and rewrite the CSV and summary")
    args = ap.parse_args(argv)
    if args.repredict:
        return repredict(Path(args.out))

    from planner.backends.torch.calibrate import machine_description
    from planner.backends.torch.runner import RunOptions
    from planner.backends.torch.validate import usable_cores, validate
    from planner.core.errors import PlannerError

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
    pfs = {}
    for pid, plan in plans.items():
        nodes = None
        if args.suite == "cpu" and plan.devices > cores:
            nodes = -(-plan.devices // cores)
        workload = Workload(global_batch=args.gbs, seq_len=args.seq, dtype=args.dtype)
        pfs[pid] = PlanFile(model=args.model, cluster=args.cluster, nodes=nodes, workload=workload, plan=plan)
        (plan_dir / f"{pid}.json").write_text(pfs[pid].model_dump_json(indent=2) + "\n")
    ids = list(pfs)
    runs: dict[str, list[dict]] = {pid: [] for pid in ids}
    for rnd in range(args.rounds):
        for pid in ids[rnd % len(ids):] + ids[:rnd % len(ids)]:
            try:
                r = validate(pfs[pid], None, RunOptions(steps=args.steps, warmup=args.warmup, seed=0, threads=1))
            except PlannerError as e:
                print(f"{pid}: error: {e}", file=sys.stderr)
                continue
            runs[pid].append(r)
            print(f"round {rnd + 1} {pid:<28} measured {r['measured_step_time_s']:8.3f} s  predicted "
                  f"{r['predicted_step_time_s']:8.3f} s ({r['error_pct']:+6.1f}%)  memory "
                  f"{r['measured_peak_memory_bytes'] / 1e6:7.1f} MB vs {r['predicted_tensor_memory_bytes'] / 1e6:7.1f} MB "
                  f"({r['memory_error_pct']:+6.1f}%)  load {r['load_average_1m']:.2f}", flush=True)
    rows = []
    for pid in ids:
        if not runs[pid]:
            continue
        times = [x["measured_step_time_s"] for x in runs[pid]]
        med = float(np.median(times))
        r = min(runs[pid], key=lambda x: abs(x["measured_step_time_s"] - med))  # the run nearest the median
        plan, p, nodes = pfs[pid].plan, r["plan"], pfs[pid].nodes
        row = {"id": pid, "model": args.model, "cluster": args.cluster, "nodes": nodes or "",
               "nproc": r["nproc"], "device": r["device"], **{k: p[k] for k in ("dp", "tp", "pp", "vpp", "zero", "sp",
                                                                                "mbs", "recompute", "schedule")},
               "microbatches": plan.microbatches(pfs[pid].workload),
               "partition": "" if p["partition"] is None else
               " ".join(f"{a['layers'][0]}-{a['layers'][1]}" for a in p["partition"]),
               "gbs": args.gbs, "seq": args.seq, "dtype": r["workload"]["dtype"], "steps": args.steps,
               "warmup": args.warmup, "first_loss": r["losses"][0], "last_loss": r["losses"][-1],
               "rounds": len(times), "measured_step_time_runs_s": " ".join(f"{t:.4f}" for t in times),
               "run_spread_pct": (max(times) - min(times)) / med * 100,
               "date": date, "machine": machine_text, "command": command}
        for k in ("measured_step_time_min_s", "predicted_step_time_s", "measured_peak_memory_bytes",
                  "predicted_tensor_memory_bytes", "predicted_peak_memory_bytes", "memory_error_pct",
                  "measured_model_state_bytes", "predicted_model_state_bytes", "core_share", "load_average_1m",
                  "memory_method", "measured_rss_peak_bytes"):
            row[k] = r.get(k)
        row["measured_step_time_s"] = med
        row["error_pct"] = (r["predicted_step_time_s"] / med - 1) * 100
        rows.append(row)
    if not rows:
        print("no plan ran", file=sys.stderr)
        return 1
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for row in rows:
        w.writerow(row)
    _atomic(out, buf.getvalue())
    full = [pid for pid in ids if len(runs[pid]) == args.rounds]
    by_round = [[runs[pid][k]["measured_step_time_s"] for pid in full] for k in range(args.rounds)] \
        if len(full) > 2 else []
    summary = summarize(rows, by_round, date, machine, command)
    _atomic(out.with_suffix(".summary.json"), json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("machine",)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
