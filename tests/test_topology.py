"""Topology: collective_link and Cluster.p2p on catalog clusters, solved by hand from the YAML figures
(read from the catalog here, so a changed profile changes the expectation, not the arithmetic), plus a
monotonicity property over small synthetic clusters."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from planner import catalog  # noqa: E402
from planner.core.hardware import GB, MICRO, ClusterSpec, collective_link  # noqa: E402


def achievable(link_name: str) -> float:
    """bytes/s per direction of one port of a catalog link, by hand: line rate x achievable fraction."""
    link = catalog.link(link_name)
    return link.bandwidth_gb_s * GB * link.achievable_fraction


def latency(link_name: str) -> float:
    return catalog.link(link_name).latency_us * MICRO


def node(name: str):
    return catalog.node_type(name)


# ---------------------------------------------------------------------------------------------------
# collective_link


def test_one_dgx_h100_all_eight_gpus_is_nvlink():
    nt = node("dgx-h100")
    cluster = catalog.load_cluster("dgx-h100", nodes=1)
    c = collective_link(cluster, range(8))
    assert c.level == "intra-node" and c.ranks == 8 and c.nodes == 1
    assert c.bus_bytes_per_s == pytest.approx(achievable(nt.intra_link), rel=1e-12)
    # NVLink4: 450 GB/s x 0.82 = 369 GB/s, the measured ring busbw (~370) of reference clusters.md 10.
    assert c.bus_bytes_per_s == pytest.approx(369e9, rel=0.01)
    assert c.latency_s == pytest.approx(latency(nt.intra_link))


def test_two_dgx_h100_sixteen_gpus_bounded_by_nvlink_and_eight_nics():
    nt = node("dgx-h100")
    cluster = catalog.load_cluster("dgx-h100", nodes=2)
    c = collective_link(cluster, range(16))
    nvlink = achievable(nt.intra_link)
    nics = nt.nics.count * achievable(nt.nics.link)  # 8 x NDR, one ring per NIC
    assert c.level == "inter-node" and c.ranks == 16 and c.nodes == 2
    assert c.bus_bytes_per_s == pytest.approx(min(nvlink, nics), rel=1e-12)
    # by hand: min(450 x 0.82, 8 x 50 x 0.94) = min(369, 376) GB/s = 369: NVLink binds, just.
    assert c.bus_bytes_per_s == pytest.approx(369e9, rel=0.01)
    assert c.latency_s == pytest.approx(max(latency(nt.intra_link), latency(nt.nics.link)))


def test_one_gpu_per_node_uses_one_nic():
    nt = node("dgx-h100")
    cluster = catalog.load_cluster("dgx-h100", nodes=4)
    ids = [n * 8 for n in range(4)]  # local GPU 0 of each node
    c = collective_link(cluster, ids)
    assert c.level == "inter-node" and c.nodes == 4 and c.ranks == 4
    assert c.bus_bytes_per_s == pytest.approx(achievable(nt.nics.link), rel=1e-12)  # 50 x 0.94 = 47 GB/s
    assert c.latency_s == pytest.approx(latency(nt.nics.link))


def test_two_gpus_per_node_sharing_a_nic_on_frontier():
    """Frontier: one Slingshot NIC per 2 GCDs. GCDs 0 and 1 of each node share NIC 0; GCDs 0 and 2 use two."""
    nt = node("frontier")
    cluster = catalog.load_cluster("frontier", nodes=2)
    shared = collective_link(cluster, [0, 1, 8, 9])
    separate = collective_link(cluster, [0, 2, 8, 10])
    nic = achievable(nt.nics.link)
    xgmi = achievable(nt.intra_link)
    assert shared.bus_bytes_per_s == pytest.approx(min(xgmi, 1 * nic), rel=1e-12)
    assert separate.bus_bytes_per_s == pytest.approx(min(xgmi, 2 * nic), rel=1e-12)
    whole = collective_link(cluster, range(16))
    assert whole.bus_bytes_per_s == pytest.approx(min(xgmi, nt.nics.count * nic), rel=1e-12)


def test_two_pods_crossing_islands_bounded_by_25gbe_ports():
    spec = catalog.cluster_spec("two-pods-25gbe")
    cluster = catalog.load_cluster("two-pods-25gbe")
    nt = node("dgx-h100")
    gateway = spec.between_islands
    port = achievable(gateway.link)  # 25 GbE: 3.125 GB/s x fraction
    nodes_per_pod = [g.count for g in spec.groups]
    assert nodes_per_pod == [4, 4] and cluster.device_count == 64

    whole = collective_link(cluster, range(64))
    assert whole.level == "inter-island"
    expected = min(achievable(nt.intra_link), nt.nics.count * achievable(spec.fabric),
                   port * gateway.ports_per_node * 4)
    assert whole.bus_bytes_per_s == pytest.approx(expected, rel=1e-12)
    assert whole.bus_bytes_per_s == pytest.approx(4 * port, rel=1e-12)  # 4 nodes x 1 port per pod binds
    assert whole.latency_s == pytest.approx(latency(gateway.link))  # TCP latency dominates

    # one GPU in each pod: one node per island, one 25 GbE port
    pair = collective_link(cluster, [0, 32])
    assert pair.bus_bytes_per_s == pytest.approx(port * gateway.ports_per_node, rel=1e-12)

    # inside one pod the island link does not appear
    pod_a = collective_link(cluster, range(32))
    assert pod_a.level == "inter-node"
    assert pod_a.bus_bytes_per_s == pytest.approx(
        min(achievable(nt.intra_link), nt.nics.count * achievable(spec.fabric)), rel=1e-12)


def test_mixed_a100_h100_fabric_is_hdr():
    cluster = catalog.load_cluster("mixed-a100-h100")
    assert cluster.device_types == ["a100-sxm-80gb", "h100-sxm-80gb"]
    a100 = node("dgx-a100-80gb")
    c = collective_link(cluster, range(cluster.device_count))
    # HDR fabric: every node's ports run at min(NIC, fabric) = HDR; NVLink3 is the slowest intra link.
    per_node = a100.nics.count * min(achievable(a100.nics.link), achievable("ib-hdr"))
    assert c.bus_bytes_per_s == pytest.approx(min(achievable("nvlink3"), achievable("nvlink4"), per_node),
                                              rel=1e-12)
    # the H100 nodes alone are held to HDR too (their NDR ports on an HDR fabric)
    h100_only = collective_link(cluster, range(16, 32))
    assert h100_only.bus_bytes_per_s == pytest.approx(
        min(achievable("nvlink4"), 8 * achievable("ib-hdr")), rel=1e-12)


def test_phones_on_wifi_share_the_medium_and_halve_it():
    spec = catalog.cluster_spec("phones-snapdragon-wifi6")
    cluster = catalog.load_cluster("phones-snapdragon-wifi6")
    wifi = catalog.link(spec.fabric)
    assert wifi.shared_medium and wifi.half_duplex
    phones = spec.groups[0].count
    assert cluster.device_count == 2 * phones

    everyone = collective_link(cluster, range(cluster.device_count))
    air = achievable(spec.fabric)  # 0.073 GB/s aggregate measured TCP, fraction 1.0
    assert everyone.bus_bytes_per_s == pytest.approx(air / phones / 2, rel=1e-12)
    assert everyone.bus_bytes_per_s == pytest.approx(0.073e9 / 8 / 2, rel=0.01)  # ~4.6 MB/s per phone
    assert everyone.latency_s == pytest.approx(latency(spec.fabric))

    two_phones = collective_link(cluster, [0, 2])  # the CPUs of phones 0 and 1
    assert two_phones.bus_bytes_per_s == pytest.approx(air / 2 / 2, rel=1e-12)

    # inside one phone: CPU <-> GPU through the shared LPDDR5X
    nt = node("phone-snapdragon-8gen3")
    one_phone = collective_link(cluster, [0, 1])
    assert one_phone.level == "intra-node"
    assert one_phone.bus_bytes_per_s == pytest.approx(achievable(nt.intra_link), rel=1e-12)
    assert catalog.link(nt.intra_link).bandwidth_gb_s == catalog.device("snapdragon-8gen3-gpu").memory_bandwidth_gb_s


def test_jetsons_on_ten_gig_ethernet():
    cluster = catalog.load_cluster("jetson-orin-x4")
    c = collective_link(cluster, range(4))
    assert c.level == "inter-node" and c.nodes == 4
    assert c.bus_bytes_per_s == pytest.approx(achievable("eth-10g"), rel=1e-12)
    assert c.latency_s == pytest.approx(latency("eth-10g"))


def test_tpu_slice_sees_ici_everywhere():
    nt = node("tpu-v5p-pod")
    cluster = catalog.load_cluster("tpu-v5p-pod", nodes=16)  # v5p-128: 64 chips
    ici = achievable(nt.intra_link)
    assert collective_link(cluster, range(4)).bus_bytes_per_s == pytest.approx(ici, rel=1e-12)
    assert collective_link(cluster, range(64)).bus_bytes_per_s == pytest.approx(ici, rel=1e-12)


def test_single_device_and_bad_ids():
    cluster = catalog.load_cluster("dgx-h100", nodes=1)
    assert collective_link(cluster, [5]).level == "self"
    with pytest.raises(ValueError):
        collective_link(cluster, [0, 8])
    with pytest.raises(ValueError):
        collective_link(cluster, [])


# ---------------------------------------------------------------------------------------------------
# Cluster.p2p: the widest path's bottleneck and the latencies summed along it


def test_p2p_inside_a_dgx_h100():
    nt = node("dgx-h100")
    cluster = catalog.load_cluster("dgx-h100", nodes=1)
    bw, lat = cluster.p2p(0, 5)
    assert bw == pytest.approx(achievable(nt.intra_link), rel=1e-12)
    assert lat == pytest.approx(latency(nt.intra_link))  # one NVLink hop, as NCCL's per-hop latency
    assert cluster.p2p(3, 3) == (float("inf"), 0.0)
    assert cluster.p2p_by_graph(0, 5)[0] == pytest.approx(bw, rel=1e-12)


def test_p2p_across_two_dgx_h100():
    nt = node("dgx-h100")
    cluster = catalog.load_cluster("dgx-h100", nodes=2)
    bw, lat = cluster.p2p(0, 8)
    assert bw == pytest.approx(achievable(nt.nics.link), rel=1e-12)  # one NDR port: 47 GB/s
    assert lat == pytest.approx(latency(nt.nics.link))  # one network crossing
    # the structural answer is the widest path through the topology graph
    assert cluster.p2p_by_graph(0, 8)[0] == pytest.approx(bw, rel=1e-12)


def test_p2p_across_pods_goes_through_25gbe():
    spec = catalog.cluster_spec("two-pods-25gbe")
    cluster = catalog.load_cluster("two-pods-25gbe")
    nt = node("dgx-h100")
    bw, lat = cluster.p2p(0, 40)
    port = achievable(spec.between_islands.link) * spec.between_islands.ports_per_node
    assert bw == pytest.approx(port, rel=1e-12)
    # one NDR crossing inside the pod, then the 25 GbE gateway between pods
    assert lat == pytest.approx(latency(nt.nics.link) + latency(spec.between_islands.link))
    assert cluster.p2p_by_graph(0, 40)[0] == pytest.approx(bw, rel=1e-12)


def test_p2p_between_phones_is_one_wifi_channel():
    cluster = catalog.load_cluster("phones-snapdragon-wifi6")
    bw, _ = cluster.p2p(0, 3)
    assert bw == pytest.approx(achievable("wifi6"), rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# Property: more NIC (fabric, gateway) bandwidth never lowers collective bandwidth.

NODE_TYPES = ["dgx-h100", "dgx-a100-80gb", "frontier", "ascend-910b-x8", "jetson-orin", "hgx-h800"]
# Switched, full-duplex networks only: a shared medium (Wi-Fi) is a different rule, not "more bandwidth".
NETWORK_LINKS = ["eth-10g", "eth-25g", "eth-100g", "roce-100g", "roce-200g", "roce-400g", "ib-hdr", "ib-ndr",
                 "slingshot-11", "efa-v2"]


@st.composite
def clusters_and_sets(draw):
    groups = []
    islands = draw(st.integers(1, 2))
    for isl in range(islands):
        for _ in range(draw(st.integers(1, 2))):
            groups.append({"node": draw(st.sampled_from(NODE_TYPES)), "count": draw(st.integers(1, 3)),
                           "island": f"isl{isl}"})
    fabric = draw(st.sampled_from(NETWORK_LINKS))
    faster_fabric = draw(st.sampled_from(NETWORK_LINKS))
    gateway = draw(st.sampled_from(NETWORK_LINKS))
    faster_gateway = draw(st.sampled_from(NETWORK_LINKS))
    ports = draw(st.integers(1, 4))
    more_ports = draw(st.integers(ports, 8))
    if achievable(faster_fabric) < achievable(fabric):
        fabric, faster_fabric = faster_fabric, fabric
    if achievable(faster_gateway) < achievable(gateway):
        gateway, faster_gateway = faster_gateway, gateway

    def spec(fab, gw, p):
        data = {"name": "synthetic", "source": "test: synthetic cluster", "groups": groups, "fabric": fab}
        if islands > 1:
            data["between_islands"] = {"link": gw, "ports_per_node": p}
        return ClusterSpec.model_validate(data)

    base = catalog.resolve_cluster(spec(fabric, gateway, ports))
    n = base.device_count
    ids = draw(st.lists(st.integers(0, n - 1), min_size=min(2, n), max_size=min(n, 24), unique=True))
    return base, [
        catalog.resolve_cluster(spec(faster_fabric, gateway, ports)),
        catalog.resolve_cluster(spec(fabric, faster_gateway, ports)),
        catalog.resolve_cluster(spec(fabric, gateway, more_ports)),
        catalog.resolve_cluster(spec(faster_fabric, faster_gateway, more_ports)),
    ], ids


@settings(max_examples=150, deadline=None)
@given(clusters_and_sets())
def test_more_network_bandwidth_never_lowers_collective_bandwidth(case):
    base, better, ids = case
    b0 = collective_link(base, ids).bus_bytes_per_s
    for other in better:
        assert collective_link(other, ids).bus_bytes_per_s >= b0 * (1 - 1e-12)
        assert other.device_count == base.device_count


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(NODE_TYPES), st.integers(2, 4), st.data())
def test_adding_devices_never_raises_bandwidth_beyond_the_slowest_link(node_name, nodes, data):
    """Any set's bus bandwidth is at most the intra-node link when it has 2+ devices in a node, and at most
    the node's NIC total when it spans nodes."""
    cluster = catalog.load_cluster(node_name, nodes=nodes)
    n = cluster.device_count
    ids = data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=n, unique=True))
    c = collective_link(cluster, ids)
    nt = node(node_name)
    per_node = {}
    for i in ids:
        per_node.setdefault(cluster.devices[i].node, []).append(i)
    if any(len(m) > 1 for m in per_node.values()):
        assert c.bus_bytes_per_s <= achievable(nt.intra_link) * (1 + 1e-12)
    if len(per_node) > 1:
        assert c.bus_bytes_per_s <= nt.nics.count * achievable(nt.nics.link) * (1 + 1e-12)
