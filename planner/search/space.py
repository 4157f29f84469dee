"""The search space: every plan the planner considers for (model, cluster, workload), as PlanArrays columns,
and a memory lower bound that prunes plans before they are costed.

Enumeration is numpy throughout: degree triples (tp, pp, cp) first (dp follows from the device count), then
a cross join with each further dimension and a vectorized filter after each, so a space of a million plans
costs milliseconds. Every filter has a name; when one leaves nothing, `EmptySpace` says which (and with
what the user asked for), so an impossible request is one readable line.

The rules (docs/ARCHITECTURE.md#concepts; Megatron-LM's argument checks):
  dp * tp * pp * cp = devices; tp within a node (devices per node divisible by tp) unless allowed across
  nodes; tp divides every attention layer's heads and kv_heads; pp * vpp <= blocks; cp > 1 needs
  seq % (2 cp) == 0 (load-balanced causal ring attention); ep divides the experts and ep * etp divides
  dp * cp * tp (MoE Parallel Folding: the expert grid refolds the stage's ranks); moe_dispatch tp_slice
  (Pipeline MoE) needs tp > 1, ep = tp and etp = 1; global batch % (mbs * dp) == 0; interleaving needs the micro-batch count to be a multiple
  of pp; sp needs tp > 1; seq_chunks > 1 (sequence-chunked pipeline, when Constraints.seq_chunks offers it)
  needs pp > 1, gpipe or 1f1b, flash and causal attention, and seq % (seq_chunks * 2cp) == 0, and no documents;
  attention_pool (DistCA, when Constraints.attention_pool offers it) only for workloads with documents.
With pp = 1 every schedule runs the same ops, and 1F1B holds the fewest micro-batches, so only 1F1B is
enumerated there (unless --schedule fixes another).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from planner.core import dtypes
from planner.core.dims import (
    COLUMN,
    SCHEDULE_INDEX,
    SEARCHED_SCHEDULES,
    ZERO_STAGES,
    deepep_fits_ep,
    expert_tp,
    local_sgd_fits_zero,
    experts_fold_into_ranks,
    experts_nest_in_dp,
    microbatches_fit_schedule,
    schedules_with,
    seq_chunks_fit_attention,
    seq_chunks_fit_schedule,
    sp_fits_tp,
    tp_slice_fits_degrees,
    ulysses_fits_cp,
    vpp_fits_schedule,
)
from planner.core.errors import BadInput
from planner.core.hardware import Cluster
from planner.core.limits import MAX_MICROBATCHES
from planner.core.model import ModelGraph
from planner.core.plan import Workload
from planner.cost import memory, memory_phase, moe
from planner.cost.batch_ids import row_ids
from planner.cost.batch_plans import POLICIES, SCHEDULES, PlanArrays
from planner.cost.pipeline import inflight_microbatches

# Megatron's block method (--recompute-num-layers N): the blocks of each chunk recomputed, when partial
# recompute is searched. The same coarse grid planner.eval.backtest tries for runs that do not print it.
PARTIAL_RECOMPUTE_LAYERS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)


CP_MIN_TOKENS_PER_RANK = 32768


def default_max_cp(seq_len: int) -> int:
    """The context-parallel degree the search tries up to when the user sets no --max-cp: 16, which keeps
    the space of ordinary sequence lengths small, or, for sequences past 16 x 32K = 512K tokens, as many
    ranks as keep 32K tokens each. At that length cp is the lever that fits the sequence at all (activations
    and the ring's K/V grow with the tokens per rank, whatever pp does), so a cap of 16 would hide the
    layouts that published multi-million-token runs use (Ring Attention, Liu et al. 2023 Table 3: a 7B model
    at 4M tokens over 32 ranks)."""
    return max(16, int(seq_len) // CP_MIN_TOKENS_PER_RANK)


@dataclass(frozen=True)
class Constraints:
    """What the user fixes (a value) or bounds (max_*); None leaves a dimension free.

    flash_attention, overlap_grad_reduce and overlap_tp_comm describe the software stack, not a choice the
    search makes: they are copied into every plan (a current Megatron/NeMo stack has all three; Megatron
    of 2021-22 had none).
    """

    tp: int | None = None
    pp: int | None = None
    dp: int | None = None
    cp: int | None = None
    ep: int | None = None
    etp: int | None = None
    vpp: int | None = None
    zero: int | None = None
    mbs: int | None = None
    recompute: str | None = None
    schedule: str | None = None
    sp: bool | None = None
    max_tp: int | None = None
    max_pp: int | None = None
    # None: the default cap, default_max_cp(seq): 16, or more for sequences past 512K tokens
    max_cp: int | None = None
    max_vpp: int | None = 8
    max_mbs: int | None = 16
    allow_cross_node_tp: bool = False
    partial_recompute: bool = False  # also search Megatron's partial (block) recompute
    offload_optimizer: tuple[float, ...] = (0.0,)  # fractions of optimizer state on the host to try
    flash_attention: bool = True
    overlap_grad_reduce: bool = True
    overlap_tp_comm: bool = False
    fold: bool = True  # False: experts split like attention (etp = tp), no MoE Parallel Folding
    cp_comm: tuple[str, ...] = ("ring", "a2a")  # context-parallel exchanges to try (a2a: Ulysses)
    # MoE token exchanges to try: a2a (dispatch/combine all-to-all over the ep group) and tp_slice (Pipeline
    # MoE: experts over the TP group, index slicing + the TP all-reduce); dense models take a2a alone
    # deepep: DeepEP's node-deduplicated exchange, tried where the expert group spans nodes and routing is dropless
    moe_dispatch: tuple[str, ...] = ("a2a", "tp_slice", "deepep")
    offload_activations: tuple[float, ...] = (0.0,)  # fractions of saved activations on the host to try
    # sequence chunks per micro-batch to try (ParallelPlan.seq_chunks: TeraPipe / Seq1F1B / SPPO pipelines),
    # e.g. (1, 2, 4, 8, 16); chunked plans need pp > 1, gpipe or 1f1b, flash attention and causal attention
    seq_chunks: tuple[int, ...] = (1,)
    # core attention disaggregation to try (ParallelPlan.attention_pool, DistCA); True only with documents
    attention_pool: tuple[bool, ...] = (False,)
    # low-bandwidth training, copied into every plan (ParallelPlan.local_steps, grad_compression, act_compression)
    local_steps: int = 1
    grad_compression: float = 1.0
    act_compression: float = 1.0

    def check(self) -> None:
        """Refuse values no plan could take (BadInput: exit 2)."""
        for name in ("tp", "pp", "dp", "cp", "ep", "etp", "vpp", "mbs", "max_tp", "max_pp", "max_cp", "max_vpp",
                     "max_mbs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise BadInput(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
        if self.zero is not None and self.zero not in (0, 1, 2, 3):
            raise BadInput(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.recompute is not None and self.recompute not in POLICIES:
            raise BadInput(f"--recompute must be one of {', '.join(POLICIES)}, got {self.recompute!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise BadInput(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.vpp is not None and self.schedule is not None and not vpp_fits_schedule(
                SCHEDULE_INDEX[self.schedule], self.vpp):
            raise BadInput(f"--vpp {self.vpp} needs --schedule {' or '.join(schedules_with('virtual_stages'))}, "
                           f"got {self.schedule}")
        if self.sp and self.tp == 1:
            raise BadInput("--sp needs tp > 1 (sequence parallel splits along the tensor-parallel group)")
        for f in self.offload_optimizer:
            if not 0.0 <= f <= 1.0:
                raise BadInput(f"optimizer offload fraction must be in [0, 1], got {f}")
        if not self.seq_chunks or any(not isinstance(k, int) or k < 1 for k in self.seq_chunks):
            raise BadInput(f"seq_chunks must be positive integers, got {self.seq_chunks}")
        for f in self.offload_activations:
            if not 0.0 <= f <= 1.0:
                raise BadInput(f"activation offload fraction must be in [0, 1], got {f}")
        if not self.cp_comm or any(k not in ("ring", "a2a") for k in self.cp_comm):
            raise BadInput(f"cp_comm must be among ring, a2a; got {', '.join(self.cp_comm) or 'none'}")
        if not self.moe_dispatch or any(k not in ("a2a", "tp_slice", "deepep") for k in self.moe_dispatch):
            raise BadInput(f"moe_dispatch must be among a2a, tp_slice, deepep; got "
                           f"{', '.join(self.moe_dispatch) or 'none'}")
        check_low_bandwidth(self.local_steps, self.grad_compression, self.act_compression)


def check_low_bandwidth(local_steps, grad_compression, act_compression) -> None:
    """--local-steps an integer >= 1, the compressions fractions in (0, 1] (BadInput, one line)."""
    if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
        raise BadInput(f"--local-steps must be an integer >= 1 (inner steps between DiLoCo syncs), got {local_steps}")
    for flag, r in (("--grad-compression", grad_compression), ("--act-compression", act_compression)):
        if not (isinstance(r, (int, float)) and 0 < r <= 1):
            raise BadInput(f"{flag} must be a fraction in (0, 1] of the bytes sent (1: uncompressed), got {r}")


class EmptySpace(BadInput):
    """No plan satisfies the divisibility rules and the user's constraints (exit 2: the request itself
    cannot be met by any degree, whatever the memory)."""


@dataclass
class Space:
    plans: PlanArrays
    filters: list[tuple[str, int]] = field(default_factory=list)  # (rule, plans left after it)

    def __len__(self) -> int:
        return len(self.plans)


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _model_facts(model: ModelGraph) -> dict:
    att = [(layer.heads, layer.kv_heads) for layer in model.layers if layer.kind == "attention" and layer.heads]
    experts = sorted({layer.experts for layer in model.layers if layer.kind == "moe"})
    causal = all(layer.causal for layer in model.layers if layer.kind in ("attention", "encoder") and layer.trainable)
    return {"heads": sorted({a for a, _ in att}), "kv_heads": sorted({k for _, k in att if k}),
            "experts": experts, "blocks": model.num_blocks, "causal": causal}


class _Table:
    """Columns being cross-joined and filtered; records how many rows each named rule leaves."""

    def __init__(self, cols: dict[str, np.ndarray]):
        self.cols = {k: np.asarray(v) for k, v in cols.items()}
        self.log: list[tuple[str, int]] = [("devices", len(self))]

    def __len__(self) -> int:
        return len(next(iter(self.cols.values())))

    def keep(self, mask, rule: str) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.all():
            return
        self.cols = {k: v[mask] for k, v in self.cols.items()}
        self.log.append((rule, len(self)))
        if len(self) == 0:
            raise EmptySpace(f"no plan satisfies {rule}")

    def join(self, name: str, options) -> None:
        """Cross join with a column of options (every row repeated once per option)."""
        opts = np.asarray(options)
        n = len(self)
        self.cols = {k: np.repeat(v, len(opts)) for k, v in self.cols.items()}
        self.cols[name] = np.tile(opts, n)

    def join_rows(self, names: tuple[str, ...], rows: list[tuple]) -> None:
        """Cross join with a small table of option rows."""
        arr = np.asarray(rows)
        n = len(self)
        self.cols = {k: np.repeat(v, len(arr)) for k, v in self.cols.items()}
        for j, name in enumerate(names):
            self.cols[name] = np.tile(arr[:, j], n)


def enumerate_space(model: ModelGraph, cluster: Cluster, workload: Workload, c: Constraints = Constraints()
                    ) -> Space:
    """Every plan of the space, as PlanArrays (see the module docstring for the rules)."""
    c.check()
    n = cluster.device_count
    per_node = cluster.devices_per_node
    facts = _model_facts(model)
    blocks = facts["blocks"] or 1
    gbs, seq = workload.global_batch, workload.seq_len
    divs = divisors(n)

    def fixed_or(opts, fixed):
        return [fixed] if fixed is not None else opts

    # --- degrees: tp x pp x cp, dp = n / (tp pp cp) -----------------------------------------------------
    tp_o = np.array(fixed_or(divs, c.tp))
    pp_o = np.array(fixed_or(divs, c.pp))
    cp_o = np.array(fixed_or(divs, c.cp))
    t = _Table({"tp": tp_o})
    t.join("pp", pp_o)
    t.join("cp", cp_o)
    tp, pp, cp = t.cols["tp"], t.cols["pp"], t.cols["cp"]
    what = f"dp*tp*pp*cp = {n} devices"
    if c.tp is not None or c.pp is not None or c.cp is not None:
        what += f" with {' '.join(f'--{k} {getattr(c, k)}' for k in ('tp', 'pp', 'cp') if getattr(c, k))}"
    t.keep(n % (tp * pp * cp) == 0, what)
    t.cols["dp"] = n // (t.cols["tp"] * t.cols["pp"] * t.cols["cp"])
    if c.dp is not None:
        t.keep(t.cols["dp"] == c.dp, f"--dp {c.dp} (dp = {n} / (tp*pp*cp))")
    if not c.allow_cross_node_tp:
        t.keep(per_node % t.cols["tp"] == 0, f"tp within a node of {per_node} devices (--allow-cross-node-tp "
                                             "lifts this)")
    if c.max_tp is not None:
        t.keep(t.cols["tp"] <= c.max_tp, f"--max-tp {c.max_tp}")
    for a in facts["heads"]:
        t.keep(a % t.cols["tp"] == 0, f"tp dividing the {a} attention heads")
    for k in facts["kv_heads"]:
        t.keep(k % t.cols["tp"] == 0, f"tp dividing the {k} kv heads")
    t.keep(t.cols["pp"] <= blocks, f"pp <= {blocks} blocks")
    if c.max_pp is not None:
        t.keep(t.cols["pp"] <= c.max_pp, f"--max-pp {c.max_pp}")
    if c.cp is None:
        cap = c.max_cp if c.max_cp is not None else default_max_cp(seq)
        t.keep(t.cols["cp"] <= cap, f"cp <= {cap}" + ("" if c.max_cp is not None else " (--max-cp lifts this)"))
    t.keep((t.cols["cp"] == 1) | (seq % (2 * t.cols["cp"]) == 0), f"seq {seq} divisible by 2*cp")
    t.keep(gbs % t.cols["dp"] == 0, f"global batch {gbs} divisible by dp")

    # --- expert parallelism: ep | experts, etp in {tp, 1}, ep*etp | dp*cp*tp ----------------------------
    if facts["experts"]:
        g = 0
        for e in facts["experts"]:
            g = math.gcd(g, e)
        ep_o = fixed_or(divisors(g), c.ep)
        t.join("ep", np.array(ep_o))
        t.keep(g % t.cols["ep"] == 0, f"ep dividing the {g} experts")
        # etp sentinel 0 = same as tp (PlanArrays); 1 = experts not tensor-split (MoE parallel folding)
        t.join("etp", np.array([0, 1] if c.etp is None else [c.etp]))
        t.keep((t.cols["etp"] != 1) | (t.cols["tp"] > 1) | (c.etp == 1), "distinct etp")  # tp=1: 0 and 1 equal
        etp_eff = expert_tp(t.cols["etp"], t.cols["tp"])
        t.cols["etp"] = np.where(etp_eff == t.cols["tp"], 0, etp_eff)
        # MoE Parallel Folding (Liu et al. 2025; Megatron parallel_state.py): the MoE layers' etp x ep x edp
        # grid covers the same dp*cp*tp ranks of a stage as attention's tp x cp x dp, so ep*etp | dp*cp*tp
        # is the only rule; estimate() places the expert group at stride etp (with etp = 1, inside the tp
        # and cp ranks: ep may exceed dp*cp).
        t.keep(experts_fold_into_ranks(t.cols["ep"], t.cols["etp"], t.cols["dp"], t.cols["cp"], t.cols["tp"]),
               "ep*etp dividing dp*cp*tp")
        # Pipeline MoE (moe_dispatch tp_slice; Chen et al. 2023 section 3): E/tp whole experts on each TP rank,
        # which is ep = tp with etp = 1 over the TP group (ep | experts then makes tp divide them too)
        tp_slice = COLUMN["moe_tp_slice"]
        t.join(tp_slice.name, np.array(sorted({tp_slice.encode(k) for k in c.moe_dispatch})))
        t.keep(tp_slice_fits_degrees(t.cols["moe_tp_slice"], t.cols["tp"], t.cols["ep"], t.cols["etp"]),
               "tp_slice (Pipeline MoE) with tp > 1, ep = tp and etp = 1")
        # DeepEP (moe_dispatch deepep; comm.deduplicated_dispatch_time_s): only where the expert group spans
        # nodes (inside one it is the all-to-all) and routing is dropless (estimate.check_deepep)
        deepep_ok = "deepep" in c.moe_dispatch and workload.moe_capacity_factor is None
        t.join("moe_deepep", np.array(sorted({False} | ({True} if deepep_ok else set()))))
        # an all-to-all group off the node (with ep = 1 there is no exchange: DeepEP needs ep > 1)
        spans = (~t.cols["moe_tp_slice"] & (t.cols["ep"] * expert_tp(t.cols["etp"], t.cols["tp"]) > per_node)
                 & deepep_fits_ep(True, t.cols["ep"]))
        # where DeepEP is offered the all-to-all is never faster (same memory, no more bytes off the node:
        # tests/test_moe_deepep.py), so those plans would only crowd the space
        t.keep(np.where(t.cols["moe_deepep"], spans, ~(spans & deepep_ok)),
               "deepep exactly where an expert group spans nodes (there the all-to-all is never faster)")
        if "a2a" not in c.moe_dispatch:
            t.keep(t.cols["moe_tp_slice"] | t.cols["moe_deepep"],
                   f"--moe-dispatch {' or '.join(c.moe_dispatch)}" + (
                       " (deepep: an expert group spanning nodes, dropless routing)" if "deepep" in c.moe_dispatch
                       else ""))
        if c.fold is False:
            # without folding Megatron nests the expert group in the data-parallel group: etp = tp, ep | dp*cp.
            # tp_slice is Pipeline MoE's own layout (experts over the TP group, no all-to-all), kept apart.
            t.keep(t.cols["moe_tp_slice"] | (t.cols["etp"] == 0), "etp = tp (folding disabled)")
            t.keep(t.cols["moe_tp_slice"] | experts_nest_in_dp(t.cols["ep"], t.cols["dp"], t.cols["cp"]),
                   "ep dividing dp*cp (folding disabled)")
    else:
        if c.ep not in (None, 1):
            raise EmptySpace(f"--ep {c.ep}: model {model.name} has no MoE layers")
        if "a2a" not in c.moe_dispatch:
            raise EmptySpace(f"moe_dispatch {' or '.join(c.moe_dispatch)}: model {model.name} has no MoE layers")
        t.cols["ep"] = np.ones(len(t), dtype=np.int64)
        t.cols["etp"] = np.zeros(len(t), dtype=np.int64)
        t.cols["moe_tp_slice"] = np.zeros(len(t), dtype=bool)
        t.cols["moe_deepep"] = np.zeros(len(t), dtype=bool)

    # --- micro-batch size: mbs * dp | gbs ----------------------------------------------------------------
    mbs_o = [m for m in divisors(gbs) if c.max_mbs is None or m <= c.max_mbs] if c.mbs is None else [c.mbs]
    t.join("mbs", np.array(mbs_o))
    t.keep(gbs % (t.cols["mbs"] * t.cols["dp"]) == 0, f"global batch {gbs} divisible by mbs*dp")
    m = gbs // (t.cols["mbs"] * t.cols["dp"])
    t.keep(m <= MAX_MICROBATCHES, f"at most {MAX_MICROBATCHES:,} micro-batches per step (planner.core.limits)")
    m = gbs // (t.cols["mbs"] * t.cols["dp"])

    # --- schedule and vpp ---------------------------------------------------------------------------------
    virtual = schedules_with("virtual_stages")
    rows = []
    scheds = [c.schedule] if c.schedule else list(SEARCHED_SCHEDULES)  # asynchronous ones only when asked
    max_vpp = c.max_vpp or blocks
    for s in scheds:
        si = SCHEDULES.index(s)
        if s in virtual:  # vpp 1 there runs the plain schedule's order, enumerated under its own name
            vpps = [c.vpp] if c.vpp is not None else list(range(2, min(max_vpp, blocks) + 1))
            rows += [(si, v) for v in vpps]
        elif c.vpp in (None, 1):
            rows.append((si, 1))
    if not rows:
        raise EmptySpace(f"no schedule takes --vpp {c.vpp}")
    t.join_rows(("schedule", "vpp"), rows)
    t.cols["m"] = np.repeat(m, len(rows))
    sched, vpp, pp = t.cols["schedule"], t.cols["vpp"], t.cols["pp"]
    if c.schedule is None:
        t.keep((pp > 1) | (sched == SCHEDULES.index("1f1b")), "one schedule when pp = 1")
        sched, vpp, pp = t.cols["schedule"], t.cols["vpp"], t.cols["pp"]
    t.keep(pp * vpp <= blocks, f"pp*vpp <= {blocks} blocks")
    t.keep(microbatches_fit_schedule(t.cols["schedule"], t.cols["m"], t.cols["pp"]),
           "interleaving with at least pp micro-batches")

    # --- ZeRO, sequence parallel, recompute, offload ------------------------------------------------------
    t.join("zero", np.array(fixed_or(list(ZERO_STAGES), c.zero)))
    # DiLoCo / SparseLoCo keep an unsharded optimizer per replica (dims.local_sgd_fits_zero)
    t.keep(local_sgd_fits_zero(c.local_steps, c.grad_compression, t.cols["zero"]), "zero 0 with local steps or "
           "gradient compression")
    t.join("sp", np.array(fixed_or([False, True], c.sp)))
    t.keep(sp_fits_tp(t.cols["sp"], t.cols["tp"]), "sp only with tp > 1")
    rec_rows = [(POLICIES.index(r), -1) for r in fixed_or(list(POLICIES), c.recompute)]
    if c.partial_recompute and c.recompute in (None, "full"):
        rec_rows += [(POLICIES.index("full"), k) for k in PARTIAL_RECOMPUTE_LAYERS if k < blocks]
    t.join_rows(("recompute", "recompute_num_layers"), rec_rows)
    per_chunk = -(-blocks // (t.cols["pp"] * t.cols["vpp"]))  # blocks in the largest chunk
    t.keep(t.cols["recompute_num_layers"] < per_chunk, "partial recompute below the blocks of a chunk")
    t.join("offload_optimizer", np.array(c.offload_optimizer, dtype=float))
    t.join("offload_activations", np.array(c.offload_activations, dtype=float))
    # sequence-chunked pipelines: only where a pipeline has a bubble to fill (pp > 1), with the chunk orders
    # pipeline.py has (gpipe, 1f1b), a fused attention core and causal attention (estimate.check_seq_chunks),
    # chunks that divide the sequence (and each over the 2*cp load-balanced halves)
    t.join("seq_chunks", np.array(sorted(set(c.seq_chunks)), dtype=np.int64))
    if (t.cols["seq_chunks"] > 1).any():
        nck = t.cols["seq_chunks"]
        ok = ((t.cols["pp"] > 1) & facts["causal"] & seq_chunks_fit_schedule(t.cols["schedule"], nck)
              & seq_chunks_fit_attention(nck, c.flash_attention))
        t.keep((nck == 1) | ok, f"seq_chunks > 1 with pp > 1, {' or '.join(schedules_with('sequence_chunks'))}, "
                                "flash and causal attention")
        nck = t.cols["seq_chunks"]
        t.keep(seq % (nck * np.where(t.cols["cp"] > 1, 2 * t.cols["cp"], 1)) == 0,
               f"seq {seq} divisible by seq_chunks (times 2*cp)")
        if workload.documents is not None:  # estimate._attention_factors: chunk costs assume one document
            t.keep(t.cols["seq_chunks"] == 1, "seq_chunks 1 with documents")
    # DistCA's attention pool balances documents' attention across replicas: without documents it only adds
    # traffic, so it is tried only for workloads that have them
    t.join("attention_pool", np.array(sorted(set(c.attention_pool)), dtype=bool))
    t.keep(~t.cols["attention_pool"] | (workload.documents is not None), "attention_pool with documents")
    # context-parallel exchange: the ring, or Ulysses all-to-all where tp*cp divides every head count
    a2a = COLUMN["cp_a2a"]
    t.join(a2a.name, np.array(sorted({a2a.encode(k) for k in c.cp_comm})))
    ok = ulysses_fits_cp(t.cols["cp_a2a"], t.cols["cp"])
    for a in facts["heads"]:
        ok = ok & (~t.cols["cp_a2a"] | (a % (t.cols["tp"] * t.cols["cp"]) == 0))
    t.keep(ok, "Ulysses (cp_comm a2a) with cp > 1 and tp*cp dividing the heads")

    # what the search does not choose: the software stack's flags, the micro-batch count (from the batch)
    stack = {"num_microbatches": COLUMN["num_microbatches"].encode(None), "flash_attention": c.flash_attention,
             "overlap_grad_reduce": c.overlap_grad_reduce, "overlap_tp_comm": c.overlap_tp_comm,
             "local_steps": c.local_steps, "grad_compression": c.grad_compression, "act_compression": c.act_compression}
    plans = PlanArrays(**{name: col for name, col in t.cols.items() if name in COLUMN}, **stack)
    return Space(plans=plans, filters=t.log)


# ---------------------------------------------------------------------------------------------------------
# memory lower bound


def _row_groups(*cols) -> tuple[np.ndarray, np.ndarray]:
    """(first row of each distinct combination, group id of every row): batch_ids.row_ids, which packs the
    columns into one integer key instead of np.unique(axis=0)'s sort of a structured view (15 of the 44 s a
    DeepSeek-V3 search on 1,024 GPUs took)."""
    return row_ids(list(cols))


def _stage_inflight(schedule: str, p: int, m: int, v: int, n: int = 1) -> tuple[float, float, float]:
    """Micro-batches in flight at the peak of the first stage, the last stage, and the fewest on any stage
    (pipeline.inflight_microbatches; the unit estimate._stage_memory multiplies one micro-batch's activations of
    the whole stage by)."""
    per_stage = [inflight_microbatches(schedule, p, m, st, v, n) for st in range(p)]
    return per_stage[0], per_stage[-1], min(per_stage)


# the regions of the model a bound stage holds: the layers before the first block, the blocks, those after
_PRE, _BLOCKS, _POST = range(3)
_SMALLEST_BLOCK = 3  # the column after them in the by-region tables


@dataclass
class _LayerShapes:
    """The model's layers by shape (identical layers, Layer.shape_key, cost the same): one representative
    per shape, how many of each shape every region holds (count, (3, shapes)) and every block holds
    (per_block, (blocks, shapes)), and each distinct block's list of shape ids (its backward working set;
    405B's 126 blocks are one shape, and evaluating each took 9 of the 13 s an infeasible 8-GPU search
    spent)."""
    shapes: list
    count: np.ndarray
    per_block: np.ndarray
    block_shapes: list
    blocks: int

    def values(self, fn) -> np.ndarray:
        """fn of every shape's representative layer, as floats."""
        return np.array([float(fn(layer)) for layer in self.shapes])

    def by_region(self, per_shape: np.ndarray) -> list[float]:
        """A per-shape value summed over each region, then over the smallest block: [pre, blocks, post,
        smallest block]."""
        return [*(self.count @ per_shape), (self.per_block @ per_shape).min()]


