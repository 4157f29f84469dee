"""The torch backend: build the planner's model in torch, apply a ParallelPlan with torch.distributed
(DDP / FSDP2, DTensor tensor parallel, torch.distributed.pipelining, activation checkpointing), run and
measure it (`validate`), and measure this machine (`calibrate`). Needs torch; nothing here is imported
by the rest of the planner."""
