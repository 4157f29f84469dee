"""Elastic re-planning after device failures, keeping the global batch (ElasWave, 2025: uneven micro-batches per
data-parallel replica and layer migration between pipeline stages; docs/guide/elastic_and_async.md).

The plan's dp replicas each span tp x cp x pp ranks (Megatron's rank order: tp fastest, then cp, dp, pp). A
replica that loses devices keeps its surviving stages and becomes a shorter pipeline (pp' = the whole stages
left): the lost stages' layers migrate onto the survivors (even split over pp'), fetched from a healthy replica.
The global batch is then split over the replicas in proportion to their speed (multiples of mbs), and the step
waits for the slowest replica. Each replica shape is timed by estimate() on one replica (dp = 1) at its own
batch; what the full plan adds beyond one replica (the data-parallel sync, the links between nodes) is carried
over unchanged from the plan's own estimate, so with no failure the new step equals the old.

The naive alternatives beside it: drop every damaged replica (the global batch kept only if it still divides),
and restart on the whole surviving nodes with the search's best plan for them.
"""
from __future__ import annotations

from dataclasses import dataclass

from planner.core import dtypes
from planner.core.errors import BadInput, Infeasible
from planner.core.plan import Estimate, ParallelPlan, Workload
from planner.cost.estimate import estimate
from planner.cost.memory import optimizer_bytes_per_param
from planner.search.search import prefix_cluster


@dataclass(frozen=True)
class Replan:
    """The new plan for the survivors and what it costs."""

    before: Estimate
    after_step_s: float
    after_tokens_per_s: float
    replicas: list  # per replica: {"pp": pp', "devices": n, "samples": b, "step_s": t}
    migration_bytes: float
    migration_s: float
    alternatives: list  # {"name", "tokens_per_s", "global_batch", "note"}
    after_plan: ParallelPlan  # the healthy replicas' plan with the survivors' dp (the reduced ones differ in pp)


def lost_ranks(devices: int, lose: int | None, lose_devices: tuple[int, ...] | None) -> tuple[int, ...]:
    """The failed ranks: the last `lose` (a whole node at the end when lose is its size) or the listed ones."""
    if lose_devices:
        bad = [d for d in lose_devices if not 0 <= d < devices]
        if bad:
            raise BadInput(f"--lose-devices {bad[0]} is not a device of the plan's {devices}; give 0..{devices - 1}")
        return tuple(sorted(set(lose_devices)))
    if lose is None or not 0 < lose < devices:
        raise BadInput(f"--lose must be between 1 and {devices - 1} (the plan runs on {devices} devices)")
    return tuple(range(devices - lose, devices))


def _replica_plan(plan: ParallelPlan, pp: int) -> ParallelPlan:
    """One replica's plan with pp stages (even split; a one-stage pipeline runs 1F1B)."""
    schedule = plan.schedule if pp > 1 else "1f1b"
    return plan.model_copy(update={"dp": 1, "pp": pp, "partition": None if pp != plan.pp else plan.partition,
                                   "schedule": schedule, "vpp": 1 if pp == 1 else plan.vpp, "num_microbatches": None})


def _replica_step(model, cluster, workload: Workload, plan: ParallelPlan, pp: int, samples: int, memo: dict):
    """estimate() of one replica of pp stages at `samples` sequences per step (memoised)."""
    key = (pp, samples)
    if key not in memo:
        rp = _replica_plan(plan, pp)
        one = prefix_cluster(cluster, rp.devices)
        memo[key] = estimate(model, one, workload.model_copy(update={"global_batch": samples}), rp)
    return memo[key]


def _split_batch(gbs: int, mbs: int, speeds: list[float]) -> list[int]:
    """Samples per replica, multiples of mbs summing to gbs, in proportion to speed (largest remainder)."""
    units = gbs // mbs
    share = [units * s / sum(speeds) for s in speeds]
    got = [int(x) for x in share]
    for i in sorted(range(len(share)), key=lambda i: got[i] - share[i])[:units - sum(got)]:
        got[i] += 1
    return [g * mbs for g in got]


def _layer_stages(n_layers: int, pp: int) -> list[int]:
    """Stage of each layer under an even split (np.array_split's rule)."""
    q, r = divmod(n_layers, pp)
    out = []
    for s in range(pp):
        out += [s] * (q + (s < r))
    return out


