"""The must-show figures of issue 9 (MoE folding, long context, offload, attention disaggregation).

    python benchmarks/bench_moe_longctx.py [--quick]

Prints, for each case, the planner's best plan, its predicted MFU / throughput / memory and its `why`.
"""
from __future__ import annotations

import time

from planner.app.api import load_cluster, load_model
from planner.core.builders import TransformerConfig, build_transformer
from planner.core.errors import Infeasible
from planner.core.plan import DocumentMix, ParallelPlan, Workload
from planner.cost import attention_balance as ab
from planner.cost.estimate import estimate
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
        best_a2a = None
        for fold in (True, False):
            t = time.perf_counter()
            # all-to-all layouts only: tp_slice (Pipeline MoE) is compared on its own line below
            r = search(model, cluster, w, Constraints(fold=fold, moe_dispatch=("a2a",)), top_k=1)
            best_a2a = best_a2a or r.plans[0]
            show(("folding" if fold else "no folding (etp = tp, ep | dp*cp)") + f" [{time.perf_counter() - t:.0f} s]",
                 r.plans[0])
        if name == "mixtral-8x22b":
            # Pipeline MoE (Chen et al. 2023, arXiv 2304.11414): E/tp whole experts per TP rank, index slicing and
            # the TP all-reduce instead of the all-to-all; the search takes it only where it is faster
            t = time.perf_counter()
            r = search(model, cluster, w, Constraints(moe_dispatch=("tp_slice",)), top_k=1)
            show("moe_dispatch a2a (best, = folding)", best_a2a)
            show(f"moe_dispatch tp_slice forced [{time.perf_counter() - t:.0f} s]", r.plans[0])
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
    # each case keeps only plans that use what it names (offload > 0, seq_chunks > 1), so that its best plan
    # is shown even where a plan without it is faster
    offload, chunks = (0.25, 0.5, 0.75, 1.0), (2, 4, 8, 16, 32)
    # the default cp cap at 4M tokens is 128 (space.default_max_cp)
    cases = (("no offload", Constraints()),
             ("activation offload", Constraints(offload_activations=offload)),
             ("sequence-chunked pipeline (Seq1F1B / SPPO's, no offload)", Constraints(seq_chunks=chunks)),
             ("SPPO-style: sequence chunks + activation offload",
              Constraints(seq_chunks=chunks, offload_activations=offload)),
             ("tp 1, ring cp 128 (a sequence-parallel-only layout), no offload", Constraints(tp=1, cp=128)),
             ("tp 1, ring cp 128, activation offload", Constraints(tp=1, cp=128, offload_activations=offload)),
             ("tp 1, any cp, no offload", Constraints(tp=1)))
    for tag, c in cases:
        t = time.perf_counter()
        try:
            r = search(seven, cluster, w, c, top_k=1)
            show(f"{tag} [{time.perf_counter() - t:.0f} s]", r.plans[0])
        except Infeasible as e:
            print(f"  {tag}: {e}")


def disaggregation():
    print("== Core attention disaggregation: 64 replicas x 512k tokens of documents (mean 32k, max 512k)")
    model, cluster = load_model("llama3-8b"), load_cluster("dgx-h100", 8)
    docs = ab.sample_documents(524288, 64, 32768, 524288, seed=0)
    r = ab.straggler_gap(model, cluster.devices[0].device, docs, link_bytes_per_s=50e9)
    print(f"  straggler gap without: {r['gap_without_s']:.1f} s of a {r['step_without_s']:.1f} s step; "
          f"with: {r['gap_with_s']:.3f} s of {r['step_with_s']:.1f} s (pool traffic {r['pool_comm_s']:.1f} s, "
          f"hidden under {r['linear_s']:.1f} s of linear layers)")
    # the same as a search option: documents in the workload, the pool (ParallelPlan.attention_pool) offered
    w = Workload(global_batch=64, seq_len=131072, documents=DocumentMix(mean_tokens=16384))
    for pool in ((False,), (False, True)):
        r = search(model, cluster, w, Constraints(dp=8, attention_pool=pool), top_k=1)
        show(f"search, dp 8, 131k-token sequences of documents (mean 16k), pool {'offered' if True in pool else 'off'}",
             r.plans[0])


if __name__ == "__main__":
    moe_folding()
    long_context()
    disaggregation()
