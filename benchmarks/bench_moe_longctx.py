"""The must-show figures of issue 9 (MoE folding, long context, offload, attention disaggregation).

    python benchmarks/bench_moe_longctx.py [--quick]

Prints, for each case, the planner's best plan, its predicted MFU / throughput / memory and its `why`.
"""
from __future__ import annotations

import sys
import time

from planner.api import load_cluster, load_model
from planner.builders import TransformerConfig, build_transformer
from planner.cost import attention_balance as ab
from planner.cost.estimate import estimate
from planner.errors import Infeasible
from planner.plan import ParallelPlan, Workload
from planner.search.search import search
from planner.search.space import Constraints


def show(tag, rp):
    e = rp.estimate
    print(f"  {tag}: {rp.label()} | MFU {e.mfu:.1%} | {e.tokens_per_s:,.0f} tok/s | "
          f"{e.peak_memory_bytes / 1e9:.1f} GB/GPU | {e.why}")


def moe_folding():
    print("== MoE Parallel Folding (paper: Mixtral 8x22B 49.3%, Qwen2-57B-A14B 39.0% MFU on H100)")
    for name, nodes, gbs in (("mixtral-8x22b", 16, 256), ("qwen2-57b-a14b", 8, 256)):
        model, cluster = load_model(name), load_cluster("dgx-h100", nodes)
        w = Workload(global_batch=gbs, seq_len=4096)
        print(f"{name} on {8 * nodes} H100, seq 4096, gbs {gbs}")
        for fold in (True, False):
            t = time.perf_counter()
            r = search(model, cluster, w, Constraints(fold=fold), top_k=1)
            show(("folding" if fold else "no folding (etp = tp, ep | dp*cp)") + f" [{time.perf_counter() - t:.0f} s]",
                 r.plans[0])
        # the same plan with tp 2 and 8-way ep: experts folded into the tp ranks (etp 1) or split like attention
        for fold in (True, False):
            p = ParallelPlan(tp=2, pp=8 if nodes == 16 else 4, dp=8 if nodes == 16 else 8, ep=8, etp=1 if fold else None,
                             sp=True, zero=1, mbs=1, overlap_grad_reduce=True)
            if p.devices != 8 * nodes:
                p = p.model_copy(update={"dp": 8 * nodes // (2 * p.pp)})
            from planner.search.search import RankedPlan
            show(f"fixed tp2 ep8 etp{'1' if fold else '2'}", RankedPlan(p, estimate(model, cluster, w, p)))
        for imb, cf in ((1.2, None), (1.2, 1.0)):
            r = search(model, cluster, w.model_copy(update={"moe_imbalance": imb, "moe_capacity_factor": cf}),
                       Constraints(), top_k=1)
            show(f"imbalance {imb}, capacity {cf or 'dropless'}", r.plans[0])


def long_context():
    print("== Llama 3 8B on 64 H100")
    model, cluster = load_model("llama3-8b"), load_cluster("dgx-h100", 8)
    for seq, gbs in ((131072, 16), (1048576, 2)):
        w = Workload(global_batch=gbs, seq_len=seq)
        try:
            r = search(model, cluster, w, Constraints(max_cp=64), top_k=1)
            show(f"seq {seq}", r.plans[0])
        except Infeasible as e:
            print(f"  seq {seq}: {e}")
    print("== 7B (Llama-2 shape) at 4M tokens on 128 A100 80GB")
    seven = build_transformer(TransformerConfig(name="llama2-7b", layers=32, hidden=4096, heads=32, kv_heads=32,
                                                ffn_hidden=11008, vocab=32000, max_seq=4 * 2**20))
    cluster = load_cluster("dgx-a100-80gb", 16)
    w = Workload(global_batch=1, seq_len=4 * 2**20)
    for off in ((0.0,), (0.0, 0.5, 0.75, 1.0)):
        try:
            r = search(seven, cluster, w, Constraints(max_cp=128, offload_activations=off), top_k=1)
            show(f"activation offload {off}", r.plans[0])
        except Infeasible as e:
            print(f"  activation offload {off}: {e}")


def disaggregation():
    print("== Core attention disaggregation: 64 replicas x 512k tokens of documents (mean 32k, max 512k)")
    model, cluster = load_model("llama3-8b"), load_cluster("dgx-h100", 8)
    docs = ab.sample_documents(524288, 64, 32768, 524288, seed=0)
    r = ab.straggler_gap(model, cluster.devices[0].device, docs, link_bytes_per_s=50e9)
    print(f"  straggler gap without: {r['gap_without_s']:.1f} s of a {r['step_without_s']:.1f} s step; "
          f"with: {r['gap_with_s']:.3f} s of {r['step_with_s']:.1f} s (pool traffic {r['pool_comm_s']:.1f} s, "
          f"hidden under {r['linear_s']:.1f} s of linear layers)")


if __name__ == "__main__":
    moe_folding()
    long_context()
    disaggregation()