def _layer_shapes(model: ModelGraph) -> _LayerShapes:
    """The model's layers grouped by shape and region (see _LayerShapes)."""
    ids: dict = {}
    shapes: list = []
    placed = []  # per layer: (shape id, region, block)
    seen_block = False
    for layer in model.topological():
        sid = ids.setdefault(layer.shape_key, len(shapes))
        if sid == len(shapes):
            shapes.append(layer)
        seen_block = seen_block or layer.block is not None
        region = _BLOCKS if layer.block is not None else (_POST if seen_block else _PRE)
        placed.append((sid, region, layer.block))
    blocks = sorted({b for _, r, b in placed if r == _BLOCKS})
    at = {b: i for i, b in enumerate(blocks)}
    count = np.zeros((3, len(shapes)))
    per_block = np.zeros((max(len(blocks), 1), len(shapes)))
    block_shapes: list = [[] for _ in blocks]
    for sid, r, b in placed:
        count[r, sid] += 1
        if r == _BLOCKS:
            per_block[at[b], sid] += 1
            block_shapes[at[b]].append(sid)
    distinct = [list(s) for s in sorted({tuple(s) for s in block_shapes})]  # equal lists: equal working sets
    return _LayerShapes(shapes, count, per_block, distinct, len(blocks))


def _params_by_region(ls: _LayerShapes, pa: PlanArrays, etp: np.ndarray, e_w: int) -> tuple:
    """By region ([pre, blocks, post, smallest block]): trainable parameters per device
    (Layer.params_per_device over tp, ep, etp) and frozen weight bytes (split tp ways only, estimate._stage_memory),
    (groups, 4) each, one row per distinct (tp, ep, etp); and every plan's row."""
    trainable = ls.values(lambda layer: layer.trainable)
    first, gid = _row_groups(pa.tp, pa.ep, etp)
    par = np.empty((len(first), 4))
    froz = np.empty((len(first), 4))
    for gi, r in enumerate(first.tolist()):
        tp_, ep_, etp_ = int(pa.tp[r]), int(pa.ep[r]), int(etp[r])
        par[gi] = ls.by_region(ls.values(lambda layer: layer.params_per_device(tp=tp_, ep=ep_, etp=etp_))
                               * trainable)
        froz[gi] = ls.by_region(ls.values(lambda layer: layer.params_per_device(tp=tp_)) * e_w * (1 - trainable))
    return par, froz, gid


