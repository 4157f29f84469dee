"""Mapping an RL post-training job (planner.core.job) onto a cluster: where each model runs, and one iteration's
time (docs/guide/rl.md).

One iteration = generation (the actor's rollout, planner.cost.inference) + inference (forward passes over the
generated sequences: the actor's own log-probs, recomputed by the trainer as verl does, the reference's, the
reward model's score and the critic's values; scoring_time_s) + training (the best plan of the existing
search for each trained model on its devices, times the optimizer steps of the iteration) + sync (the new
actor weights brought to the generator).

  colocated      every model time-shares every device (verl's hybrid engine, HybridFlow, Sheng et al. 2024):
                 phases add up; the actor's weights are resharded from the training layout to the generation
                 layout each iteration (an all-gather where the training layout holds less than a generation
                 shard, else a local copy); the states of the models that are idle either stay on the device
                 (less room for the KV cache and the training plans) or are offloaded to the host and back
                 over its link (verl's param/optimizer offload); both are costed and the faster kept.
  disaggregated  a generation pool and a training pool (ROLL's AutoDeviceMapping, StreamRL): the reference,
                 reward and critic forward passes run on the training pool; the trainer sends the new weights
                 to every generation replica (bytes / link, verl's one_step_off_policy broadcast). Every split
                 in steps of half a node is tried and the fastest kept. With rollout.off_policy_steps 1 the
                 generator produces the next rollout while the trainer trains (one-step off-policy, StreamRL's
                 asynchronous mode, verl's one_step_off_policy): an iteration takes max(generation, inference +
                 training) + sync; with 0 the pools take turns and the phases add up. DPO generates nothing: its
                 reference scores the next batch on one pool while the actor trains on the other.

Critics and reward models are their base model with a value head (one output per position) instead of the
LM head (Ouyang et al. 2022 section 3.5: the reward model is the SFT model with its unembedding replaced).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from planner.core.errors import BadInput, Infeasible, PlannerError
from planner.core.hardware import Cluster
from planner.core.job import RLJob
from planner.core.model import ModelGraph
from planner.core.plan import Workload
from planner.cost import comm, inference
from planner.cost.memory import model_state_bytes
from planner.search.search import prefix_cluster, search
from planner.search.space import Constraints

TP_CHOICES = (1, 2, 4, 8)  # tensor-parallel widths an engine or a forward pass may take, inside one node
DTYPE = "bf16"
WEIGHT_BYTES = 2


def value_head(model: ModelGraph) -> ModelGraph:
    """`model` with its LM head replaced by a value head (vocab 1, not tied): a critic or a reward model."""
    layers = [layer.model_copy(update={"vocab": 1, "tied": False}) if layer.kind == "head" else layer
              for layer in model.layers]
    return ModelGraph(name=f"{model.name}+value-head", source=model.source, family=model.family, layers=layers,
                      edges=model.edges, default_seq=model.default_seq)


def with_memory(cluster: Cluster, memory_bytes: float) -> Cluster:
    """A new Cluster like `cluster` whose devices have `memory_bytes` each: what a model may use while the
    states of the models it time-shares with stay on the devices. Built anew so no cost cache is shared."""
    devices = [ref.model_copy(update={"device": ref.device.model_copy(update={"memory_gb": memory_bytes / 1e9})})
               for ref in cluster.devices]
    return Cluster(name=cluster.name, spec=cluster.spec, nodes=cluster.nodes, devices=devices,
                   fabric=cluster.fabric, island_link=cluster.island_link,
                   island_ports_per_node=cluster.island_ports_per_node, stack=cluster.stack)


@dataclass
class _Job:
    job: RLJob
    models: dict[str, ModelGraph]  # by role; critic and reward with value heads
    cluster: Cluster
    searches: dict = field(default_factory=dict)  # (role, devices, capacity) -> (step_s, plan) or None
    refusals: list = field(default_factory=list)  # why a search found no plan, for the Infeasible message

    @property
    def device(self):
        return self.cluster.devices[0].device

    def forward_roles(self) -> list[str]:
        """Models that score every sequence of an iteration, forward only."""
        roles = ["actor"] if self.job.rollout is not None else []
        return roles + [r for r in ("reference", "reward", "critic") if r in self.models]

    def trained_roles(self) -> list[str]:
        return [m.role for m in self.job.models if m.train]

    def state_bytes(self, role: str, devices: int) -> float:
        """Per-device bytes of a model's states sharded over `devices` (FSDP / ZeRO-3, as verl's workers): a
        trained model's weights, fp32 gradients and AdamW states, a frozen one's weights."""
        params = self.models[role].params
        if role in self.trained_roles():
            return float(model_state_bytes(params, devices, 3)["total"])
        return params * WEIGHT_BYTES / devices


def _tp_link(ctx: _Job, first: int, tp: int):
    """The collective link of devices first .. first + tp - 1, or None when they span nodes (engines keep tp
    inside a node)."""
    ids = range(first, first + tp)
    if len({ctx.cluster.devices[i].node for i in ids}) > 1:
        return None
    return ctx.cluster.collective(ids)


def _generation(ctx: _Job, first: int, devices: int, resident: float) -> dict | None:
    """The fastest rollout over tp choices on devices first .. first + devices - 1: devices / tp engines, each
    serving whole prompts with their samples."""
    r = ctx.job.rollout
    actor = ctx.models["actor"]
    heads = next(layer.heads for layer in actor.layers if layer.kind == "attention")
    best = None
    for tp in TP_CHOICES:
        if devices % tp or heads % tp or (link := _tp_link(ctx, first, tp)) is None and tp > 1:
            continue
        engines = devices // tp
        seqs = math.ceil(r.prompts_per_step / engines) * r.samples_per_prompt
        g = inference.generate(actor, ctx.device, seqs, r.prompt_len, r.response_len, tp=tp,
                               tp_link=link if tp > 1 else None, samples=r.samples_per_prompt,
                               resident_bytes=resident)
        if g.max_batch and (best is None or g.total_s < best["seconds"]):
            best = {"seconds": g.total_s, "engines": engines, "sequences_per_engine": seqs, **g.as_dict()}
    return best


def _scoring(ctx: _Job, role: str, first: int, devices: int, free: float) -> dict | None:
    """One forward pass of `role` over the iteration's sequences, data parallel over the devices with the
    narrowest tp whose weights fit in `free` bytes per device."""
    model = ctx.models[role]
    for tp in TP_CHOICES:
        if devices % tp or (link := _tp_link(ctx, first, tp)) is None and tp > 1:
            continue
        if inference.weights_bytes(model, tp) + inference.workspace_bytes(model, tp) > free:
            continue
        replicas = devices // tp
        batch = math.ceil(ctx.job.sequences / replicas)
        s = float(inference.scoring_time_s(model, ctx.device, batch, ctx.job.seq_len, tp, link if tp > 1 else None))
        return {"seconds": s, "tp": tp, "replicas": replicas}
    return None


def _training(ctx: _Job, role: str, devices: int, capacity: float) -> dict | None:
    """The search's best plan for `role` on the first `devices` devices with `capacity` bytes each, and the
    iteration's training time (its step time x optimizer steps); None when no plan fits."""
    key = (role, devices, round(capacity))
    if key not in ctx.searches:
        t = ctx.job.training
        pool = with_memory(prefix_cluster(ctx.cluster, devices), capacity)
        work = Workload(global_batch=t.global_batch, seq_len=ctx.job.seq_len, dtype=DTYPE)
        try:
            best = search(ctx.models[role], pool, work, Constraints(), top_k=1, progress=False).plans[0]
        except PlannerError as e:  # NoPlanFits, or no plan of this batch on this many devices at all
            ctx.searches[key] = None
            ctx.refusals.append(f"{role} on {devices} devices: {e}")
        else:
            p = best.plan
            ctx.searches[key] = {"seconds": best.estimate.step_time_s * ctx.job.steps,
                                 "step_time_s": best.estimate.step_time_s, "steps": ctx.job.steps,
                                 "label": best.label(), "tp": p.tp, "pp": p.pp, "dp": p.dp, "zero": p.zero,
                                 "peak_memory_gb": best.estimate.peak_memory_bytes / 1e9}
    return ctx.searches[key]


