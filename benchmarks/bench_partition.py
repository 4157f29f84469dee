"""How long the DP stage partition takes, and what it buys on Llama 3.1 405B with pp = 16.

    .venv/bin/python benchmarks/bench_partition.py [--runs N]

Prints (1) a table of partition_dp wall time (best of --runs, ms) for n blocks into k chunks on random
per-block costs with a memory limit and per-chunk in-flight counts (the shape of a 1F1B problem), and
(2) for Llama 3.1 405B on 2,048 H100 (dgx-h100 x 256; tp 8, pp 16, dp 16, mbs 1, gbs 2048, seq 8192,
1F1B, sequence parallel) the even split against the DP split under estimate(): step time, whether it fits,
peak memory and the blocks per stage, for three ZeRO / recompute settings, plus what best_partition keeps.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.catalog import load_cluster  # noqa: E402
from planner.core.plan import ParallelPlan, Workload  # noqa: E402
from planner.cost.estimate import estimate  # noqa: E402
from planner.importers import load_model  # noqa: E402
from planner.search.partition import (  # noqa: E402
    BlockCosts,
    best_partition,
    block_costs,
    chunk_inflight,
    partition_dp,
    with_partition,
)

SHAPES = [(32, 4), (32, 16), (64, 8), (64, 32), (96, 16), (126, 8), (126, 16), (126, 32), (126, 64), (126, 126),
          (256, 16), (256, 64), (256, 128)]


def random_costs(n: int, rng: np.random.Generator) -> BlockCosts:
    return BlockCosts(time_s=rng.uniform(0.04, 0.06, n), act_bytes=rng.uniform(0.5e9, 1e9, n),
                      early_time_s=rng.uniform(0.05, 0.08, n), early_act_bytes=rng.uniform(0.05e9, 0.1e9, n),
                      params=rng.uniform(3e8, 4e8, n), state_bytes=rng.uniform(2e9, 3e9, n), recompute_cut=1,
                      head_time_s=0.001, tail_time_s=0.025, head_params=2.6e8, tail_params=2.6e8,
                      head_state_bytes=1.8e9, tail_state_bytes=1.8e9, tail_act_bytes=0.5e9)


def bench_dp(runs: int) -> None:
    rng = np.random.default_rng(0)
    print(f"partition_dp wall time (best of {runs}), random costs, 1F1B in-flight counts, 80 GB limit")
    print(f"{'n blocks':>9} {'k chunks':>9} {'DP ms':>8}  {'max chunk s':>11}")
    for n, k in SHAPES:
        costs = random_costs(n, rng)
        inflight = np.minimum(np.arange(k, 0, -1.0), 64)  # 1F1B: stage i holds min(p - i, m)
        best = float("inf")
        part = None
        for _ in range(runs):
            start = time.perf_counter()
            part = partition_dp(costs, k, inflight, capacity_bytes=1e15)
            best = min(best, time.perf_counter() - start)
        print(f"{n:>9} {k:>9} {best * 1e3:>8.2f}  {part.max_time_s:>11.4f}")


def bench_405b() -> None:
    model = load_model("llama3.1-405b")
    cluster = load_cluster("dgx-h100", nodes=256)
    workload = Workload(global_batch=2048, seq_len=8192)
    print()
    print("Llama 3.1 405B, 2048 H100 (dgx-h100 x 256), tp 8 pp 16 dp 16, mbs 1, gbs 2048, seq 8192, 1F1B, sp")
    settings = {"zero 3, selective recompute": dict(zero=3, recompute="selective"),
                "zero 1, selective recompute": dict(zero=1, recompute="selective"),
                "zero 1, full recompute": dict(zero=1, recompute="full")}
    for name, kw in settings.items():
        plan = ParallelPlan(tp=8, pp=16, dp=16, mbs=1, schedule="1f1b", sp=True, **kw)
        start = time.perf_counter()
        costs = block_costs(model, cluster, workload, plan)
        inflight = chunk_inflight(workload, plan)
        mid = time.perf_counter()
        part = partition_dp(costs, 16, inflight, cluster.devices[0].device.memory_bytes)
        dp_ms = (time.perf_counter() - mid) * 1e3
        prep_ms = (mid - start) * 1e3
        even = estimate(model, cluster, workload, plan)
        dp = estimate(model, cluster, workload, with_partition(plan, part.ranges))
        start = time.perf_counter()
        chosen, _ = best_partition(model, cluster, workload, plan)
        total_ms = (time.perf_counter() - start) * 1e3
        even_sizes = [len(x) for x in np.array_split(np.arange(126), 16)]
        print(f"  {name}:")
        print(f"    even  {even.step_time_s:8.3f} s  fits={even.fits!s:5}  "
              f"peak {even.peak_memory_bytes / 1e9:6.1f} GB  {even_sizes}")
        print(f"    DP    {dp.step_time_s:8.3f} s  fits={dp.fits!s:5}  peak {dp.peak_memory_bytes / 1e9:6.1f} GB"
              f"  {list(part.sizes)}")
        print(f"    DP - even {dp.step_time_s - even.step_time_s:+.3f} s; best_partition keeps "
              f"{'the DP split' if chosen.partition is not None else 'the even split'}; "
              f"block costs {prep_ms:.1f} ms, DP {dp_ms:.1f} ms, best_partition {total_ms:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    bench_dp(args.runs)
    bench_405b()


if __name__ == "__main__":
    main()
