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

from planner.core.dims import (COLUMN, SCHEDULE_INDEX, ZERO_STAGES, deepep_fits_ep, experts_fold_into_ranks,
                               experts_nest_in_dp, expert_tp,
                               microbatches_fit_schedule, schedules_with, seq_chunks_fit_attention,
                               seq_chunks_fit_schedule, sp_fits_tp, tp_slice_fits_degrees, ulysses_fits_cp,
                               vpp_fits_schedule)
from planner.core import dtypes
from planner.cost import memory, moe
from planner.cost.batch import POLICIES, SCHEDULES, PlanArrays
from planner.cost.batch_ids import _row_ids
from planner.cost.pipeline import inflight_microbatches
from planner.core.errors import BadInput
from planner.core.hardware import Cluster
from planner.core.limits import MAX_MICROBATCHES
from planner.core.model import ModelGraph
from planner.core.plan import Workload

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
        # nodes (inside one it is the all-to-all) and routing is dropless (estimate._check_deepep)
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
    scheds = [c.schedule] if c.schedule else list(SCHEDULES)
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
           "interleaving with micro-batches a multiple of pp")

    # --- ZeRO, sequence parallel, recompute, offload ------------------------------------------------------
    t.join("zero", np.array(fixed_or(list(ZERO_STAGES), c.zero)))
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
    # pipeline.py has (gpipe, 1f1b), a fused attention core and causal attention (estimate._check_seq_chunks),
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
             "overlap_grad_reduce": c.overlap_grad_reduce, "overlap_tp_comm": c.overlap_tp_comm}
    plans = PlanArrays(**{name: col for name, col in t.cols.items() if name in COLUMN}, **stack)
    return Space(plans=plans, filters=t.log)


# ---------------------------------------------------------------------------------------------------------
# memory lower bound


def _row_groups(*cols) -> tuple[np.ndarray, np.ndarray]:
    """(first row of each distinct combination, group id of every row): batch_ids._row_ids, which packs the
    columns into one integer key instead of np.unique(axis=0)'s sort of a structured view (15 of the 44 s a
    DeepSeek-V3 search on 1,024 GPUs took)."""
    return _row_ids(list(cols))


def _stage_inflight(schedule: str, p: int, m: int, v: int, n: int = 1) -> tuple[float, float, float]:
    """Micro-batches in flight at the peak of the first stage, the last stage, and the fewest on any stage
    (pipeline.inflight_microbatches; the unit estimate._memory multiplies one micro-batch's activations of
    the whole stage by)."""
    per_stage = [inflight_microbatches(schedule, p, m, st, v, n) for st in range(p)]
    return per_stage[0], per_stage[-1], min(per_stage)


