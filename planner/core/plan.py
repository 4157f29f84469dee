"""What a user asks for (Workload), what the planner decides (ParallelPlan), what it predicts (Estimate),
and the plan file that `estimate`, `export`, `simulate` and `validate` read (DESIGN.md sections 2-3)."""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, field_validator,
                      model_validator)

from planner.core.errors import BadInput, PlannerError

if TYPE_CHECKING:  # imported when a plan file is checked: the cost model imports this module
    from planner.core.hardware import Cluster
    from planner.core.model import ModelGraph

Schedule = Literal["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"]
RecomputePolicy = Literal["none", "selective", "full"]
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
    zero: Literal[0, 1, 2, 3] = 0
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
    cp_comm: Literal["ring", "a2a"] = "ring"
    # How MoE layers reach their experts: "a2a" dispatches and combines tokens with all-to-alls over the ep
    # group (Megatron, DeepSpeed-MoE); "tp_slice" is Pipeline MoE's (Chen et al. 2023, arXiv 2304.11414,
    # section 3): E/tp whole experts on each TP rank, each rank picks its experts' tokens from the replicated
    # input by index and one TP all-reduce combines them (no all-to-all). Needs tp > 1, ep = tp, etp = 1.
    # "deepep" is DeepEP's node-deduplicated exchange (DeepSeek-V3 report section 3.2.2; Megatron's flex
    # dispatcher): a token crosses the fabric once per destination node, not once per expert. Needs ep > 1
    # and dropless routing (Workload.moe_capacity_factor None: Megatron's DeepEP path does not drop tokens).
    moe_dispatch: Literal["a2a", "tp_slice", "deepep"] = "a2a"
    # Sequence-chunked pipeline (TeraPipe, Li et al. 2021; Seq1F1B, Sun et al. 2024; SPPO, Chen et al. 2025):
    # each micro-batch's sequences split into seq_chunks chunks that flow through the pipeline as separate
    # work items, backward last chunk first (causal attention: chunk i reads the K/V of chunks <= i).
    seq_chunks: PositiveInt = 1
    # Core attention disaggregation (DistCA, arXiv 2510.18121): every replica's attention cores run on a pool of
    # all devices, balanced, their Q/K/V and outputs sent over the fabric; matters with Workload.documents.
    attention_pool: bool = False
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
        if self.vpp > 1 and self.schedule != "interleaved-1f1b":
            raise ValueError(f"vpp={self.vpp} needs schedule 'interleaved-1f1b', got '{self.schedule}'")
        if self.recompute_num_layers is not None and self.recompute != "full":
            raise ValueError("recompute_num_layers needs recompute 'full' (Megatron's block method)")
        if self.cp_comm == "a2a" and self.cp == 1:
            raise ValueError("cp_comm 'a2a' (Ulysses) needs cp > 1")
        if self.sp and self.tp == 1:
            raise ValueError("sequence parallel (sp) needs tp > 1")
        if self.seq_chunks > 1 and (self.schedule not in ("gpipe", "1f1b") or not self.flash_attention):
            # the chunk orders exist for these two schedules (pipeline._order_1f1b); an unfused core's
            # score tensor against a growing prefix is not modelled
            raise ValueError(f"seq_chunks={self.seq_chunks} needs schedule 'gpipe' or '1f1b' and flash attention, "
                             f"got '{self.schedule}', flash_attention={self.flash_attention}")
        if self.moe_dispatch == "tp_slice" and (self.tp == 1 or self.ep != self.tp or self.etp != 1):
            raise ValueError(f"moe_dispatch 'tp_slice' (Pipeline MoE) puts E/tp whole experts on each tensor-parallel "
                             f"rank: it needs tp > 1, ep = tp and etp = 1; got tp={self.tp}, ep={self.ep}, "
                             f"etp={self.etp}")
        if self.moe_dispatch == "deepep" and self.ep == 1:
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


# A model or cluster name is a catalog name or a file path: one printable line, at most PATH_MAX (4096) long.
MAX_NAME_CHARS = 4096