def _reshard_s(ctx: _Job, train: dict, gen_tp: int) -> float:
    """Actor weights from the training layout to a generation engine's tp shard on the same devices.

    A device holds 1 / (tp x pp x (dp under ZeRO-3)) of the weights after training and needs 1 / gen_tp: when
    it holds less, the shard is all-gathered over the ranks that hold its pieces (HybridFlow's 3D-HybridEngine
    gathers within such groups); otherwise it is copied from the training buffer at memory bandwidth."""
    weights = ctx.models["actor"].params * WEIGHT_BYTES
    held = 1 / (train["tp"] * train["pp"] * (train["dp"] if train["zero"] == 3 else 1))
    need = 1 / gen_tp
    if held >= need:
        dev = ctx.device
        return 2 * weights * need / (dev.memory_bandwidth_bytes_per_s * dev.efficiency.memory)
    group = round(need / held)
    return float(comm.all_gather_time_s(weights * need, ctx.cluster.collective(range(group))))


def timeshare(ctx: _Job, first: int, devices: int, *, generate: bool, forward: list[str], train: list[str],
              offload: bool) -> dict | None:
    """The roles that take turns on one pool of devices: the phases add up. Without offload every hosted
    model's states stay on the devices and shrink what the others may use; with offload each is moved to the
    host and back once per iteration over the host link. None when something does not fit."""
    capacity = ctx.device.memory_bytes
    hosted = list(dict.fromkeys(forward + train))
    states = {r: ctx.state_bytes(r, devices) for r in hosted}
    host = ctx.cluster.nodes[ctx.cluster.devices[first].node].host_link
    if offload and host is None:
        return None
    out = {"generation": None, "forward": {}, "training": {}, "offload": offload, "offload_s": 0.0,
           "reshard_s": 0.0}
    gen_weights = 0.0
    if generate:
        gen = _generation(ctx, first, devices, 0.0 if offload else sum(states.values()))
        if gen is None:
            return None
        out["generation"] = gen
        gen_weights = gen["weights_bytes"]
    for role in forward:
        others = 0.0 if offload else sum(v for r, v in states.items() if r != role) + gen_weights
        s = _scoring(ctx, role, first, devices, capacity * inference.GPU_MEMORY_UTILIZATION - others)
        if s is None:
            return None
        out["forward"][role] = s
    for role in train:
        others = 0.0 if offload else sum(v for r, v in states.items() if r != role) + gen_weights
        t = _training(ctx, role, devices, capacity - others) if capacity > others else None
        if t is None:
            return None
        out["training"][role] = t
    if generate and "actor" in train:
        out["reshard_s"] = _reshard_s(ctx, out["training"]["actor"], out["generation"]["tp"])
    if offload:
        out["offload_s"] = 2 * sum(states.values()) / host.bytes_per_s
    return out


