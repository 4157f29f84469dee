"""Search speed and search vs published configurations.

    .venv/bin/python benchmarks/bench_search.py speed [--gpus 8,64,512,4096,16384] [--no-partition]
    .venv/bin/python benchmarks/bench_search.py known [--runs FILE.csv] [--max-devices N]

speed: full search (planner.search.search, defaults of `plan`: top 5, DP partition refinement) for Llama 3.1
405B on dgx-h100 at each GPU count, gbs 2048, seq 8192: plans in the space, pruned by the memory bound, pruned
by the step-time bound, costed by estimate_batch, and wall time. Target (issue 5): under 10 s at 16,384 GPUs,
growth from 512 to 16,384 no worse than linear.

known: for every usable row of the runs table, the search on the row's model, cluster, device count, global
batch, sequence and precision (planner.eval.published.search_row), against the published configuration as
planner.eval.backtest reads it; predicted tokens/s of both, and the gain by source.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.catalog import load_cluster  # noqa: E402
from planner.core.errors import Infeasible  # noqa: E402
from planner.core.plan import Workload  # noqa: E402
from planner.eval.published import search_row  # noqa: E402
from planner.importers import load_model  # noqa: E402
from planner.search.search import search  # noqa: E402

RUNS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "calibration_runs_clean.csv"


def speed(gpus: list[int], refine: bool) -> None:
    model = load_model("llama3.1-405b")
    wl = Workload(global_batch=2048, seq_len=8192)
    print(f"llama3.1-405b on dgx-h100, gbs 2048, seq 8192, top 5, partition refinement {'on' if refine else 'off'}\n")
    print("| GPUs | plans in space | pruned by memory | pruned by step bound | costed | wall s | best plan | step s |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|")
    for n in gpus:
        cluster = load_cluster("dgx-h100", nodes=n // 8)
        t0 = time.perf_counter()
        try:
            r = search(model, cluster, wl, refine_partition=refine)
            best = r.plans[0]
            print(f"| {n:,} | {r.enumerated:,} | {r.pruned_memory:,} | {r.pruned_bound:,} | {r.evaluated:,} | "
                  f"{time.perf_counter() - t0:.1f} | {best.label()}{' (DP partition)' if best.plan.partition else ''} | "
                  f"{best.estimate.step_time_s:.2f} |", flush=True)
        except Infeasible as e:
            need = e.closest[0].estimate.peak_memory_bytes / 1e9 if getattr(e, "closest", None) else float("nan")
            print(f"| {n:,} | - | - | - | - | {time.perf_counter() - t0:.1f} | none fits (closest needs {need:.0f} GB) "
                  f"| - |", flush=True)


def known(runs: Path, max_devices: int | None) -> None:
    import pandas as pd

    df = pd.read_csv(runs)
    rows = [r for r in df.to_dict(orient="records") if int(r.get("usable", 1) or 0) == 1]
    if max_devices:
        rows = [r for r in rows if int(r["device_count"]) <= max_devices]
    results = []
    print("| id | source | devices | published (predicted tok/s) | search best | gain | s |")
    print("|---|---|---:|---|---|---:|---:|")
    for row in rows:
        t0 = time.perf_counter()
        out = search_row(row)
        dt = time.perf_counter() - t0
        results.append(out)
        if "gain" in out:
            fit = "" if out["published_fits"] else " (does not fit)"
            print(f"| {out['id']} | {out['source_code']} | {out['devices']} | {out['published_plan']}{fit} "
                  f"{out['published_tokens_per_s']:,.0f} | {out['best_plan']} {out['best_tokens_per_s']:,.0f} | "
                  f"{out['gain']:+.1%} | {dt:.1f} |", flush=True)
        else:
            print(f"| {out['id']} | {out['source_code']} | - | {out['status']}: {out['reason'][:80]} | | | {dt:.1f} |",
                  flush=True)
    print("\nby source:\n")
    print("| source | rows compared | worse than published | median gain | mean gain | max gain | published not fitting |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    import numpy as np

    by: dict[str, list] = {}
    for o in results:
        if "gain" in o:
            by.setdefault(o["source_code"], []).append(o)
    allg = []
    for src, os_ in sorted(by.items()):
        g = np.array([o["gain"] for o in os_])
        allg += list(g)
        worse = int((g < -1e-9).sum())
        nofit = sum(not o["published_fits"] for o in os_)
        print(f"| {src} | {len(g)} | {worse} | {np.median(g):+.1%} | {g.mean():+.1%} | {g.max():+.1%} | {nofit} |")
    g = np.array(allg)
    skipped = [o for o in results if "gain" not in o]
    print(f"| all | {len(g)} | {int((g < -1e-9).sum())} | {np.median(g):+.1%} | {g.mean():+.1%} | {g.max():+.1%} | "
          f"{sum(not o['published_fits'] for os_ in by.values() for o in os_)} |")
    if skipped:
        print(f"\nnot compared: {len(skipped)} rows: " + "; ".join(f"{o['id']} {o['status']}" for o in skipped))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--gpus", default="8,64,512,4096,16384")
    sp.add_argument("--no-partition", action="store_true")
    kn = sub.add_parser("known")
    kn.add_argument("--runs", default=str(RUNS))
    kn.add_argument("--max-devices", type=int)
    args = ap.parse_args(argv)
    if args.mode == "speed":
        speed([int(x) for x in args.gpus.split(",")], not args.no_partition)
    else:
        known(Path(args.runs), args.max_devices)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