class PlanFile(BaseModel):
    """The file `plan --save` writes. Readers refuse a schema_version they do not know.

    `load_plan_file` is the one way a command reads one: strict parsing (parse_plan_file), then `check`, which
    resolves the names and holds the plan to the rules `estimate` applies."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    schema_version: int = PLAN_SCHEMA_VERSION
    model: str
    cluster: str
    nodes: PositiveInt | None = None
    workload: Workload
    plan: ParallelPlan
    estimate: Estimate | None = None

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v):
        # an after-validator: a before-validator on the model would turn JSON input into Python objects first
        # and strict parsing would then refuse JSON arrays for tuples
        if v != PLAN_SCHEMA_VERSION:
            raise ValueError(f"plan file schema_version {v} is not supported (this planner reads "
                             f"version {PLAN_SCHEMA_VERSION}); re-create it with `plan --save`")
        return v

    @field_validator("model", "cluster")
    @classmethod
    def _one_printable_line(cls, v: str):
        # these names reach launch scripts and configs (planner/export/); a line break or control character
        # is neither a catalog name nor a file name anyone means
        if not v or len(v) > MAX_NAME_CHARS or not v.isprintable():
            raise ValueError(f"want a catalog name or a file path: one line of printable characters, at most "
                             f"{MAX_NAME_CHARS} long; got {_short(v)}")
        return v

    @field_validator("estimate")
    @classmethod
    def _finite_estimate(cls, v: Estimate | None):
        if v is None:
            return v
        for name in ("step_time_s", "tokens_per_s", "mfu", "hfu", "peak_memory_bytes", "memory_capacity_bytes"):
            x = getattr(v, name)
            if not math.isfinite(x) or x < 0:
                raise ValueError(f"estimate.{name} must be a finite number >= 0, got {x}; re-create the file with "
                                 "`plan --save` or drop the estimate")
        return v

    def check(self, where: str = "plan file") -> LoadedPlan:
        """The plan file held to what every command needs: sizes within planner.core.limits, a micro-batch count
        that is global_batch / (mbs x dp), a model and cluster that resolve, and everything `estimate` checks
        (devices, pp x vpp <= blocks, the partition, ep, cp, seq_chunks, ...), by running it. BadInput (one
        line naming the file and field) or Infeasible; the loaded model, cluster and a fresh estimate."""
        from planner import catalog
        from planner.core import limits
        from planner.cost.estimate import estimate
        from planner.importers import load_model

        p, w = self.plan, self.workload
        caps = [(f"plan.{k}", getattr(p, k), limits.MAX_DEVICES, "devices") for k in ("dp", "tp", "pp", "vpp", "cp", "ep")]
        caps += [("plan.etp", p.etp, limits.MAX_DEVICES, "devices"), ("nodes", self.nodes, limits.MAX_DEVICES, "nodes"),
                 ("workload.seq_len", w.seq_len, limits.MAX_SEQ_LEN, "tokens"),
                 ("workload.global_batch", w.global_batch, limits.MAX_GLOBAL_BATCH, "sequences"),
                 ("plan.num_microbatches", p.num_microbatches, limits.MAX_MICROBATCHES, "micro-batches"),
                 ("plan.seq_chunks", p.seq_chunks, w.seq_len, "chunks (one token each)"),
                 ("plan.mbs", p.mbs, w.global_batch, "sequences (the global batch)")]
        if w.documents is not None:
            caps.append(("workload.documents.mean_tokens", w.documents.mean_tokens, w.seq_len, "tokens (the sequence)"))
        for field, value, cap, unit in caps:
            if value is not None and value > cap:
                raise BadInput(f"{where}: {field} {value} is past the cap of {cap:,} {unit}")
        for i, stage in enumerate(p.partition or ()):
            if stage.layers[1] <= stage.layers[0]:
                raise BadInput(f"{where}: plan.partition.{i}.layers {list(stage.layers)}: every pipeline chunk runs "
                               "at least one block (first < last)")
        if p.devices > limits.MAX_DEVICES:
            raise BadInput(f"{where}: plan dp*tp*pp*cp = {p.devices:,} devices, past the cap of "
                           f"{limits.MAX_DEVICES:,}")
        # Megatron, DeepSpeed and torchtitan derive the micro-batch count from the batch (conventions.md 2.1
        # "Global batch size"), and estimate's tokens per step are global_batch x seq_len: a count that
        # disagrees would time a different number of sequences than it reports (8 for 1 gave 7.6x tokens/s).
        if w.global_batch % (p.mbs * p.dp):
            raise BadInput(f"{where}: workload.global_batch {w.global_batch} is not divisible by plan.mbs x plan.dp "
                           f"= {p.mbs} x {p.dp}; change the batch or the plan")
        m = w.global_batch // (p.mbs * p.dp)
        if p.num_microbatches is not None and p.num_microbatches != m:
            raise BadInput(f"{where}: plan.num_microbatches {p.num_microbatches} != global_batch / (mbs x dp) = "
                           f"{w.global_batch} / ({p.mbs} x {p.dp}) = {m}; set it to {m} or null")
        if m > limits.MAX_MICROBATCHES:
            raise BadInput(f"{where}: {m:,} micro-batches per step (global_batch / (mbs x dp)), past the cap of "
                           f"{limits.MAX_MICROBATCHES:,}; raise plan.mbs or lower workload.global_batch")
        # the pipeline simulator's own argument rules (interleaved 1F1B needs m a multiple of pp, ...), which it
        # raises as ValueError for callers that are code; here they are the file's mistakes
        _in_file(where, "plan", _schedule_rules, p.schedule, p.pp, m, p.vpp, p.seq_chunks)
        model = _in_file(where, "model", load_model, self.model)
        cluster = _in_file(where, "cluster", catalog.load_cluster, self.cluster, self.nodes)
        est = _in_file(where, "plan", estimate, model, cluster, w, p)
        return LoadedPlan(pf=self, model=model, cluster=cluster, estimate=est)


@dataclass(frozen=True)
class LoadedPlan:
    """A plan file that passed PlanFile.check: what it names, resolved, and its estimate now."""

    pf: PlanFile
    model: ModelGraph
    cluster: Cluster
    estimate: Estimate


def _schedule_rules(schedule: str, pp: int, m: int, vpp: int, seq_chunks: int) -> None:
    from planner.cost.schedule_order import _check_args

    try:
        _check_args(schedule, pp, m, vpp, seq_chunks)
    except ValueError as e:
        raise BadInput(str(e)) from None


def _short(v, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def _in_file(where: str, field: str, fn, *args):
    """fn(*args), its one-line refusal (BadInput, Infeasible) prefixed with the file and field."""
    try:
        return fn(*args)
    except PlannerError as e:
        # the checks speak of the flags that set these fields on the command line; here they are file fields
        text = re.sub(r"--(dp|tp|pp|vpp|cp|ep|mbs)\b", r"plan.\1", str(e))
        text = text.replace("--nodes", "nodes").replace("--gbs", "workload.global_batch")
        raise type(e)(f"{where}: {'' if text.startswith(field) else field + ': '}{text}") from None
    except OSError as e:  # a name the OS refuses as a path (too long, ...) while looking it up
        raise BadInput(f"{where}: {field}: {_short(args[0])} cannot be read ({e.strerror or e})") from None


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
            msg += f" (got {_short(got)})"  # pydantic's own messages do not say what they got
        raise BadInput(f"{where}: {loc + ': ' if loc else ''}{msg}") from None


def load_plan_file(path) -> LoadedPlan:
    """Read (planner.files.read_input: no FIFO, device, directory or oversized file), parse strictly and check
    a plan file: what `estimate --plan`, `export`, `simulate` and `validate` use."""
    from planner.files import read_input

    where = str(path)
    text = read_input(Path(path), "plan file (JSON, from `plan --save`)")
    return parse_plan_file(text, where).check(where)