def _best_timeshare(ctx: _Job, first: int, devices: int, **kw) -> dict | None:
    found = [t for off in (False, True) if (t := timeshare(ctx, first, devices, offload=off, **kw))]
    return min(found, key=_busy_s, default=None)


def _busy_s(t: dict) -> float:
    gen = t["generation"]["seconds"] if t["generation"] else 0.0
    return gen + _phase(t, "forward") + _phase(t, "training") + t["reshard_s"] + t["offload_s"]


def _phase(t: dict, name: str) -> float:
    return sum(x["seconds"] for x in t[name].values())


# ---------------------------------------------------------------------------------------------------------
# the two mappings


def _iteration(generation_s: float, inference_s: float, training_s: float, sync_s: float, total_s: float) -> dict:
    return {"generation_s": generation_s, "inference_s": inference_s, "training_s": training_s, "sync_s": sync_s,
            "total_s": total_s}


def _pool(roles: list[str], first: int, devices: int, t: dict) -> dict:
    plan = {k: t[k] for k in ("generation", "forward", "training") if t[k]}
    plan.update(offload=t["offload"], offload_s=t["offload_s"], reshard_s=t["reshard_s"])
    return {"roles": roles, "devices": devices, "first_device": first, "plan": plan}


def colocated(ctx: _Job) -> dict | None:
    """Every model on every device, in turn."""
    n = ctx.cluster.device_count
    generate = ctx.job.rollout is not None
    t = _best_timeshare(ctx, 0, n, generate=generate, forward=ctx.forward_roles(), train=ctx.trained_roles())
    if t is None:
        return None
    gen = t["generation"]["seconds"] if generate else 0.0
    it = _iteration(gen, _phase(t, "forward"), _phase(t, "training"), t["reshard_s"] + t["offload_s"], _busy_s(t))
    roles = list(dict.fromkeys(["actor"] + [m.role for m in ctx.job.models]))
    return {"mapping": "colocated", "pools": [_pool(roles, 0, n, t)], "iteration": it}


def _sync_s(ctx: _Job, gen: dict, trainers: int) -> float:
    """New actor weights from the training pool to every generation engine: each generator device receives
    its tp shard, and the trainers' devices share the sending of one full copy per engine; the slower of the
    two over the link between the pools (alpha-beta, docs/formulas.md#comm-alpha-beta), taken between the
    first trainer and the last generator (the farthest pair)."""
    weights = ctx.models["actor"].params * WEIGHT_BYTES
    per_receiver = weights / gen["tp"]
    per_sender = gen["engines"] * weights / trainers
    bw, lat = ctx.cluster.p2p(0, ctx.cluster.device_count - 1)
    return float(comm.p2p_time_s(max(per_receiver, per_sender), bw, lat))


