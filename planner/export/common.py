"""What every launcher writer shares: the plan file with the facts a writer needs (ExportContext), the
launcher-visible half of a plan (LauncherSettings) that the readers fill back, the refusal of a plan field a
launcher cannot spell (Unsupported) and the refusals common to all launchers, and the header comment. The
writers (megatron, deepspeed, torchtitan) import this module, and the package's __init__ imports them, so
the arrows point one way."""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from planner.core.errors import BadInput
from planner.core.model import ModelGraph
from planner.core.plan import ParallelPlan, PlanFile, Workload


class Unsupported(BadInput):
    """The launcher has no spelling for this plan field (exit 2, like any bad input)."""

    def __init__(self, launcher: str, field: str, why: str):
        super().__init__(f"{launcher} cannot express plan field '{field}': {why}")
        self.field = field


@dataclass(frozen=True)
class LauncherSettings:
    """What a launcher sees of a plan. A reader leaves None what its format does not carry."""

    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    vpp: int | None = None
    cp: int | None = None
    ep: int | None = None
    etp: int | None = None  # resolved expert tensor-parallel size (tp when the plan says None or has no experts)
    sp: bool | None = None
    zero: int | None = None
    mbs: int | None = None
    global_batch: int | None = None
    num_microbatches: int | None = None  # per data-parallel rank per optimizer step
    seq_len: int | None = None
    recompute: str | None = None
    recompute_num_layers: int | None = None
    schedule: str | None = None  # None when pp == 1 (nothing to schedule)
    dtype: str | None = None
    stage_layers: tuple[int, ...] | None = None  # transformer blocks per pipeline chunk, chunk c on stage c % pp
    offload_optimizer: float | None = None
    overlap_grad_reduce: bool | None = None
    overlap_tp_comm: bool | None = None

    def carried(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class ExportContext:
    """A plan file with the facts every writer needs, computed once."""

    pf: PlanFile
    model: ModelGraph
    devices_per_node: int | None = None  # None: unknown (heterogeneous or not loadable)

    @property
    def plan(self) -> ParallelPlan:
        return self.pf.plan

    @property
    def workload(self) -> Workload:
        return self.pf.workload

    @property
    def world(self) -> int:
        return self.plan.devices

    @property
    def num_blocks(self) -> int:
        return self.model.num_blocks

    @property
    def is_moe(self) -> bool:
        return any(layer.kind == "moe" for layer in self.model.layers)

    @property
    def etp(self) -> int:
        return self.plan.etp if self.plan.etp is not None else self.plan.tp

    def stage_layers(self) -> tuple[int, ...]:
        """Blocks per pipeline chunk: the plan's partition, else the cost model's even split (np.array_split,
        planner/cost/chunks.py split_chunks), so the launcher runs the split that was costed."""
        p = self.plan
        if p.partition is not None:
            return tuple(a.layers[1] - a.layers[0] for a in p.partition)
        n = self.num_blocks
        return tuple(len(x) for x in np.array_split(np.arange(n), p.pp * p.vpp))

    def schedule(self) -> str | None:
        """The schedule a launcher runs: none without a pipeline; interleaved with one chunk per stage is
        plain 1F1B (the interleaved schedule degenerates to it)."""
        p = self.plan
        if p.pp == 1:
            return None
        if p.schedule == "interleaved-1f1b" and p.vpp == 1:
            return "1f1b"
        return p.schedule

    def microbatches(self) -> int:
        return self.plan.microbatches(self.workload)


def expected_settings(ctx: ExportContext) -> LauncherSettings:
    """The settings every faithful export must carry back (the reference side of the round trip)."""
    p, w = ctx.plan, ctx.workload
    return LauncherSettings(
        dp=p.dp, tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep, etp=ctx.etp if ctx.is_moe else p.tp, sp=p.sp,
        zero=p.zero, mbs=p.mbs,
        global_batch=w.global_batch, num_microbatches=ctx.microbatches(), seq_len=w.seq_len,
        recompute=p.recompute, recompute_num_layers=p.recompute_num_layers, schedule=ctx.schedule(),
        dtype=w.dtype, stage_layers=ctx.stage_layers(), offload_optimizer=p.offload.optimizer,
        overlap_grad_reduce=p.overlap_grad_reduce,
        # with tp 1 there is no TP communication to overlap: no launcher is told to (Megatron would refuse it)
        overlap_tp_comm=p.overlap_tp_comm and p.tp > 1)


def check_common(ctx: ExportContext, launcher: str) -> None:
    """Refusals shared by every launcher."""
    p, w = ctx.plan, ctx.workload
    nmb = ctx.microbatches()
    # Megatron (GBS / (MBS x DP) micro-batches), DeepSpeed (train_batch_size = micro x accumulation x DP,
    # asserted in runtime/config.py _batch_assertion) and torchtitan (global = local x dp x accumulation)
    # all derive the micro-batch count from the global batch: docs/launchers.md#batch.
    if p.mbs * p.dp * nmb != w.global_batch:
        raise Unsupported(launcher, "num_microbatches",
                          f"global batch {w.global_batch} != mbs {p.mbs} x dp {p.dp} x micro-batches {nmb}; "
                          "launchers derive the micro-batch count from the global batch")
    if p.schedule == "async-1f1b":
        # Megatron, DeepSpeed and torchtitan flush the pipeline every step; PipeDream-2BW's stale double-buffered
        # weights are its own code base (Narayanan et al. 2021)
        raise Unsupported(launcher, "schedule", "async-1f1b (PipeDream-2BW: no flush, 1-step-stale weights) has no "
                          "launcher setting; every launcher flushes each step: re-plan with --schedule 1f1b")
    if p.moe_dispatch == "tp_slice":
        # Megatron's token dispatchers (allgather, alltoall, flex), DeepSpeed-MoE and torchtitan all route
        # tokens to experts over an expert-parallel group; none slices them within the TP group
        raise Unsupported(launcher, "moe_dispatch",
                          "tp_slice (Pipeline MoE: experts over the TP group, index slicing + TP all-reduce) has no "
                          "launcher setting; re-plan with moe_dispatch a2a")
    if p.offload.activations > 0:
        raise Unsupported(launcher, "offload.activations",
                          "activation offload is a fraction here; no launcher takes a fraction of saved "
                          "activations (Megatron offloads whole layers, DeepSpeed all checkpoints)")
    if p.seq_chunks > 1:
        # Megatron, DeepSpeed and torchtitan schedule whole micro-batches; TeraPipe, Seq1F1B and SPPO are their
        # own code bases
        raise Unsupported(launcher, "seq_chunks",
                          f"{p.seq_chunks} sequence chunks per micro-batch (Seq1F1B / SPPO pipelines) have no "
                          "launcher setting; re-plan with seq_chunks 1")
    if p.attention_pool:
        raise Unsupported(launcher, "attention_pool",
                          "core attention disaggregation (DistCA) has no launcher setting; re-plan without it")
    if p.partition is not None:
        per = ctx.world // p.pp
        for c, stage in enumerate(p.partition):
            r = c % p.pp
            # Megatron, DeepSpeed (PipeTopology axes pipe, data, model) and torchtitan (mesh pp outermost)
            # all put pipeline stage r on the contiguous ranks [r*N/pp, (r+1)*N/pp).
            if stage.devices is not None and sorted(stage.devices) != list(range(r * per, (r + 1) * per)):
                raise Unsupported(launcher, f"partition[{c}].devices",
                                  f"stage {r} runs on ranks {r * per}..{(r + 1) * per - 1} (pipeline rank is the "
                                  "outermost mesh axis); order the hosts so those ranks are the devices wanted")


def one_line(text: str) -> str:
    """Free text (a model or cluster name, which may be a file path) made safe for a comment in any of the
    export formats: every character that is not printable -- line breaks, control characters, form feeds --
    written as its Python escape, so the text can never end the comment and start code. The plan file
    refuses such names already (PlanFile); this holds for a context built without it."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def header_lines(ctx: ExportContext, launcher: str) -> list[str]:
    """What the export is, for a comment block at the top of a file: one line each (one_line)."""
    pf, p = ctx.pf, ctx.plan
    lines = [f"{launcher} configuration written by `planner export` (parallel-planner)",
             f"model {one_line(pf.model)}, cluster {one_line(pf.cluster)}" +
             (f" x {pf.nodes} nodes" if pf.nodes else "") +
             f", {ctx.world} devices: dp {p.dp} x tp {p.tp} x pp {p.pp} x cp {p.cp}" +
             (f", vpp {p.vpp}" if p.vpp > 1 else "") + (f", ep {p.ep}" if p.ep > 1 else "")]
    if pf.estimate is not None:
        e = pf.estimate
        lines.append(f"predicted: step {e.step_time_s:.3f} s, {e.tokens_per_s:,.0f} tokens/s, MFU {e.mfu:.1%}, "
                     f"peak memory {e.peak_memory_bytes / 1e9:.1f} GB per device")
    return lines