def replan(model, cluster, workload: Workload, plan: ParallelPlan, lost: tuple[int, ...],
           before: Estimate | None = None) -> Replan:
    """The elastic plan for the devices that survive `lost` (module docstring)."""
    if plan.vpp > 1 or plan.ep > 1 or workload.documents is not None:
        raise BadInput("replan handles dense plans without virtual stages or documents (vpp 1, ep 1); re-plan "
                       "with `planner plan` on the surviving devices")
    before = before or estimate(model, cluster, workload, plan)
    per_stage = plan.tp * plan.cp * plan.dp  # ranks of one pipeline stage
    rank_dp = [(r % per_stage) // (plan.tp * plan.cp) for r in range(plan.devices)]
    rank_pp = [r // per_stage for r in range(plan.devices)]
    hit: dict[int, set] = {}
    for r in lost:
        hit.setdefault(rank_dp[r], set()).add(rank_pp[r])
    shapes = [plan.pp if j not in hit else plan.pp - len(hit[j]) for j in range(plan.dp)]  # whole stages left
    memo: dict = {}
    nominal = workload.global_batch // plan.dp
    # a shorter pipeline whose stages cannot hold the migrated layers sits out (its survivors idle)
    fits = {pp: _replica_step(model, cluster, workload, plan, pp, nominal, memo).fits for pp in set(shapes) if pp}
    shapes = [pp if pp and fits[pp] else 0 for pp in shapes]
    live = [j for j in range(plan.dp) if shapes[j] >= 1]
    if not live:
        raise Infeasible("no replica keeps enough stages to hold the model; restart on new devices")
    base = _replica_step(model, cluster, workload, plan, plan.pp, nominal, memo)
    extra_s = before.step_time_s - base.step_time_s  # what the whole plan adds to one replica (dp sync, links)
    speed = {pp: nominal / _replica_step(model, cluster, workload, plan, pp, nominal, memo).step_time_s
             for pp in {shapes[j] for j in live}}
    samples = _split_batch(workload.global_batch, plan.mbs, [speed[shapes[j]] for j in live])
    replicas = []
    for j, b in zip(live, samples):
        est = _replica_step(model, cluster, workload, plan, shapes[j], b, memo) if b else None
        if est is not None and not est.fits:
            raise Infeasible(f"replica {j} on {shapes[j]} stages does not fit ({est.why}); replan with more memory "
                             "headroom (recompute, ZeRO) first")
        replicas.append({"replica": j, "pp": shapes[j], "devices": shapes[j] * plan.tp * plan.cp, "samples": b,
                         "step_s": est.step_time_s if est else 0.0})
    step = max(r["step_s"] for r in replicas) + extra_s
    mig_bytes, mig_s = _migration(model, cluster, workload, plan, hit, shapes)
    after_plan = plan.model_copy(update={"dp": len(live)})
    return Replan(before=before, after_step_s=step,
                  after_tokens_per_s=workload.global_batch * workload.seq_len / step, replicas=replicas,
                  migration_bytes=mig_bytes, migration_s=mig_s,
                  alternatives=_alternatives(model, cluster, workload, plan, lost, hit, extra_s, memo),
                  after_plan=after_plan)


def _migration(model, cluster, workload, plan, hit: dict, shapes: list) -> tuple[float, float]:
    """(bytes, seconds) of moving layers onto the surviving stages of every damaged replica: each survivor
    fetches the layers it did not hold from a healthy replica, weights on every tp x cp rank (1/tp each) and
    the optimizer states once (ZeRO shards them over the replicas), over each receiving device's NIC share."""
    blocks = [layer for layer in model.layers]
    old = _layer_stages(len(blocks), plan.pp)
    per_param = dtypes.weight_bytes(workload.dtype) * plan.cp + optimizer_bytes_per_param(
        workload.optimizer, dtypes.weight_bytes(workload.dtype)) / plan.tp / max(1, plan.dp)
    total, worst = 0.0, 0.0
    node = cluster.nodes[0]
    link = node.nic_link or node.intra_link
    nic_share = link.bytes_per_s * node.nic_count / len(node.devices)
    for j, gone in hit.items():
        if shapes[j] < 1:
            continue
        survivors = [s for s in range(plan.pp) if s not in gone]  # old stages kept, in order
        new = _layer_stages(len(blocks), shapes[j])
        for k, layer in enumerate(blocks):
            if survivors[new[k]] != old[k]:  # the layer lands on a device that did not hold it
                nbytes = layer.params() * per_param
                total += nbytes
                worst = max(worst, nbytes)
        # each receiving stage's devices fetch in parallel; the busiest stage bounds the time
        recv = [sum(blocks[k].params() * per_param for k in range(len(blocks))
                    if new[k] == s and survivors[s] != old[k]) for s in range(shapes[j])]
        worst = max(worst, max(recv) / (plan.tp * plan.cp))
    return total, worst / nic_share


def _alternatives(model, cluster, workload, plan, lost, hit, extra_s, memo) -> list:
    """The naive options: drop the damaged replicas; restart on the whole nodes left (the search's best)."""
    out = []
    dp = plan.dp - len(hit)
    gbs = workload.global_batch
    if dp >= 1:
        keep = gbs % (plan.mbs * dp) == 0
        b = gbs // dp if keep else (gbs // (plan.mbs * dp)) * plan.mbs
        step = _replica_step(model, cluster, workload, plan, plan.pp, b, memo).step_time_s + extra_s
        out.append({"name": "drop damaged replicas", "dp": dp, "global_batch": b * dp,
                    "tokens_per_s": b * dp * workload.seq_len / step,
                    "note": "keeps the global batch" if keep else f"global batch {gbs} -> {b * dp}: changes training"})
    per_node = len(cluster.nodes[0].devices)
    bad_nodes = {r // per_node for r in lost}  # rank r on device r
    nodes = len(cluster.nodes) - len(bad_nodes)
    if nodes >= 1:
        from planner.search.search import search
        from planner.search.space import Constraints

        sub = prefix_cluster(cluster, nodes * per_node)
        try:
            best = search(model, sub, workload, Constraints(), top_k=1, progress=False).plans[0]
            out.append({"name": f"restart on {nodes} whole nodes", "dp": best.plan.dp,
                        "global_batch": gbs, "tokens_per_s": best.estimate.tokens_per_s,
                        "plan": best.plan.model_dump(), "note": "search's best plan; plus a restart from checkpoint"})
        except (Infeasible, BadInput) as e:
            out.append({"name": f"restart on {nodes} whole nodes", "tokens_per_s": 0.0, "note": str(e)})
    return out