def memory_lower_bound(model: ModelGraph, workload: Workload, pa: PlanArrays) -> np.ndarray:
    """Bytes per device that estimate()'s peak memory is never below, for every plan of the space (no
    explicit partition).

    estimate._memory takes the worst pipeline stage: overhead(states + frozen + activations x in-flight),
    with states = memory.model_state_bytes(stage params, dp*cp, zero); the overhead is affine and
    increasing, every other term linear in the layers a stage holds. So the peak is at least each of:
      - the mean stage: the same functions on 1/pp of the whole model, with the fewest micro-batches in
        flight on any stage;
      - the first stage: the layers before the first block (embedding, frozen encoders) plus the fewest
        blocks split_chunks gives a stage (floor(blocks / (pp vpp)) per chunk, vpp chunks), each at the
        smallest block's parameters and activations, with the first stage's micro-batches in flight;
      - the last stage: the same with the layers after the last block (final norm, LM head: a 128k
        vocabulary's fp32 logits) and the last stage's micro-batches in flight.
    Partial recompute keeps, per layer, no less than the smaller of its full and no-recompute activations.
    Each candidate adds the smallest block's backward working set (every stage runs some block's
    backward; under partial recompute its gradients alone) and the loss logits copy of its layers (the
    mean stage 1/pp of it: it sits on one stage).
    tests/test_search.py holds the bound below estimate()'s peak.
    """
    e_w = dtypes.weight_bytes(workload.dtype)  # estimate._memory's dtype sizes
    e_act = dtypes.activation_bytes(workload.dtype)
    g_bytes = dtypes.gradient_bytes(workload.grad_dtype)
    s = workload.seq_len
    P = len(pa)
    etp = np.where(pa.etp > 0, pa.etp, pa.tp)
    # identical layers (shape_key) cost the same; where each layer sits: before, in, after the blocks
    shape_ids: dict = {}
    shapes = []
    region = []  # per layer: (shape id, region 0 pre / 1 block / 2 post, block index)
    seen_block = False
    for layer in model.topological():
        sid = shape_ids.setdefault(layer.shape_key, len(shapes))
        if sid == len(shapes):
            shapes.append(layer)
        if layer.block is not None:
            seen_block = True
        region.append((sid, 1 if layer.block is not None else (2 if seen_block else 0), layer.block))
    S = len(shapes)
    blocks = sorted({b for _, r, b in region if r == 1})
    bpos = {b: i for i, b in enumerate(blocks)}
    count = np.zeros((3, S))  # layers of each shape per region
    per_block = np.zeros((max(len(blocks), 1), S))  # layers of each shape in each block
    block_shapes: list = [[] for _ in blocks]  # each block's layers' shapes (the backward working set)
    for sid, r, b in region:
        count[r, sid] += 1
        if r == 1:
            per_block[bpos[b], sid] += 1
            block_shapes[bpos[b]].append(sid)
    # identical blocks list the same shapes: their working sets are equal, so one of each is enough
    # (405B's 126 blocks are one shape; evaluating each took 9 of the 13 s an infeasible 8-GPU search spent)
    block_shapes = [list(ids) for ids in sorted({tuple(ids) for ids in block_shapes})]
    trainable = np.array([layer.trainable for layer in shapes], dtype=float)

    def shape_vals(fn) -> np.ndarray:
        return np.array([float(fn(layer)) for layer in shapes])

    # per plan: trainable params per device and frozen weight bytes by region; smallest block
    # (each loop fills one row per group of equal inputs; the plans take their group's row by index)
    first, gid = _row_groups(pa.tp, pa.ep, etp)
    par = np.empty((len(first), 4))  # pre, blocks total, post, smallest block
    froz = np.empty((len(first), 4))
    for gi, r in enumerate(first.tolist()):
        tp_, ep_, etp_ = int(pa.tp[r]), int(pa.ep[r]), int(etp[r])
        p = shape_vals(lambda layer: layer.params_per_device(tp=tp_, ep=ep_, etp=etp_)) * trainable
        f = shape_vals(lambda layer: layer.params_per_device(tp=tp_)) * e_w * (1 - trainable)
        par[gi] = [*(count @ p), (per_block @ p).min()]
        froz[gi] = [*(count @ f), (per_block @ f).min()]
    par, froz = par[gid], froz[gid]

    # per plan: activations of one micro-batch, by region and smallest block; the smallest block's backward
    # working set (every stage runs at least one block's backward); the loss logits copy by region
    partial = pa.recompute_num_layers >= 0
    first, gid = _row_groups(pa.mbs, pa.tp, pa.cp, pa.sp, pa.flash_attention, pa.recompute, partial, pa.moe_tp_slice,
                             pa.seq_chunks)
    act = np.empty((len(first), 4))
    work = np.zeros(len(first))
    logit = np.empty((len(first), 3))
    for gi, r in enumerate(first.tolist()):
        b, tp_, cp_, sp_ = int(pa.mbs[r]), int(pa.tp[r]), int(pa.cp[r]), bool(pa.sp[r])
        s_ = s // int(pa.seq_chunks[r])  # estimate._memory: one work item's tokens (ParallelPlan.seq_chunks)
        flash, ts_ = bool(pa.flash_attention[r]), bool(pa.moe_tp_slice[r])

        def one(policy):
            # estimate._memory: a tp_slice MoE layer keeps its activations without SP's split (moe.layer_sp)
            return shape_vals(lambda layer: layer.activation_bytes(b, s_, tp_, cp_, moe.layer_sp(layer.kind, sp_, ts_),
                                                                   policy, e_act, flash=flash))

        none = one("none")
        if partial[r]:
            a = np.minimum(one("full"), none)
            kept = none  # a block's working set is never below its gradients alone (the no-recompute one)
        else:
            a = one(POLICIES[int(pa.recompute[r])])
            kept = a
        act[gi] = [*(count @ a), (per_block @ a).min()]
        if block_shapes:
            work[gi] = min(float(memory.backward_working_bytes(none[ids], kept[ids])) for ids in block_shapes)
        lg = shape_vals(lambda layer: layer.logits_transient_bytes(b, s_, tp_, cp_, e_act))
        logit[gi] = count @ lg
    act, work, logit = act[gid], work[gid], logit[gid]

    # micro-batches in flight: first stage, last stage, fewest on any stage
    m = np.where(pa.num_microbatches > 0, pa.num_microbatches,
                 np.maximum(1, workload.global_batch // (pa.mbs * pa.dp)))
    first, gid = _row_groups(pa.schedule, pa.pp, pa.vpp, m, pa.seq_chunks)
    infl = np.array([_stage_inflight(SCHEDULES[int(pa.schedule[r])], int(pa.pp[r]), int(m[r]), int(pa.vpp[r]),
                                     int(pa.seq_chunks[r])) for r in first.tolist()], dtype=float).reshape(-1, 3)[gid]

    pp = pa.pp.astype(float)
    nb = (len(blocks) // (pa.pp * pa.vpp)) * pa.vpp  # fewest blocks on a stage (split_chunks' even split)
    total = par[:, 0] + par[:, 1] + par[:, 2]
    candidates = [  # (params, frozen bytes, activation bytes of one micro-batch, in flight, logits copy)
        (total / pp, (froz[:, 0] + froz[:, 1] + froz[:, 2]) / pp, (act[:, 0] + act[:, 1] + act[:, 2]) / pp,
         infl[:, 2], (logit[:, 0] + logit[:, 1] + logit[:, 2]) / pp),
        (par[:, 0] + nb * par[:, 3], froz[:, 0] + nb * froz[:, 3], act[:, 0] + nb * act[:, 3], infl[:, 0],
         logit[:, 0]),
        (par[:, 2] + nb * par[:, 3], froz[:, 2] + nb * froz[:, 3], act[:, 2] + nb * act[:, 3], infl[:, 1],
         logit[:, 2]),
    ]
    best = np.zeros(P)
    # estimate._memory shards dense states over dp*cp and routed experts over EDP = dp*cp*tp/(ep*etp): the
    # larger of the two bounds both from below
    shard = np.maximum(pa.dp * pa.cp, pa.dp * pa.cp * pa.tp // (pa.ep * etp))
    for params, frozen, acts, inflight, logits in candidates:
        states = np.empty(P)
        for z in np.unique(pa.zero).tolist():
            sel = pa.zero == z
            st = memory.model_state_bytes(params[sel], shard[sel], z, weight_dtype_bytes=e_w,
                                          grad_dtype_bytes=g_bytes, optimizer=workload.optimizer)
            states[sel] = st["weights"] + st["gradients"] + st["optimizer"] * (1 - pa.offload_optimizer[sel])
        subtotal = states + frozen + acts * inflight * (1 - pa.offload_activations) + work + logits
        best = np.maximum(best, subtotal + memory.allocator_overhead_bytes(subtotal))
    return best
