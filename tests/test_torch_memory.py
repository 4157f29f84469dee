"""How the torch backend measures a rank's peak tensor memory on the CPU (planner/backends/torch/memory.py):
torch.profiler's allocator events, summed by hand here on allocations of known sizes."""
from __future__ import annotations

import torch

from planner.backends.torch import memory as mem

MB = 2**20


def test_running_sum_of_allocations_gives_the_peak_and_what_is_left():
    prof = mem.start_allocation_profile()
    a = torch.empty(MB // 4)        # 1 MiB
    b = torch.empty(2 * MB // 4)    # +2 MiB -> 3 MiB live: the peak
    del a                           # 2 MiB
    c = torch.empty(MB // 8)        # 2.5 MiB
    del b                           # 0.5 MiB left alive
    left = mem.stop_allocation_profile(prof)
    assert mem.allocation_peak_bytes(prof) == 3 * MB
    assert left == MB // 2
    del c


def test_a_step_peak_adds_the_live_set_it_started_with():
    def step():
        x = torch.empty(4 * MB // 4)
        y = torch.empty(4 * MB // 4)
        del x, y

    assert mem.profiled_step_peak_bytes(step, live_bytes=10 * MB) == 18 * MB


def test_live_tensor_bytes_counts_a_shared_storage_once_and_the_gradients():
    before = mem.live_tensor_bytes([])
    base = torch.empty(MB // 4)
    views = [base[:10], base[5:], base.view(2, -1)]
    p = torch.nn.Parameter(torch.zeros(MB // 8))
    p.grad = torch.zeros(MB // 8)
    got = mem.live_tensor_bytes([p]) - before
    assert got == MB + MB // 2 + MB // 2  # base once (its views share it), the parameter, its gradient
    del views


def test_a_run_reports_at_least_its_model_states(tmp_path):
    # one process, the tiny Llama: the profiled peak holds the weights, gradients and AdamW states the
    # runner counts exactly, plus activations; the method says which ledger was used
    from planner.backends.torch.launch import launch
    from planner.backends.torch.model import tiny_graph
    from planner.backends.torch.runner import Job, RunOptions
    from planner.core.plan import ParallelPlan, Workload

    graph = tiny_graph("llama", layers=2, hidden=64, heads=4, kv_heads=2)
    res = launch([Job(graph, Workload(global_batch=4, seq_len=32, dtype="fp32"), ParallelPlan(mbs=2))], 1,
                 RunOptions(steps=2, warmup=1))[0]
    states = res["model_state_bytes_per_rank"][0]
    assert res["measured_peak_memory_bytes"] > states["weights"] + states["gradients"] + states["optimizer"]
    assert res["memory_method"] == mem.PROFILER_METHOD
