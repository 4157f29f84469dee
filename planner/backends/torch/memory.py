"""How a rank's peak memory is measured: what the planner predicts is the bytes of live tensors at the step's
peak, so the measurement counts tensors, by torch's own accounting, not the process's pages.

- CUDA: torch.cuda.max_memory_allocated over the timed steps (the runner resets it after the warm-up).
- CPU: torch keeps no running counter for host tensors, but its profiler records every allocation and free
  the CPU allocator makes (profile_memory=True). It runs from before the model is built to the end of the
  warm-up step: the running sum of allocations less frees is then every tensor alive between steps, the
  buffers only C++ holds included (DDP's gradient buckets, gloo's and the pipeline's). One more training
  step after the timed ones runs under it again; the peak is that live set plus the highest running sum of
  the step's own allocations less frees. Without a warm-up step, the live set is counted from Python
  instead (live_tensor_bytes: what the garbage collector can reach, and the gradients), which misses the
  C++-held buffers.
- CPU, for reference: the resident-set peak since the warm-up (Linux VmHWM, less file-backed and shared
  pages, less the anonymous memory held before the model was built). It also sees the allocator's free
  lists, gloo's buffers and the interpreter, so it is an upper bound on the tensor bytes.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc

import torch

PROFILER_METHOD = ("torch.profiler allocator events: tensors live after the warm-up step (from before the model "
                   "was built) + the peak of one extra step")
PROFILER_GC_METHOD = "torch.profiler allocator events over one extra step + tensors Python reaches at its start"
RSS_METHOD = "Linux VmHWM - RssFile - RssShmem - RssAnon before build"


def status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        return True
    except OSError:
        return False


def rss_peak_bytes(base_anon_bytes: int) -> int:
    return (status_kb("VmHWM") - status_kb("RssFile") - status_kb("RssShmem")) * 1024 - base_anon_bytes


def live_tensor_bytes(params) -> int:
    """Bytes of the host tensors alive now, each storage once: every tensor the garbage collector tracks
    (parameters, optimizer state, pipeline buffers, the batch) and the parameters' gradients, which
    autograd creates without a Python object until someone asks for them. Tensor subclasses that wrap
    another tensor (DTensor) hold no storage of their own; their local tensor is counted instead."""
    seen: dict[tuple[int, int], int] = {}

    def add(t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return
        local = getattr(t, "_local_tensor", None)
        if local is not None:
            add(local)
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # wrapper subclasses without a storage
            return
        if st.nbytes():
            seen[(st.data_ptr(), st.nbytes())] = st.nbytes()

    gc.collect()
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads __class__, which some proxies (torch.distributed's
        # deprecated reduce_op) answer with a warning
        if issubclass(type(obj), torch.Tensor):
            add(obj)
    for p in params:
        add(p)
        add(p.grad)
    return sum(seen.values())


def _allocations(prof) -> list[tuple[int, int]]:
    """(time ns, bytes: + allocated, - freed) of every CPU allocator event `prof` (a torch.profiler.profile
    run with profile_memory=True) recorded, in time order."""
    from torch._C._profiler import _EventType

    sizes: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    sizes.sort()
    return sizes


def allocation_peak_bytes(prof) -> int:
    """The highest running sum of allocations less frees that `prof` saw, from its start."""
    running = peak = 0
    for _, nbytes in _allocations(prof):
        running += nbytes
        peak = max(peak, running)
    return peak


def allocation_net_bytes(prof) -> int:
    """Allocations less frees over the whole of `prof`: what it left alive."""
    return sum(nbytes for _, nbytes in _allocations(prof))


def start_allocation_profile():
    """A started torch.profiler recording allocator events (stop it with stop_allocation_profile)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    prof.__enter__()
    return prof


def stop_allocation_profile(prof) -> int:
    """Stop `prof` and return the bytes it left alive (allocation_net_bytes)."""
    prof.__exit__(None, None, None)
    return allocation_net_bytes(prof)


def profiled_step_peak_bytes(run_step, live_bytes: int) -> int:
    """Run one training step (run_step()) under torch.profiler's allocator events and return its peak
    tensor bytes: `live_bytes` (what was alive when it started) plus allocation_peak_bytes during it."""
    prof = start_allocation_profile()
    try:
        run_step()
    finally:
        prof.__exit__(None, None, None)
    return live_bytes + allocation_peak_bytes(prof)