def _activations_by_region(ls: _LayerShapes, pa: PlanArrays, seq_len: int, e_act: int) -> tuple:
    """One micro-batch's kept activations by region ((groups, 4), as _params_by_region), the smallest
    block's backward working set (groups,) and the loss logits copy by region (groups, 3), one row per
    distinct combination of their inputs; and every plan's row. Partial recompute keeps, per layer, no less
    than the smaller of its full and no-recompute activations, and its working set is no less than a
    block's gradients alone (the no-recompute one)."""
    partial = pa.recompute_num_layers >= 0
    first, gid = _row_groups(pa.mbs, pa.tp, pa.cp, pa.sp, pa.flash_attention, pa.recompute, partial,
                             pa.moe_tp_slice, pa.seq_chunks)
    act = np.empty((len(first), 4))
    work = np.zeros(len(first))
    logit = np.empty((len(first), 3))
    for gi, r in enumerate(first.tolist()):
        b, tp_, cp_, sp_ = int(pa.mbs[r]), int(pa.tp[r]), int(pa.cp[r]), bool(pa.sp[r])
        s_ = seq_len // int(pa.seq_chunks[r])  # estimate._stage_memory: one work item's tokens (ParallelPlan.seq_chunks)
        flash, ts_ = bool(pa.flash_attention[r]), bool(pa.moe_tp_slice[r])

        def kept(policy):
            # estimate._stage_memory: a tp_slice MoE layer keeps its activations without SP's split (moe.layer_sp)
            return ls.values(lambda layer: layer.activation_bytes(b, s_, tp_, cp_, moe.layer_sp(layer.kind, sp_, ts_),
                                                                  policy, e_act, flash=flash))

        none = kept("none")
        if partial[r]:
            a, held = np.minimum(kept("full"), none), none
        else:
            a = held = kept(POLICIES[int(pa.recompute[r])])
        act[gi] = ls.by_region(a)
        if ls.block_shapes:
            work[gi] = min(float(memory.backward_working_bytes(none[ids], held[ids])) for ids in ls.block_shapes)
        logit[gi] = ls.count @ ls.values(lambda layer: layer.logits_transient_bytes(b, s_, tp_, cp_, e_act))
    return act, work, logit, gid


