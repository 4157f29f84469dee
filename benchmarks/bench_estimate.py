"""How long one estimate() takes at frontier scale, and where the time goes.

    .venv/bin/python benchmarks/bench_estimate.py [--runs N] [--batch N] [--top N]

Prints a table: one estimate() for Llama 3.1 405B on 16,384 H100 (dgx-h100 x 2048 nodes; tp 8, pp 16,
dp 128, mbs 1, gbs 2048, seq 8192; 1F1B and interleaved with vpp 2), median / min / p90 over --runs calls,
in ms (target < 1 ms); then a batch of --batch different valid plans on the same cluster (plans/s); then
a cProfile of the single-plan call, top entries by cumulative time, to show what to vectorize.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import pstats
import random
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.catalog import load_cluster  # noqa: E402
from planner.core.hardware import Cluster  # noqa: E402
from planner.core.plan import ParallelPlan, Workload  # noqa: E402
from planner.cost.estimate import estimate  # noqa: E402
from planner.importers import load_model  # noqa: E402

TARGET_MS = 1.0
MODEL, CLUSTER, NODES = "llama3.1-405b", "dgx-h100", 2048
WORKLOAD = Workload(global_batch=2048, seq_len=8192)
PLANS = {
    "1f1b tp8 pp16 dp128": ParallelPlan(tp=8, pp=16, dp=128, mbs=1, sp=True, recompute="selective",
                                        zero=1, schedule="1f1b"),
    "interleaved vpp2 tp8 pp16 dp128": ParallelPlan(tp=8, pp=16, dp=128, vpp=2, mbs=1, sp=True,
                                                    recompute="selective", zero=1,
                                                    schedule="interleaved-1f1b"),
}


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


@contextmanager
def p2p_memoized():
    """What-if, benchmark only: Cluster.p2p answered from a cache (planner/ is not changed on disk).

    Cluster.p2p now answers from the node structure in closed form, and estimate() remembers its answers
    per cluster, so this what-if changes little; kept to show that p2p is no longer a cost.
    """
    original = Cluster.p2p
    cache: dict = {}

    def p2p(self, src, dst):
        key = (id(self), src, dst)
        if key not in cache:
            cache[key] = original(self, src, dst)
        return cache[key]

    Cluster.p2p = p2p
    try:
        yield
    finally:
        Cluster.p2p = original


def profile_text(fn, calls: int, top: int, sort: str) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(sort).print_stats(top)
    return "\n".join(line for line in buf.getvalue().splitlines() if line.strip())


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batch(n_devices: int, blocks: int, count: int, seed: int = 0) -> list[tuple[Workload, ParallelPlan]]:
    """`count` different valid (workload, plan) pairs for n_devices: tp | 8, pp | blocks, cp in {1, 2},
    every schedule, mbs, ZeRO stage and recompute policy, gbs 2048 or 4096 when it divides."""
    rng = random.Random(seed)
    seen, out = set(), []
    combos = []
    for tp, cp, pp in itertools.product(divisors(8), (1, 2), divisors(blocks)):
        if n_devices % (tp * cp * pp):
            continue
        combos.append((tp, cp, pp, n_devices // (tp * cp * pp)))
    while len(out) < count:
        tp, cp, pp, dp = rng.choice(combos)
        mbs = rng.choice([1, 2, 4])
        gbs = rng.choice([2048, 4096])
        if gbs % (mbs * dp):
            continue
        m = gbs // (mbs * dp)
        schedule = rng.choice(["1f1b", "gpipe", "zb-h1", "interleaved-1f1b"])
        vpp = 1
        if schedule == "interleaved-1f1b":
            if m % pp:
                continue
            vpp = rng.choice([v for v in (1, 2, 3) if pp * v <= blocks])
        key = (tp, cp, pp, dp, mbs, gbs, schedule, vpp, rng.choice([0, 1, 3]),
               rng.choice(["none", "selective", "full"]))
        if key in seen:
            continue
        seen.add(key)
        plan = ParallelPlan(tp=tp, cp=cp, pp=pp, dp=dp, mbs=mbs, schedule=schedule, vpp=vpp, zero=key[8],
                            recompute=key[9], sp=tp > 1)
        out.append((Workload(global_batch=gbs, seq_len=8192), plan))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=21, help="timed calls per plan (median reported)")
    ap.add_argument("--batch", type=int, default=1000, help="different plans in the batch timing")
    ap.add_argument("--top", type=int, default=15, help="profile entries to print")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model = load_model(MODEL)
    t_model = time.perf_counter() - t0
    t0 = time.perf_counter()
    cluster = load_cluster(CLUSTER, nodes=NODES)
    t_cluster = time.perf_counter() - t0
    n = cluster.device_count

    print(f"estimate() for {MODEL} ({model.num_blocks} blocks, {len(model.layers)} layers) on {CLUSTER} x "
          f"{NODES} = {n:,} devices; gbs {WORKLOAD.global_batch}, seq {WORKLOAD.seq_len}")
    print(f"setup: load_model {t_model * 1e3:.1f} ms, load_cluster {t_cluster * 1e3:.1f} ms (not counted)\n")

    header = f"{'case':<44} {'first ms':>9} {'median ms':>10} {'min ms':>8} {'p90 ms':>8} {'runs':>5} {'vs 1 ms':>8}"
    print(header)
    print("-" * len(header))

    def row(label, plan, runs):
        # The first call may also build the cluster's networkx topology (cached on the Cluster) for p2p.
        first = timed(lambda: estimate(model, cluster, WORKLOAD, plan), 1)[0]
        ts = sorted(timed(lambda: estimate(model, cluster, WORKLOAD, plan), runs))
        med = statistics.median(ts)
        p90 = ts[min(len(ts) - 1, int(0.9 * len(ts)))]
        print(f"{label:<44} {first * 1e3:9.1f} {med * 1e3:10.2f} {ts[0] * 1e3:8.2f} {p90 * 1e3:8.2f} "
              f"{runs:5d} {med * 1e3 / TARGET_MS:7.0f}x")

    def batch_row(label, batch):
        t0 = time.perf_counter()
        for w, p in batch:
            estimate(model, cluster, w, p)
        dt = time.perf_counter() - t0
        print(f"{label:<44} {'':>9} {dt / len(batch) * 1e3:10.2f} {'':>8} {'':>8} {len(batch):5d} "
              f"{dt / len(batch) * 1e3 / TARGET_MS:7.0f}x   ({len(batch) / dt:,.1f} plans/s)")
        return len(batch) / dt

    for label, plan in PLANS.items():
        row(label, plan, args.runs)
    batch = plan_batch(n, model.num_blocks, args.batch)
    rate = batch_row(f"batch of {len(batch)} different plans", batch)
    with p2p_memoized():
        for label, plan in PLANS.items():
            row(f"{label} [p2p cached]", plan, args.runs)
        rate_cached = batch_row(f"batch of {len(batch)} [p2p cached]", batch)
    print(f"\nbatch: {rate:,.1f} plans/s as is, {rate_cached:,.1f} plans/s with Cluster.p2p cached "
          f"(1 ms/plan would be 1,000 plans/s)")

    label, plan = next(iter(PLANS.items()))
    call = lambda: estimate(model, cluster, WORKLOAD, plan)  # noqa: E731
    print(f"\ncProfile, 5 calls of '{label}', top {args.top} by cumulative time:")
    print(profile_text(call, 5, args.top, "cumulative"))
    with p2p_memoized():
        call()
        print(f"\ncProfile with Cluster.p2p cached (what is left to vectorize), 5 calls, top {args.top} "
              f"by cumulative time:")
        print(profile_text(call, 5, args.top, "cumulative"))
        print(f"\nsame, top {args.top} by own time (tottime):")
        print(profile_text(call, 5, args.top, "tottime"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
