"""What a user asks for (Workload), what the planner decides (ParallelPlan), what it predicts (Estimate),
and the plan file that `estimate`, `export`, `simulate` and `validate` read (docs/ARCHITECTURE.md#concepts and docs/ARCHITECTURE.md#contracts)."""
from __future__ import annotations

import math
import numbers
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from planner.core.dims import (
    COLUMN,
    CP_COMMS,
    MOE_DISPATCHES,
    RECOMPUTE_POLICIES,
    SCHEDULE_INDEX,
    SCHEDULES,
    ZERO_STAGES,
    deepep_fits_ep,
    local_sgd_fits_zero,
    quoted_names,
    recompute_layers_fit_policy,
    seq_chunks_fit_attention,
    seq_chunks_fit_schedule,
    sp_fits_tp,
    tp_slice_fits_degrees,
    ulysses_fits_cp,
    vpp_fits_schedule,
)
from planner.core.errors import BadInput

# planner/core/dims.py declares the choices and their rules
Schedule = Literal[SCHEDULES]
RecomputePolicy = Literal[RECOMPUTE_POLICIES]
TrainDtype = Literal["bf16", "fp16", "fp8", "fp32"]
Optimizer = Literal["adamw", "adam", "sgd"]

PLAN_SCHEMA_VERSION = 1


class DocumentMix(BaseModel):
    """Variable-length documents packed into every sequence, each under its own causal mask: log-normal lengths
    with this mean, capped at max_tokens (None: the sequence), seeded (attention_balance.sample_documents)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    mean_tokens: PositiveInt
    max_tokens: PositiveInt | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _max_not_below_mean(self) -> DocumentMix:
        if self.max_tokens is not None and self.max_tokens < self.mean_tokens:
            raise ValueError(f"documents: max_tokens {self.max_tokens} is below mean_tokens {self.mean_tokens}; "
                             "give a maximum at least the mean")
        return self


class Workload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    global_batch: PositiveInt = Field(description="sequences per optimizer step")
    seq_len: PositiveInt
    dtype: TrainDtype = "bf16"
    optimizer: Optimizer = "adamw"
    grad_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # Megatron keeps fp32 main grads by default
    # MoE routing (planner/cost/moe.py): tokens per expert capped at capacity_factor x the mean, overflow
    # dropped (Switch section 2.2; Megatron --moe-expert-capacity-factor); None: dropless. imbalance: the
    # busiest expert's load over the mean (>= 1; 1 = balanced, as Megatron's benchmarks force).
    # The capacity factor is at least 1: below it every expert, the busiest included, would process fewer
    # tokens than the balanced share, so the step would run fewer expert FLOPs than the model's, and the cost
    # model (which times the busiest expert at min(imbalance, CF) x the mean, moe.expert_load) would report
    # an MFU above 1 (CF 0.01 gave 157%, 165% on mixtral-8x7b). Trained configurations use 1.0-2.0 (Switch section 2.2: 1.0-1.25;
    # GShard section 3.2: 2); 64 is far past any, and past it routing is dropless in effect.
    moe_capacity_factor: float | None = Field(None, ge=1.0, le=64.0)
    # at most 1024: the busiest expert takes at most every token, E/k times the mean (Switch section 2.2), and
    # E/k is far below that in every catalog model (DeepSeek-V3: 256 / 8 = 32)
    moe_imbalance: float = Field(1.0, ge=1.0, le=1024.0)
    # None: every sequence is one document (causal over all of it); else documents of varying length, whose
    # attention work differs between data-parallel replicas (planner/cost/attention_balance.py)
    documents: DocumentMix | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


class OffloadPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    optimizer: float = Field(0.0, ge=0, le=1, description="fraction of optimizer states on the host")
    activations: float = Field(0.0, ge=0, le=1, description="fraction of saved activations on the host")


class StageAssignment(BaseModel):
    """One pipeline stage: the blocks it runs and, on heterogeneous clusters, the devices serving it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layers: tuple[NonNegativeInt, NonNegativeInt] = Field(description="[first, last) transformer block indices")
    device_type: str | None = None
    devices: list[NonNegativeInt] | None = None

    @field_validator("layers")
    @classmethod
    def _in_order(cls, v):
        if v[1] < v[0]:
            raise ValueError(f"a stage runs blocks [first, last) with first <= last, got {list(v)}")
        return v


class ParallelPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    dp: PositiveInt = 1
    tp: PositiveInt = 1
    pp: PositiveInt = 1
    vpp: PositiveInt = 1
    cp: PositiveInt = 1
    ep: PositiveInt = 1
    etp: PositiveInt | None = None  # expert tensor parallel; None: same as tp
    sp: bool = False
    zero: Literal[ZERO_STAGES] = 0
    mbs: PositiveInt = 1
    num_microbatches: PositiveInt | None = None  # None: global_batch / (mbs * dp)
    recompute: RecomputePolicy = "none"
    # With recompute "full": how many blocks of each pipeline chunk are recomputed, the rest keep their
    # activations (Megatron --recompute-method block --recompute-num-layers N). None: every block.
    recompute_num_layers: NonNegativeInt | None = None
    offload: OffloadPolicy = OffloadPolicy()
    schedule: Schedule = "1f1b"
    flash_attention: bool = True  # False: unfused softmax attention (Megatron before 2022)
    overlap_grad_reduce: bool = False  # Megatron's default; FSDP overlaps by design (zero 3)
    # Tensor-parallel all-gather / reduce-scatter split into chunks that run under the neighbouring GEMMs
    # (Megatron --tp-comm-overlap with Transformer Engine userbuffers; torchtitan's async TP).
    overlap_tp_comm: bool = False
    # How context parallel exchanges attention inputs: "ring" passes K/V blocks round the cp ring under the
    # attention core (Liu et al. 2023; Megatron); "a2a" re-shards sequence <-> heads with all-to-alls
    # (DeepSpeed-Ulysses, Jacobs et al. 2023), needing cp | heads/tp.
    cp_comm: Literal[CP_COMMS] = "ring"
    # How MoE layers reach their experts: "a2a" dispatches and combines tokens with all-to-alls over the ep
    # group (Megatron, DeepSpeed-MoE); "tp_slice" is Pipeline MoE's (Chen et al. 2023, arXiv 2304.11414,
    # section 3): E/tp whole experts on each TP rank, each rank picks its experts' tokens from the replicated
    # input by index and one TP all-reduce combines them (no all-to-all). Needs tp > 1, ep = tp, etp = 1.
    # "deepep" is DeepEP's node-deduplicated exchange (DeepSeek-V3 report section 3.2.2; Megatron's flex
    # dispatcher): a token crosses the fabric once per destination node, not once per expert. Needs ep > 1
    # and dropless routing (Workload.moe_capacity_factor None: Megatron's DeepEP path does not drop tokens).
    moe_dispatch: Literal[MOE_DISPATCHES] = "a2a"
    # Sequence-chunked pipeline (TeraPipe, Li et al. 2021; Seq1F1B, Sun et al. 2024; SPPO, Chen et al. 2025):
    # each micro-batch's sequences split into seq_chunks chunks that flow through the pipeline as separate
    # work items, backward last chunk first (causal attention: chunk i reads the K/V of chunks <= i).
    seq_chunks: PositiveInt = 1
    # Core attention disaggregation (DistCA, arXiv 2510.18121): every replica's attention cores run on a pool of
    # all devices, balanced, their Q/K/V and outputs sent over the fabric; matters with Workload.documents.
    attention_pool: bool = False
    # Low-bandwidth training (planner/cost/step_terms.py, docs/guide/low_bandwidth_and_cost.md): DiLoCo
    # (Douillard et al. 2023) syncs a pseudo-gradient every local_steps steps; SparseLoCo (2025) sends
    # grad_compression of its bytes (top-k + quantisation); act_compression: the fraction of pipeline activation
    # and activation-gradient bytes sent (subspace projection, "Heterogeneous Low-Bandwidth Pre-Training of LLMs").
    local_steps: PositiveInt = 1
    grad_compression: float = Field(1.0, gt=0, le=1)
    act_compression: float = Field(1.0, gt=0, le=1)
    # Frozen parts (text encoders, VAE) run forward in the idle slots of the backbone's pipeline instead of on
    # stage 0 (DiffusionPipe, Tian et al. MLSys 2024; planner/cost/frozen_fill.py). False: the plain plan.
    fill_frozen: bool = False
    partition: list[StageAssignment] | None = None  # None: blocks spread evenly over pp * vpp chunks

    @field_validator("zero", mode="before")
    @classmethod
    def _zero_is_an_integer(cls, v):
        # Literal[0, 1, 2, 3] matches by equality, so true and 1.0 would pass as stage 1
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"ZeRO stage must be the integer 0, 1, 2 or 3, got {v!r}")  # noqa: TRY004 (pydantic)
        return v

    @model_validator(mode="after")
    def _check(self) -> ParallelPlan:
        # the rules are planner/core/dims.py's predicates, shared with the batch path and the search
        schedule = SCHEDULE_INDEX[self.schedule]
        if not vpp_fits_schedule(schedule, self.vpp):
            raise ValueError(f"vpp={self.vpp} needs schedule {quoted_names('virtual_stages')}, got '{self.schedule}'")
        if not recompute_layers_fit_policy(COLUMN["recompute_num_layers"].encode(self.recompute_num_layers),
                                           COLUMN["recompute"].encode(self.recompute)):
            raise ValueError("recompute_num_layers needs recompute 'full' (Megatron's block method)")
        if not ulysses_fits_cp(COLUMN["cp_a2a"].encode(self.cp_comm), self.cp):
            raise ValueError("cp_comm 'a2a' (Ulysses) needs cp > 1")
        if not sp_fits_tp(self.sp, self.tp):
            raise ValueError("sequence parallel (sp) needs tp > 1")
        if not (seq_chunks_fit_schedule(schedule, self.seq_chunks)
                and seq_chunks_fit_attention(self.seq_chunks, self.flash_attention)):
            raise ValueError(f"seq_chunks={self.seq_chunks} needs schedule {quoted_names('sequence_chunks')} and "
                             f"flash attention, got '{self.schedule}', flash_attention={self.flash_attention}")
        if not tp_slice_fits_degrees(COLUMN["moe_tp_slice"].encode(self.moe_dispatch), self.tp, self.ep,
                                     COLUMN["etp"].encode(self.etp)):
            raise ValueError(f"moe_dispatch 'tp_slice' (Pipeline MoE) puts E/tp whole experts on each tensor-parallel "
                             f"rank: it needs tp > 1, ep = tp and etp = 1; got tp={self.tp}, ep={self.ep}, "
                             f"etp={self.etp}")
        if not local_sgd_fits_zero(self.local_steps, self.grad_compression, self.zero):
            raise ValueError(f"local_steps {self.local_steps} / grad_compression {self.grad_compression:g} keep an "
                             f"unsharded optimizer per replica (DiLoCo, SparseLoCo): they need zero 0, got zero "
                             f"{self.zero}")
        if not deepep_fits_ep(COLUMN["moe_deepep"].encode(self.moe_dispatch), self.ep):
            raise ValueError("moe_dispatch 'deepep' exchanges tokens over the expert-parallel group: it needs ep > 1")
        if self.partition is not None and len(self.partition) != self.pp * self.vpp:
            raise ValueError(f"partition has {len(self.partition)} stages, expected pp*vpp = "
                             f"{self.pp * self.vpp}")
        return self

    @property
    def devices(self) -> int:
        """Devices the plan occupies: dp x tp x pp x cp (ep folds into dp x cp x tp, Megatron style)."""
        return self.dp * self.tp * self.pp * self.cp

    def layer_recompute(self, position_in_chunk: int) -> RecomputePolicy:
        """The recompute policy of the block at this position (0-based) of its pipeline chunk."""
        if self.recompute == "full" and self.recompute_num_layers is not None:
            return "full" if position_in_chunk < self.recompute_num_layers else "none"
        return self.recompute

    def microbatches(self, workload: Workload) -> int:
        if self.num_microbatches is not None:
            return self.num_microbatches
        return max(1, workload.global_batch // (self.mbs * self.dp))


class Estimate(BaseModel):
    """What the cost model predicts for one (model, cluster, workload, plan)."""

    model_config = ConfigDict(extra="forbid")
    step_time_s: float
    tokens_per_s: float
    mfu: float
    hfu: float
    peak_memory_bytes: float
    memory_capacity_bytes: float
    fits: bool
    breakdown: dict[str, float] = Field(default_factory=dict, description="seconds per step by cause")
    memory: dict[str, float] = Field(default_factory=dict, description="bytes on the busiest device by term")
    stages: list[dict] = Field(default_factory=list, description="per pipeline stage time and memory")
    why: str = ""
    # 80% prediction interval of the step time: step_time_s x the error band of the cluster's stack on its
    # device (planner.core.stack.Stack.band_for; DEFAULT_BAND without a stack). None in older plan files.
    step_time_s_p10: float | None = None
    step_time_s_p90: float | None = None
    # optimizer steps between the weights a gradient is computed on and those it updates (0 synchronous, 1 for
    # async-1f1b, PipeDream-2BW; planner.core.dims.ScheduleRules.staleness_steps). None in older plan files.
    staleness_steps: int | None = None
    # money and energy per step (planner/cost/energy.py): None where a device has no price or no TDP
    cost_usd_per_step: float | None = None
    energy_j_per_step: float | None = None
    tokens_per_joule: float | None = None


# A model or cluster name is a catalog name or a file path: one printable line, at most PATH_MAX (4096) long.
MAX_NAME_CHARS = 4096


class PlanFile(BaseModel):
    """The file `plan --save` writes. Readers refuse a schema_version they do not know.

    planner.planfile.load_plan_file is the one way a command reads one: strict parsing (parse_plan_file, here),
    then planner.planfile.resolve_plan_file, which resolves the names and holds the plan to `estimate`'s rules."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    schema_version: int = PLAN_SCHEMA_VERSION
    model: str
    cluster: str
    nodes: PositiveInt | None = None
    workload: Workload
    plan: ParallelPlan
    estimate: Estimate | None = None
    # the software stack (hardware_profiles/stacks/) the plan was made for; None: none named
    stack: str | None = None

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v):
        # an after-validator: a before-validator on the model would turn JSON input into Python objects first
        # and strict parsing would then refuse JSON arrays for tuples
        if v != PLAN_SCHEMA_VERSION:
            raise ValueError(f"plan file schema_version {v} is not supported (this planner reads "
                             f"version {PLAN_SCHEMA_VERSION}); re-create it with `plan --save`")
        return v

    @field_validator("model", "cluster", "stack")
    @classmethod
    def _one_printable_line(cls, v: str | None):
        if v is None:
            return v
        # these names reach launch scripts and configs (planner/export/); a line break or control character
        # is neither a catalog name nor a file name anyone means
        if not v or len(v) > MAX_NAME_CHARS or not v.isprintable():
            raise ValueError(f"want a catalog name or a file path: one line of printable characters, at most "
                             f"{MAX_NAME_CHARS} long; got {short_repr(v)}")
        return v

    @field_validator("estimate")
    @classmethod
    def _finite_estimate(cls, v: Estimate | None):
        if v is None:
            return v
        for name in ("step_time_s", "tokens_per_s", "mfu", "hfu", "peak_memory_bytes", "memory_capacity_bytes",
                     "step_time_s_p10", "step_time_s_p90"):
            x = getattr(v, name)
            if x is None:  # the band: absent in plan files written before it
                continue
            if not math.isfinite(x) or x < 0:
                raise ValueError(f"estimate.{name} must be a finite number >= 0, got {x}; re-create the file with "
                                 "`plan --save` or drop the estimate")
        return v


def short_repr(v, limit: int = 60) -> str:
    """repr(v), cut to `limit` characters: what a one-line refusal quotes of a hostile value."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def parse_plan_file(text: str, where: str = "plan file") -> PlanFile:
    """A PlanFile from JSON text, strictly: no "yes" for true, no 2.0 or "2" for 2, no NaN or Infinity, no
    unknown field. BadInput (one line: where, field, what is wrong) otherwise."""
    try:
        return PlanFile.model_validate_json(text, strict=True)
    except ValidationError as e:
        errs = e.errors()
        # an unknown version first: its other fields may differ for that reason alone
        err = next((x for x in errs if x.get("loc", ())[:1] == ("schema_version",)), errs[0])
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        if err["type"] not in ("missing", "value_error") and not err["type"].startswith("json") and \
                (got is None or isinstance(got, (str, int, float, bool))):
            msg += f" (got {short_repr(got)})"  # pydantic's own messages do not say what they got
        raise BadInput(f"{where}: {loc + ': ' if loc else ''}{msg}") from None
