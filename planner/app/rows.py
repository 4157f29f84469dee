"""One plan as a row of scalar columns: what the API's plan() and estimates() tables and the sweep's CSV
share, so the two cannot drift apart."""
from __future__ import annotations

from planner.core.plan import Estimate, ParallelPlan


def plan_row(p: ParallelPlan, est: Estimate) -> dict:
    """The scalar columns of one plan (the plan() table and the sweep CSV share them)."""
    from planner.search.search import RankedPlan  # on first use: importing the API stays cheap

    return {
        "label": RankedPlan(p, est).label(), "tp": p.tp, "pp": p.pp, "dp": p.dp, "vpp": p.vpp, "cp": p.cp,
        "ep": p.ep, "etp": p.etp or p.tp, "zero": p.zero, "sp": p.sp, "mbs": p.mbs, "recompute": p.recompute,
        "recompute_num_layers": p.recompute_num_layers, "schedule": p.schedule,
        "uneven_partition": p.partition is not None, "step_time_s": est.step_time_s,
        "tokens_per_s": est.tokens_per_s, "mfu": est.mfu, "hfu": est.hfu,
        "peak_memory_gb": est.peak_memory_bytes / 1e9, "memory_capacity_gb": est.memory_capacity_bytes / 1e9,
        "fits": est.fits, "bubble_s": est.breakdown.get("pipeline_bubble_s", 0.0), "why": est.why,
    }
