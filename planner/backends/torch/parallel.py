"""Apply a ParallelPlan to the torch Decoder with PyTorch's own parallelism APIs.

Rank layout: a DeviceMesh of shape (pp, dp, tp), tp fastest, as Megatron and the planner's cost model lay
ranks out (planner/cost/estimate.py), so a tp group is contiguous.

What each plan field becomes:
- tp (+ sp): DTensor tensor parallelism, `parallelize_module` with ColwiseParallel / RowwiseParallel as in
  torchtitan's Llama plan: wq/wk/wv and w1/w3 column-parallel, wo and w2 row-parallel, the embedding
  vocabulary-parallel (row-wise over the vocabulary) and the head column-parallel with its logits gathered.
  sp: norms run SequenceParallel (sequence-sharded), the row-parallel outputs are reduce-scattered and the
  inputs of the column-parallel GEMMs all-gathered (Korthikanti 2022).
- dp with zero 0: DistributedDataParallel (gradient all-reduce, bucketed).
  zero 1: DDP + torch.distributed.optim.ZeroRedundancyOptimizer: gradients all-reduced, AdamW states sharded
  over dp (ZeRO stage 1 exactly). With tp > 1 ZeroRedundancyOptimizer cannot take DTensor parameters, so
  zero 1 runs as zero 2 below (an approximation: FSDP2 also shards the parameters at rest).
  zero 2: FSDP2 `fully_shard(reshard_after_forward=False)`: gradients reduce-scattered and optimizer states
  sharded; parameters gathered once per step and kept from forward to backward. ZeRO-2 keeps parameters
  replicated at rest; FSDP2 keeps them sharded and gathers them, the closest PyTorch offers (approximation).
  zero 3: FSDP2 `fully_shard(reshard_after_forward=True)`: parameters gathered again for backward (ZeRO-3).
- pp, vpp, schedule, partition: torch.distributed.pipelining PipelineStage per chunk (chunk c on pp rank
  c % pp, the interleaved layout) with ScheduleGPipe, Schedule1F1B or ScheduleInterleaved1F1B, blocks split
  by the plan's partition (uneven allowed) or evenly as the planner splits them.
- recompute: "full" runs each block (or the first recompute_num_layers of each chunk) under
  torch.utils.checkpoint; "selective" checkpoints the attention core only.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from planner.backends.torch.model import Decoder, DecoderSpec
from planner.core.errors import BadInput
from planner.core.model import ModelGraph
from planner.core.plan import ParallelPlan, Workload

MESH_DIMS = ("pp", "dp", "tp")
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


def check_runnable(spec: DecoderSpec, workload: Workload, plan: ParallelPlan, world: int) -> None:
    """Refuse, with one line, what the torch backend cannot run (before any process is started)."""
    if plan.devices != world:
        raise BadInput(f"plan uses dp*tp*pp*cp = {plan.devices} devices but {world} processes were asked for; "
                       f"use --nproc {plan.devices}")
    if plan.cp > 1 or plan.ep > 1:
        raise BadInput("the torch backend runs dp, tp, pp (+ sp, zero, recompute); context and expert "
                       "parallelism (cp, ep > 1) are not implemented")
    if plan.schedule not in SCHEDULES:
        raise BadInput(f"schedule '{plan.schedule}' is not run by the torch backend; use one of {', '.join(SCHEDULES)}")
    if plan.offload.optimizer > 0 or plan.offload.activations > 0:
        raise BadInput("offload is not implemented by the torch backend")
    # planned, not executed: the backend would run something else than the prediction describes
    for field, unsupported in (("seq_chunks", plan.seq_chunks > 1), ("attention_pool", plan.attention_pool),
                               ("moe_dispatch tp_slice", plan.moe_dispatch == "tp_slice"),
                               ("workload.documents", workload.documents is not None)):
        if unsupported:
            raise BadInput(f"{field} is not implemented by the torch backend; validate a plan without it")
    tp = plan.tp
    for what, n in (("heads", spec.heads), ("kv_heads", spec.kv_heads), ("ffn_hidden", spec.ffn_hidden),
                    ("vocab", spec.vocab)):
        if n % tp:
            raise BadInput(f"tp={tp} does not divide the model's {what} ({n})")
    if plan.sp and workload.seq_len % tp:
        raise BadInput(f"sequence parallel needs seq ({workload.seq_len}) divisible by tp ({tp})")
    if workload.global_batch % (plan.mbs * plan.dp):
        raise BadInput(f"global batch {workload.global_batch} is not divisible by mbs*dp = {plan.mbs}*{plan.dp}")
    if spec.positions and workload.seq_len > spec.positions:
        raise BadInput(f"seq {workload.seq_len} exceeds the model's {spec.positions} learned positions")
    chunks = plan.pp * plan.vpp
    if chunks > spec.blocks:
        raise BadInput(f"pp*vpp = {chunks} pipeline chunks but the model has only {spec.blocks} blocks")
    if tp > 1 and spec.tied:
        raise BadInput("tied input/output embeddings with tp > 1 are not supported by the torch backend; use "
                       "tp=1 or an untied model")
    if plan.pp > 1 and spec.tied:
        raise BadInput("tied input/output embeddings cannot be split over pipeline stages by the torch backend; "
                       "use pp=1 or an untied model")
    m = plan.microbatches(workload)
    if plan.pp > 1 and m < plan.pp and plan.schedule != "gpipe":
        raise BadInput(f"{plan.schedule} needs at least pp={plan.pp} micro-batches, the plan has {m}")
    if plan.schedule == "interleaved-1f1b" and m % plan.pp:
        raise BadInput(f"interleaved-1f1b needs micro-batches ({m}) to be a multiple of pp ({plan.pp})")
    block_ranges(spec.blocks, plan)  # a bad partition says so here


def block_ranges(blocks: int, plan: ParallelPlan) -> list[tuple[int, int]]:
    """[lo, hi) block range of each of the pp*vpp chunks: the plan's partition, or the planner's even split
    (numpy.array_split, as planner/cost/chunks.py splits them)."""
    n = plan.pp * plan.vpp
    if plan.partition is not None:
        ranges = [tuple(a.layers) for a in plan.partition]
        covered = [i for lo, hi in ranges for i in range(lo, hi)]
        if covered != list(range(blocks)) or any(hi <= lo for lo, hi in ranges):
            raise BadInput(f"partition {ranges} does not cover blocks 0..{blocks - 1} once, in order, "
                           "with at least one block per chunk")
        return [(int(lo), int(hi)) for lo, hi in ranges]
    sizes = [len(x) for x in np.array_split(np.arange(blocks), n)]
    edges = np.cumsum([0] + sizes)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(n)]


def set_recompute(module: Decoder, plan: ParallelPlan) -> None:
    """Mark the blocks of one pipeline chunk for recompute, by their position in the chunk (Megatron's
    block method for recompute_num_layers)."""
    for pos, block in enumerate(module.layers.values()):
        policy = plan.layer_recompute(pos)
        block.recompute_full = policy == "full"
        block.attention.recompute_core = policy == "selective"


def apply_tp(module: Decoder, tp_mesh, sp: bool, loss_parallel: bool = False) -> None:
    """Megatron tensor parallelism (+ sequence parallelism) with DTensor, in place. loss_parallel: the head's
    logits stay sharded over the vocabulary (a DTensor) for a vocabulary-parallel cross-entropy (run the
    loss and its backward under torch.distributed.tensor.parallel.loss_parallel), as Megatron and torchtitan
    compute it; otherwise they are gathered for a plain loss (a pipeline's last stage needs a plain tensor)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    # The residual stream between sublayers: sequence-sharded under sp, replicated otherwise.
    stream = Shard(1) if sp else Replicate()
    if module.tok_embeddings is not None:
        # Vocabulary-parallel embedding: each rank looks up its rows, the partial sums are all-reduced.
        # Learned positions are added to the replicated result; under sp it is then split by sequence.
        parallelize_module(module.tok_embeddings, tp_mesh,
                           {"tok": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())})
        if sp:
            parallelize_module(module.tok_embeddings, tp_mesh,
                               PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)))
    for block in module.layers.values():
        plan = {
            "attention": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=stream),
            "feed_forward": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=stream),
        }
        if block.feed_forward.w3 is not None:
            plan["feed_forward.w3"] = ColwiseParallel()
        if sp:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)
    if module.norm is not None:
        if sp:
            parallelize_module(module.norm, tp_mesh, SequenceParallel())
        if module.output is not None:
            # Column-parallel head over the vocabulary: logits sharded for a vocabulary-parallel loss, or
            # gathered for a plain one.
            head = ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False) \
                if loss_parallel else ColwiseParallel(input_layouts=stream, output_layouts=Replicate())
            parallelize_module(module.output, tp_mesh, head)
        else:
            # Tied head: F.linear against the vocabulary-sharded embedding matrix; give it the full
            # (gathered) hidden states and gather the logits it produces.
            raise BadInput("tied embeddings with tp > 1 are not supported by the torch backend; use tp=1 "
                           "or an untied model")


