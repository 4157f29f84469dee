"""The search against published configurations: for one run of a runs table, the best plan the search
finds in that run's setting next to the plan the run published, both costed by the same model. It lives with
the backtest, whose reading of the row (model, stack, published plan) it reuses, and above the search it
calls, so the search itself never reads a runs table."""
from __future__ import annotations

from planner.catalog import stack_efficiency
from planner.core.dtypes import train_dtype_or
from planner.core.errors import Infeasible
from planner.core.plan import Workload
from planner.cost.estimate import estimate
from planner.eval import backtest
from planner.search.search import RankedPlan, search
from planner.search.space import Constraints, default_max_cp


def search_row(row: dict, top_k: int = 1) -> dict:
    """Search the setting of one published run (a row of a runs table: model from its columns, cluster,
    device count, global batch, sequence, precision) and compare the best plan's predicted tokens/s with
    that of the published configuration (planner.eval.backtest's reading of the row, unprinted settings at their
    fastest). The search uses the published plan's software stack (flash attention, overlapped gradient
    reduction and TP communication) and a space that contains the published plan, so it can only match or
    beat it when that plan fits."""
    pub = backtest.backtest_row(row, return_plan=True)
    out = {"id": str(row["id"]), "source_code": str(row["source_code"]), "status": pub.status,
           "reason": pub.reason}
    if pub.status != "ok" or pub.plan is None:
        return out
    model = backtest.row_model(row)
    n = int(row["device_count"])
    cluster = backtest.row_cluster(row)  # the row's device, as the backtest predicts it
    cluster = backtest.with_row_stack(
        cluster.with_efficiency(**stack_efficiency(backtest.stack_key(row), str(row["device"]))), row)
    precision = str(backtest.row_value(row, "precision", "bf16"))
    workload = Workload(global_batch=int(row["global_batch"]), seq_len=int(row["seq_len"]),
                        dtype=train_dtype_or(precision))
    p = pub.plan
    published = estimate(model, cluster, workload, p)
    c = Constraints(allow_cross_node_tp=p.tp > cluster.devices_per_node, partial_recompute=True,
                    max_vpp=max(8, p.vpp), max_cp=max(default_max_cp(workload.seq_len), p.cp), max_mbs=max(16, p.mbs),
                    flash_attention=p.flash_attention, overlap_grad_reduce=p.overlap_grad_reduce,
                    overlap_tp_comm=p.overlap_tp_comm)
    try:
        res = search(model, cluster, workload, c, top_k=top_k)
    except Infeasible as e:
        out.update(status="infeasible", reason=str(e), published_tokens_per_s=published.tokens_per_s,
                   published_fits=published.fits)
        return out
    best = res.plans[0]
    out.update(published_plan=RankedPlan(p, published).label(), published_tokens_per_s=published.tokens_per_s,
               published_fits=published.fits, best_plan=best.label(), best_tokens_per_s=best.estimate.tokens_per_s,
               gain=best.estimate.tokens_per_s / published.tokens_per_s - 1, devices=n,
               evaluated=res.evaluated, wall_s=res.wall_s)
    return out