def _inflight_bounds(pa: PlanArrays, workload: Workload) -> tuple:
    """Micro-batches in flight on the mean, the first and the last bound stage ((groups, 3): the fewest on
    any stage, the first stage's, the last stage's; _stage_inflight), one row per distinct pipeline; and
    every plan's row."""
    m = np.where(pa.num_microbatches > 0, pa.num_microbatches,
                 np.maximum(1, workload.global_batch // (pa.mbs * pa.dp)))
    first, gid = _row_groups(pa.schedule, pa.pp, pa.vpp, m, pa.seq_chunks)
    infl = [_stage_inflight(SCHEDULES[int(pa.schedule[r])], int(pa.pp[r]), int(m[r]), int(pa.vpp[r]),
                            int(pa.seq_chunks[r])) for r in first.tolist()]
    return np.array(infl, dtype=float).reshape(-1, 3)[:, [2, 0, 1]], gid


@dataclass
class _BoundTables:
    """What memory_lower_bound's stages are built from: per-group tables (by region, see
    _params_by_region) with each plan's group, and the per-plan columns the stages scale them by."""
    params: np.ndarray
    frozen: np.ndarray
    weights_group: np.ndarray
    activations: np.ndarray
    working: np.ndarray
    logits: np.ndarray
    activations_group: np.ndarray
    inflight: np.ndarray
    inflight_group: np.ndarray
    pp: np.ndarray  # as floats
    fewest_blocks: np.ndarray  # on a stage: split_chunks' even split, floor(blocks / (pp vpp)) x vpp
    shard: np.ndarray


def _bound_tables(ls: _LayerShapes, pa: PlanArrays, workload: Workload) -> _BoundTables:
    """The tables of every plan (_BoundTables), in estimate._stage_memory's dtype sizes."""
    etp = expert_tp(pa.etp, pa.tp)
    par, froz, by_w = _params_by_region(ls, pa, etp, dtypes.weight_bytes(workload.dtype))
    act, work, logit, by_a = _activations_by_region(ls, pa, workload.seq_len, dtypes.activation_bytes(workload.dtype))
    infl, by_i = _inflight_bounds(pa, workload)
    # states of all parameters sharded over the larger of dp x cp (dense) and EDP (routed) are no more than
    # memory_phase.model_states' split ones (a share falls as its group grows)
    shard = np.maximum(pa.dp * pa.cp, memory_phase.expert_data_parallel(pa.dp, pa.cp, pa.tp, pa.ep, etp))
    return _BoundTables(par, froz, by_w, act, work, logit, by_a, infl, by_i, pa.pp.astype(float),
                        (ls.blocks // (pa.pp * pa.vpp)) * pa.vpp, shard)


def _three_stages(table: np.ndarray, group: np.ndarray, pp: np.ndarray, blocks: np.ndarray | None) -> np.ndarray:
    """(plans, 3): a by-region table's value on the mean stage (all regions / pp) and on the first and the
    last stage (pre or post, plus `blocks` smallest blocks; None: no block, the logits copy)."""
    out = np.empty((len(group), 3))
    np.divide((table[:, _PRE] + table[:, _BLOCKS] + table[:, _POST])[group], pp, out=out[:, 0])
    pre, post = table[group, _PRE], table[group, _POST]
    if blocks is None:
        out[:, 1], out[:, 2] = pre, post
        return out
    blocks = blocks * table[group, _SMALLEST_BLOCK]
    np.add(pre, blocks, out=out[:, 1])
    np.add(post, blocks, out=out[:, 2])
    return out


def _bound_stages(t: _BoundTables, rows, pa: PlanArrays) -> memory_phase.StageInputs:
    """The memory phase's inputs of the plans `rows` (an index array or a slice) for three stages that no
    real stage of theirs is below (memory_lower_bound): the mean, the lightest first, the lightest last."""
    pp, nb = t.pp[rows], t.fewest_blocks[rows]
    by_w, by_a = t.weights_group[rows], t.activations_group[rows]
    none = np.zeros((1, 1))  # terms the bound leaves out: ring buffers, chunked K/V (both >= 0)
    column = lambda a: a[rows][:, None]  # noqa: E731  a per-plan column, (plans, 1)
    return memory_phase.StageInputs(
        params_count=_three_stages(t.params, by_w, pp, nb), frozen_bytes=_three_stages(t.frozen, by_w, pp, nb),
        activation_bytes=_three_stages(t.activations, by_a, pp, nb), working_bytes=t.working[by_a][:, None],
        # the ends count their own extra layers' logits copy only (a block's, >= 0, is left out)
        logits_bytes=_three_stages(t.logits, by_a, pp, None), inflight_items=t.inflight[t.inflight_group[rows]],
        # expert_params 0: states of all parameters over `shard` (_BoundTables), model_states' first path
        expert_params_count=none, dp_cp=column(t.shard), edp=column(t.shard),
        ring_bytes=none, kv_full_bytes=none, kv_rest_bytes=none, seq_chunks=np.ones((1, 1)),
        offload_activations=column(pa.offload_activations), offload_optimizer=column(pa.offload_optimizer))


def memory_lower_bound(model: ModelGraph, workload: Workload, pa: PlanArrays) -> np.ndarray:
    """Bytes per device that estimate()'s peak memory is never below, for every plan of the space (no
    explicit partition).

    The memory phase (memory_phase.stage_memory) takes the worst pipeline stage: overhead(states + frozen +
    activations x in-flight + transients); the overhead is nondecreasing, every other term nondecreasing in
    the layers a stage holds. So the peak is at least the phase's peak over three stages (_bound_stages):
      - the mean stage: 1/pp of the whole model, with the fewest micro-batches in flight on any stage;
      - the first stage: the layers before the first block (embedding, frozen encoders) plus the fewest
        blocks split_chunks gives a stage (floor(blocks / (pp vpp)) per chunk, vpp chunks), each at the
        smallest block's parameters and activations, with the first stage's micro-batches in flight;
      - the last stage: the same with the layers after the last block (final norm, LM head: a 128k
        vocabulary's fp32 logits) and the last stage's micro-batches in flight.
    Each adds the smallest block's backward working set (every stage runs some block's backward) and the
    loss logits copy of its layers (the mean stage 1/pp of it: it sits on one stage).
    tests/test_search.py holds the bound below estimate()'s peak.
    """
    tables = _bound_tables(_layer_shapes(model), pa, workload)
    e_w, g_bytes = dtypes.weight_bytes(workload.dtype), dtypes.gradient_bytes(workload.grad_dtype)
    stages = np.unique(pa.zero).tolist()
    peak = np.empty(len(pa))
    for z in stages:  # the phase takes one ZeRO stage per call
        rows = slice(None) if len(stages) == 1 else np.flatnonzero(pa.zero == z)
        x = _bound_stages(tables, rows, pa)
        peak[rows] = memory_phase.stage_memory(x, z, e_w, g_bytes, workload.optimizer).peak_bytes()
    return peak
