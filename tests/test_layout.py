"""RankLayout (planner/core/layout.py) against hand-solved groups in Megatron's rank order, and the links
cost/links.py builds from them."""
from __future__ import annotations

import pytest

from planner.catalog import load_cluster
from planner.core.errors import BadInput
from planner.core.layout import RankLayout, rank_layout
from planner.core.plan import ParallelPlan
from planner.cost.links import cached_p2p, group_link, pipeline_p2p_s, stage_links, strided_link


def partition(layout: RankLayout, name: str, world: int) -> list[tuple[int, ...]]:
    """The distinct groups `name` cuts the world into, in order of their first rank."""
    return sorted({layout.group(name, r) for r in range(world)})


def test_megatron_documented_example():
    # Megatron-LM parallel_state.initialize_model_parallel docstring: 16 GPUs, tp 2, pp 4 (so dp 2)
    lay = RankLayout(tp=2, cp=1, dp=2, pp=4)
    assert partition(lay, "tp", 16) == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15)]
    assert partition(lay, "pp", 16) == [(0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15)]
    assert partition(lay, "dp", 16) == [(0, 2), (1, 3), (4, 6), (5, 7), (8, 10), (9, 11), (12, 14), (13, 15)]


def test_two_nodes_tp2_cp2_dp2_pp2_rank5():
    # rank 5 = stage 0, local 5: tp coordinate 1, cp 0, dp 1 (strides 1, 2, 4)
    lay = RankLayout(tp=2, cp=2, dp=2, pp=2)
    assert lay.group("tp", 5) == (4, 5)
    assert lay.group("cp", 5) == (5, 7)
    assert lay.group("dp", 5) == (1, 5)
    assert lay.group("dp_cp", 5) == (1, 3, 5, 7)
    assert lay.group("pp", 5) == (5, 13)
    # stage 1 repeats stage 0's pattern 8 ranks on
    assert lay.group("tp", 13) == (12, 13) and lay.group("dp_cp", 13) == (9, 11, 13, 15)
    for name, size in (("tp", 2), ("cp", 2), ("dp", 2), ("dp_cp", 4), ("pp", 2)):
        groups = partition(lay, name, 16)
        assert len(groups) == 16 // size and sorted(r for g in groups for r in g) == list(range(16))


def test_expert_groups_fold_over_dp_cp_tp():
    # ep 2, etp 1: the 8 ranks of a stage refold as etp 1 x ep 2 x edp 4
    lay = RankLayout(tp=2, cp=2, dp=2, pp=2, ep=2, etp=1)
    assert lay.group("etp", 5) == (5,)
    assert lay.group("ep", 5) == (4, 5)
    assert lay.group("edp", 5) == (1, 3, 5, 7)
    # etp unset: the experts split like attention (etp = tp 2), so ep 2 leaves edp 2
    lay = RankLayout(tp=2, cp=2, dp=2, pp=2, ep=2)
    assert lay.group("etp", 5) == (4, 5)
    assert lay.group("ep", 5) == (5, 7)
    assert lay.group("edp", 5) == (1, 5)
    with pytest.raises(BadInput):
        RankLayout(tp=2, cp=1, dp=3, pp=1, ep=4).group("ep", 0)


def test_placed_stages_read_their_own_devices():
    lay = RankLayout(tp=2, cp=2, dp=2, pp=2, stages=(tuple(range(8, 16)), tuple(range(8))))
    assert lay.group("tp", 5) == (12, 13)
    assert lay.group("pp", 5) == (13, 5)
    assert lay.stage_group("dp_cp", 1) == (0, 2, 4, 6)


def test_rank_layout_resolves_placement_and_refuses_reuse():
    cluster = load_cluster("dgx-h100", 2)
    plan = ParallelPlan(tp=2, cp=2, dp=2, pp=2, partition=[
        {"layers": [0, 1], "devices": list(range(8, 16))}, {"layers": [1, 2], "devices": list(range(8))}])
    assert rank_layout(cluster, plan).stages == (tuple(range(8, 16)), tuple(range(8)))
    assert rank_layout(cluster, ParallelPlan(tp=2, cp=2, dp=2, pp=2)).stages is None
    bad = ParallelPlan(tp=2, cp=2, dp=2, pp=2, partition=[
        {"layers": [0, 1], "devices": list(range(8))}, {"layers": [1, 2], "devices": list(range(8))}])
    with pytest.raises(BadInput, match="reuses"):
        rank_layout(cluster, bad)


def test_links_of_groups():
    cluster = load_cluster("dgx-h100", 2)
    lay = RankLayout(tp=2, cp=2, dp=4, pp=1)
    listed = RankLayout(tp=2, cp=2, dp=4, pp=1, stages=(tuple(range(16)),))
    for name in ("tp", "cp", "dp_cp"):
        link = group_link(cluster, lay, name)
        assert link == cluster.collective(lay.stage_group(name, 0)) == group_link(cluster, listed, name)
        assert group_link(cluster, lay, name) is link  # remembered on the cluster
    tp, cp, dp_cp, ep = stage_links(cluster, lay)
    assert tp.nodes == 1 and cp.nodes == 1 and dp_cp.nodes == 2 and ep is None
    assert strided_link(cluster, 0, 8, 2).nodes == 2
    # pp 2 over two nodes of 8: the boundary leaves the node, so the transfer runs at the NIC's speed
    p2p = cached_p2p(cluster)
    bw, lat = p2p(0, 8)
    assert p2p(0, 8) is p2p(0, 8) and bw < cluster.p2p(0, 1)[0]
    assert pipeline_p2p_s(cluster, 2, 8, 1e6) == pytest.approx(lat + 1e6 / bw, rel=1e-9)
