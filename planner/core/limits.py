"""Caps on what the cost model can mean: sizes past these are typing mistakes or attacks, never a cluster or
a training run, and left through they make numpy overflow or the planner allocate gigabytes (issue 16).

One place for every cap, checked where the flags are read (planner/app/commands/, planner/app/sweep.py), where the
search takes its inputs (planner/search/search.py) and where a cluster is resolved (planner/catalog.py); a
Workload read from a plan file is held to the same numbers (planner/planfile.py). Each refusal is one line that
names the cap and the flag or field.
"""
from __future__ import annotations

from planner.core.errors import BadInput

# Devices in one cluster. The largest training clusters announced hold 1-2 x 10^5 accelerators (xAI Colossus,
# 2024-25); 10^6 leaves ten times that, while a cluster is one Python object per device (about 6 KB each:
# 10^9 devices took 5.9 GB before being killed). Every parallel degree (tp, pp, dp, cp, ep) and --max-* is
# a number of devices, so it shares the cap.
MAX_DEVICES = 10**6

# Tokens per sequence: 2^24 = 16.8M, past the longest contexts trained so far (10M tokens, Llama 4 Scout,
# 2025). The cost model squares the sequence (attention scores) and multiplies it by the hidden size and the
# batch in int64 and float64; 2^63 overflows numpy's C long outright (--seq 9223372036854775808).
MAX_SEQ_LEN = 2**24

# Sequences per optimizer step. Published runs use 10^3 - 10^4 (GPT-3: 1,536 at 2K, Llama 3: 2,048 at 8K;
# BERT with LAMB: 65,536); 2^24 is a thousand times past them and keeps gbs * seq under 2^48 tokens.
MAX_GLOBAL_BATCH = 2**24

# Micro-batches per pipeline per step (global batch / (mbs * dp)). The schedule simulation keeps a few
# arrays of (micro-batches x stages x chunks) items: 10^13 sequences asked for a 931 GiB array, and 10^6
# micro-batches made `simulate --json` write 478 MB. 10^5 is 100x the micro-batch counts of published
# pipelines (Megatron's 1T run: 1,536 / (1 x 6) = 256 per pipeline).
MAX_MICROBATCHES = 10**5

# The heterogeneous planner (planner/planners/hetero.py: A100 beside H100) simulates every candidate pipeline
# micro-batch by micro-batch: llama3-8b on mixed-a100-h100 took 28 s at 256 micro-batches, 77 s and 0.55 GB
# at 2,048, 139 s and 1.5 GB at 8,192, past 300 s and 3 GB at 10^5 (2 shared cores). 2,048 keeps it near a minute.
MAX_HETERO_MICROBATCHES = 2048

# The largest micro-batch the search tries when --mbs is not fixed (Constraints.max_mbs); used to say whether
# any plan could keep the micro-batch count under MAX_MICROBATCHES before searching.
SEARCH_MAX_MBS = 16

# Plans `plan --top` prints and costs one by one: more than anyone reads, small enough to stay fast.
MAX_TOP = 1000

# Cells of one `sweep` grid: each is a full search (0.1 - 10 s), so 10^4 cells are already hours.
MAX_SWEEP_CELLS = 10_000


def check_int(flag: str, value, cap: int, what: str = "") -> int | None:
    """value (None passes) as a positive integer no larger than cap, else BadInput naming flag and cap."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"{flag} must be a positive integer, got {value!r}")
    if value <= 0:
        raise BadInput(f"{flag} must be a positive integer, got {value}")
    if value > cap:
        raise BadInput(f"{flag} {value} is past the cap of {cap:,}{' ' + what if what else ''}; "
                       f"give at most {cap:,}")
    return value


def min_microbatches(global_batch: int, devices: int, mbs: int | None = None, dp: int | None = None) -> int:
    """The fewest micro-batches per step any plan can have: the largest micro-batch (mbs, or the search's
    largest) on the widest data parallelism (dp, or every device). Ceiling division: a plan's count is
    global_batch / (mbs * dp) (ParallelPlan.microbatches)."""
    width = (mbs or SEARCH_MAX_MBS) * (dp or devices)
    return -(-global_batch // width)


def check_microbatches(global_batch: int, devices: int, mbs: int | None = None, dp: int | None = None,
                       flag: str = "--gbs", cap: int = MAX_MICROBATCHES) -> None:
    """BadInput when no plan of this batch on these devices keeps under `cap` micro-batches per step."""
    m = min_microbatches(global_batch, devices, mbs, dp)
    if m > cap:
        width = (f"mbs {mbs}" if mbs else f"mbs <= {SEARCH_MAX_MBS}") + (f", dp {dp}" if dp else f", {devices} devices")
        raise BadInput(f"{flag} {global_batch} needs at least {m:,} micro-batches per step ({width}), past the cap "
                       f"of {cap:,}; lower {flag} or raise --mbs")


def check_workload(global_batch: int, seq_len: int, where: str = "workload") -> None:
    """The Workload fields held to the caps (a plan file, the Python API), BadInput naming the field."""
    check_int(f"{where}.global_batch", global_batch, MAX_GLOBAL_BATCH, "sequences per step")
    check_int(f"{where}.seq_len", seq_len, MAX_SEQ_LEN, "tokens per sequence")
