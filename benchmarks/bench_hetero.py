"""Heterogeneous, island and edge planning: the figures of issue 6 and the search time on 64 devices.

    python benchmarks/bench_hetero.py [mixed|pods|phones|speed|all] [--json]

mixed   Llama 3 8B on mixed-a100-h100 (16 A100 + 16 H100): the plan using both vs the H100s alone vs the naive
        even split over all 32 (planner/planners/hetero.py).
pods    Llama 3 70B on two-pods-25gbe (2 x 4 DGX H100, 25 GbE between): the ILP-placed plan vs the same nodes
        on one NDR fabric vs the topology-blind plan (planner/planners/ilp.py).
phones  Llama 3.2 3B on phones-snapdragon-wifi6: sub-models per phone, per-phone memory, the CPU/GPU split and
        its speedups on one phone (planner/planners/edge.py).
speed   wall time of plan_hetero on a 64-device cluster (4 DGX A100 80GB + 4 DGX H100) and of the placement
        ILP on the 64-GPU two-pods cluster.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.catalog import load_cluster, resolve_cluster  # noqa: E402
from planner.core.hardware import ClusterSpec  # noqa: E402
from planner.core.plan import Workload  # noqa: E402
from planner.importers import load_model  # noqa: E402
from planner.planners.edge import plan_edge  # noqa: E402
from planner.planners.hetero import plan_hetero  # noqa: E402
from planner.planners.ilp import plan_topology  # noqa: E402
from planner.search.search import RankedPlan  # noqa: E402


def mixed() -> dict:
    model, cluster = load_model("llama3-8b"), load_cluster("mixed-a100-h100")
    w = Workload(global_batch=256, seq_len=4096)
    r = plan_hetero(model, cluster, w)
    h100 = r.alone["h100-sxm-80gb"]
    out = {"setting": "llama3-8b, mixed-a100-h100 (16 A100 80GB + 16 H100), gbs 256, seq 4096, bf16",
           "both": {"tokens_per_s": r.best.tokens_per_s, "plan": r.best.label, "kind": r.best.kind},
           "best_shares": ({"tokens_per_s": r.best_shares.tokens_per_s, "plan": r.best_shares.label}
                           if r.best_shares else None),
           "h100_alone": {"tokens_per_s": h100.tokens_per_s, "plan": h100.label},
           "naive_even": {"tokens_per_s": r.even.tokens_per_s, "plan": r.even.label},
           "wall_s": r.wall_s}
    out["vs_h100_alone"] = r.best.tokens_per_s / h100.tokens_per_s
    out["vs_naive_even"] = r.best.tokens_per_s / r.even.tokens_per_s
    return out


def pods() -> dict:
    model, cluster = load_model("llama3-70b"), load_cluster("two-pods-25gbe")
    w = Workload(global_batch=512, seq_len=4096)
    r = plan_topology(model, cluster, w)
    b = r.best
    return {"setting": "llama3-70b, two-pods-25gbe (2 x 4 DGX H100 on IB NDR, 25 GbE between), gbs 512, seq 4096",
            "placed": {"tokens_per_s": b.estimate.tokens_per_s, "plan": RankedPlan(b.plan, b.estimate).label(),
                       "placement": b.placement.counts},
            "rdma_everywhere": {"tokens_per_s": r.uniform.tokens_per_s,
                                "plan": RankedPlan(r.uniform_plan, r.uniform).label()},
            "topology_blind": {"tokens_per_s": r.blind.tokens_per_s,
                               "plan": RankedPlan(r.blind_plan, r.blind).label() + " in rank order"},
            "placed_vs_rdma": b.estimate.tokens_per_s / r.uniform.tokens_per_s,
            "placed_vs_blind": b.estimate.tokens_per_s / r.blind.tokens_per_s, "wall_s": r.wall_s}


def phones() -> dict:
    model, cluster = load_model("llama3.2-3b"), load_cluster("phones-snapdragon-wifi6")
    w = Workload(global_batch=8, seq_len=512, dtype="fp16")
    out = {"setting": f"llama3.2-3b ({model.params / 1e9:.2f} B params, AdamW mixed precision 16 B/param), "
                      "phones-snapdragon-wifi6, gbs 8, seq 512, fp16"}
    for label, k in (("8 phones", 8), ("4 phones", 4), ("best phone count", None)):
        p = plan_edge(model, cluster, w, phones=k)
        out[label] = {"phones": len(p.ranges), "fits": p.fits, "blocks": p.ranges,
                      "memory_gb": [round(m / 1e9, 2) for m in p.memory_bytes],
                      "capacity_gb": p.capacity_bytes[0] / 1e9, "step_s": p.step_time_s,
                      "tokens_per_s": p.tokens_per_s, "wifi_transfer_s": p.p2p_s}
    out["split"] = {"gpu_units": p.split.gpu_units, "units": p.split.units,
                    "lm_head_gpu_sixteenths": p.breakdown["head_split"]}
    out["one_block_ms"] = {k: v * 1e3 for k, v in p.one_phone.items()}
    out["speedup_vs_gpu_only"] = p.one_phone["gpu"] / p.one_phone["both"]
    out["speedup_vs_cpu_only"] = p.one_phone["cpu"] / p.one_phone["both"]
    return out


def speed() -> dict:
    spec = ClusterSpec(name="mixed-64", source="bench: 4 DGX A100 80GB + 4 DGX H100 on HDR", fabric="ib-hdr",
                       groups=[{"node": "dgx-a100-80gb", "count": 4}, {"node": "dgx-h100", "count": 4}])
    cluster = resolve_cluster(spec)
    out = {}
    for name in ("llama3-8b", "llama3-70b"):
        model = load_model(name)
        w = Workload(global_batch=512, seq_len=4096)
        t = time.perf_counter()
        r = plan_hetero(model, cluster, w, baselines=False)
        out[f"{name} hetero candidates only"] = {"wall_s": time.perf_counter() - t, "evaluated": r.evaluated,
                                                 "best": r.best.label, "tokens_per_s": r.best.tokens_per_s}
        t = time.perf_counter()
        r = plan_hetero(model, cluster, w)
        out[f"{name} with baselines"] = {"wall_s": time.perf_counter() - t}
    return out


def main(argv: list[str]) -> None:
    what = [a for a in argv if not a.startswith("--")] or ["all"]
    jobs = {"mixed": mixed, "pods": pods, "phones": phones, "speed": speed}
    names = list(jobs) if "all" in what else what
    res = {}
    for n in names:
        t = time.perf_counter()
        res[n] = jobs[n]()
        res[n]["bench_wall_s"] = time.perf_counter() - t
        if "--json" not in argv:
            print(f"== {n}")
            print(json.dumps(res[n], indent=1, default=str))
    if "--json" in argv:
        print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
