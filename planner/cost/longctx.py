"""Long-context terms: all-to-all (Ulysses) context parallelism and activation offload to host memory.

Pure functions; sizes may be numpy arrays. Bytes are what one device sends, per layer, per micro-batch, per
pass (forward or backward), as comm.all_to_all_time_s takes them.
"""
from __future__ import annotations

import numpy as np


def ulysses_a2a_bytes(b, s, heads: int, kv_heads: int, head_dim: int, cp, tp, dtype_bytes):
    """DeepSpeed-Ulysses bytes one rank hands to all-to-alls in one pass of one attention layer.

    Before the core, Q, K and V of the rank's s/cp tokens are re-sharded to all s tokens of heads/cp heads;
    after it the output goes back: (a + 2 kv) d + a d elements per token, over the rank's tp share of the
    heads (Jacobs et al. 2023 section 3.2: 4Nh per layer for MHA, 4Nh/P per link). The backward pass moves
    the same volume of gradients. With GQA and kv < cp, K/V heads are replicated to cp (Δ)."""
    c = np.asarray(cp, dtype=float)
    kv = np.maximum(kv_heads, c)
    per_token = (2 * heads + 2 * kv) * head_dim / np.asarray(tp, dtype=float)
    out = np.asarray(b, dtype=float) * np.asarray(s, dtype=float) / c * per_token * dtype_bytes
    return float(out) if np.ndim(out) == 0 else out


def offload_exposed_s(nbytes, host_bytes_per_s: float, overlap_s):
    """Exposed time of a host transfer that runs beside `overlap_s` of compute on its own copy engine:
    max(0, bytes / B_host - overlap) (formulas.md 2.4, Δ; Megatron fine-grained activation offloading and
    SPPO overlap D2H / H2D with the layer's compute)."""
    t = np.asarray(nbytes, dtype=float) / host_bytes_per_s - np.asarray(overlap_s, dtype=float)
    out = np.maximum(t, 0.0)
    return float(out) if np.ndim(out) == 0 else out
