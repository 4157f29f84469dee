"""The links of a RankLayout's groups: Cluster.collective of each group and Cluster.p2p of a pipeline's pairs.

One cache, carried by the cluster itself (Cluster._collective_cache: the cluster is immutable, so what it
answers once holds for its life, and the cache goes when the cluster goes): a search asks for the same few
groups of a 16k-device cluster hundreds of thousands of times, and a dp group of 16k ranks is otherwise a
16k-element tuple built and hashed on every call.
"""
from __future__ import annotations

import numpy as np

from planner.core.hardware import Cluster
from planner.core.layout import RankLayout
from planner.cost import comm


def strided_link(cluster: Cluster, first: int, stride: int, size: int):
    """Cluster.collective over devices first, first + stride, ... (size of them), remembered on the cluster by
    (first, stride, size): the groups of a layout whose rank r is device r (RankLayout.strided)."""
    cache = cluster._collective_cache
    key = ("strided", first, stride, size)
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = cluster.collective(range(first, first + stride * size, stride))
    return hit


def group_link(cluster: Cluster, layout: RankLayout, name: str, stage: int = 0):
    """The CollectiveLink of group `name` of the stage's first rank (RankLayout.stage_group)."""
    if layout.stages is None:
        stride, size = layout.strided(name)
        return strided_link(cluster, stage * layout.stage_size, stride, size)
    return cluster.collective(layout.stage_group(name, stage))


def stage_links(cluster: Cluster, layout: RankLayout, stage: int = 0):
    """(tp, cp, dp x cp, ep) CollectiveLinks of the stage; ep None without expert parallelism."""
    ep = group_link(cluster, layout, "ep", stage) if layout.ep > 1 else None
    return (group_link(cluster, layout, "tp", stage), group_link(cluster, layout, "cp", stage),
            group_link(cluster, layout, "dp_cp", stage), ep)


def cached_p2p(cluster: Cluster):
    """Cluster.p2p with its answers remembered on the cluster."""
    memo = cluster._collective_cache.setdefault(("p2p",), {})

    def p2p(src: int, dst: int):
        hit = memo.get((src, dst))
        if hit is None:
            hit = memo[(src, dst)] = cluster.p2p(src, dst)
        return hit
    return p2p


def pipeline_p2p_s(cluster: Cluster, pp: int, stage_size: int, nbytes, p2p=None):
    """Time of one activation transfer between pipeline stages (nbytes may be an array).

    The simulator takes one transfer time, so the slowest boundary along rank 0's pipeline group (one that
    leaves a node) sets it; interleaving also wraps the last stage back to the first. `p2p` replaces
    cluster.p2p (a cache). Alpha-beta time per transfer (docs/formulas.md#comm-alpha-beta).
    """
    p2p = p2p or cluster.p2p
    ring = RankLayout(tp=1, cp=1, dp=stage_size, pp=pp).group("pp", 0)
    links = {p2p(a, c) for a, c in zip(ring, ring[1:] + ring[:1]) if a != c}
    return np.max([comm.p2p_time_s(nbytes, bw, lat) for bw, lat in links], axis=0)