def _split_unit(cluster: Cluster) -> int:
    """Pools are cut in steps of half a node (at least one device)."""
    return max(1, cluster.devices_per_node // 2)


def disaggregated(ctx: _Job) -> dict | None:
    """A producer pool (generation, or DPO's reference scoring) on the last devices and a training pool on the
    first; every split in steps of _split_unit, the fastest kept, the others listed under `splits`."""
    n = ctx.cluster.device_count
    unit = _split_unit(ctx.cluster)
    rollout = ctx.job.rollout
    overlap = rollout is None or rollout.off_policy_steps == 1
    best, splits = None, []
    for producers in range(unit, n, unit):
        trainers = n - producers
        if rollout is not None:
            a = _best_timeshare(ctx, trainers, producers, generate=True, forward=[], train=[])
            b = a and _best_timeshare(ctx, 0, trainers, generate=False, forward=ctx.forward_roles(),
                                      train=ctx.trained_roles())
        else:
            a = _best_timeshare(ctx, trainers, producers, generate=False, forward=ctx.forward_roles(), train=[])
            b = a and _best_timeshare(ctx, 0, trainers, generate=False, forward=[], train=ctx.trained_roles())
        if a is None or b is None:
            splits.append({"producer_devices": producers, "training_devices": trainers, "total_s": None})
            continue
        sync = _sync_s(ctx, a["generation"], trainers) if rollout is not None else 0.0
        produce, consume = _busy_s(a), _busy_s(b)
        total = (max(produce, consume) if overlap else produce + consume) + sync
        splits.append({"producer_devices": producers, "training_devices": trainers, "total_s": total})
        if best is None or total < best["iteration"]["total_s"]:
            gen = a["generation"]["seconds"] if rollout is not None else 0.0
            it = _iteration(gen, _phase(a, "forward") + _phase(b, "forward"), _phase(b, "training"),
                            sync + a["offload_s"] + b["offload_s"], total)
            producer_roles = ["actor (generation)"] if rollout is not None else ctx.forward_roles()
            trainer_roles = list(dict.fromkeys(ctx.trained_roles() + (ctx.forward_roles() if rollout else [])))
            best = {"mapping": "disaggregated", "overlap": overlap,
                    "pools": [_pool(producer_roles, trainers, producers, a), _pool(trainer_roles, 0, trainers, b)],
                    "iteration": it}
    if best is not None:
        best["splits"] = splits
    return best


def plan_job(job: RLJob, models: dict[str, ModelGraph], cluster: Cluster) -> dict:
    """Both mappings of `job` on `cluster`, the faster first (`mapping`, `pools`, `iteration`), the other under
    `alternatives`, and `why`. `models` maps each role of the job to its model (critic and reward as loaded:
    their value heads are put on here). Infeasible when neither mapping fits."""
    if not cluster.is_homogeneous:
        raise BadInput(f"RL job: cluster {cluster.name} mixes device or node types ({', '.join(cluster.device_types)});"
                       " plan --job maps jobs onto clusters of one node type")
    models = {role: value_head(m) if role in ("critic", "reward") else m for role, m in models.items()}
    ctx = _Job(job=job, models=models, cluster=cluster)
    found = [m for m in (colocated(ctx), disaggregated(ctx)) if m is not None]
    if not found:
        first = f"; first refusal: {ctx.refusals[0]}" if ctx.refusals else ""
        raise Infeasible(f"RL job: no mapping fits on {cluster.name} ({cluster.device_count} devices of "
                         f"{ctx.device.memory_bytes / 1e9:.0f} GB): a model's states, its generation engine or its "
                         f"training plan does not fit; add nodes or use smaller models{first}")
    found.sort(key=lambda m: m["iteration"]["total_s"])
    best, others = found[0], found[1:]
    return {**best, "alternatives": others, "why": _why(ctx, best, others)}


def _why(ctx: _Job, best: dict, others: list[dict]) -> str:
    it = best["iteration"]
    text = f"{best['mapping']}: {it['total_s']:.1f} s per iteration"
    if best["mapping"] == "disaggregated" and best["overlap"]:
        producer, trainer = (p["devices"] for p in best["pools"])
        text += (f"; the {producer} producer devices ({it['generation_s']:.1f} s) work one step ahead of the "
                 f"{trainer} training devices ({it['inference_s'] + it['training_s']:.1f} s of inference and "
                 f"training), the slower sets the pace")
    else:
        share = {k: it[k] / it["total_s"] for k in ("generation_s", "inference_s", "training_s", "sync_s")}
        largest = max(share, key=share.get)
        text += f", {largest.removesuffix('_s')} the largest part ({share[largest]:.0%})"
        if best["mapping"] == "disaggregated":
            text += f"; pools of {' + '.join(str(p['devices']) for p in best['pools'])} devices take turns"
    for o in others:
        text += f"; {o['mapping']} takes {o['iteration']['total_s']:.1f} s " \
                f"({o['iteration']['total_s'] / it['total_s']:.2f}x)"
    if not others:
        text += "; the other mapping does not fit"
    return text