def apply_dp(modules: list[nn.Module], plan: ParallelPlan, dp_mesh, device: torch.device) -> list[nn.Module]:
    """Wrap each pipeline chunk for data parallelism; returns the modules to run (maybe DDP wrappers)."""
    if plan.dp == 1:
        return modules
    if plan.zero == 0 or (plan.zero == 1 and plan.tp == 1):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, as in Megatron's contiguous
        # gradient buffer, instead of a second copy beside them (one model's worth of bytes: 87 MB measured
        # for the 21.7M-parameter study model, which the planner rightly never charges)
        return [DDP(m, device_mesh=dp_mesh, device_ids=ids, gradient_as_bucket_view=True) for m in modules]
    from torch.distributed.fsdp import fully_shard

    reshard = plan.zero == 3
    for m in modules:
        # One FSDP unit per block (gathered and freed block by block), then the rest (embedding, head).
        for block in m.layers.values():
            fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
        fully_shard(m, mesh=dp_mesh, reshard_after_forward=reshard)
    return modules


def uses_zero_redundancy_optimizer(plan: ParallelPlan) -> bool:
    return plan.dp > 1 and plan.zero == 1 and plan.tp == 1


def stage_modules(graph: ModelGraph, plan: ParallelPlan, pp_rank: int, seed: int) -> tuple[list[int], list[Decoder]]:
    """This pp rank's chunk indices and their Decoder chunks, cut from a full model built from `seed` (every
    rank builds the same full model, so the chunks hold exactly the single-process weights)."""
    from planner.backends.torch.model import build_decoder

    full = build_decoder(graph, init_seed=seed)
    ranges = block_ranges(full.spec.blocks, plan)
    n = len(ranges)
    mine = [c for c in range(n) if c % plan.pp == pp_rank]
    mods = [full.chunk(ranges[c][0], ranges[c][1], first=c == 0, last=c == n - 1) for c in mine]
    return mine, mods
