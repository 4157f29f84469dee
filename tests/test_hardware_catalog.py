"""The hardware catalog (hardware_profiles/): every DESIGN.md preset exists and loads, every entry names
its source, and the figures agree with the reference tables (tests/data/devices.csv and links.csv, copies of
../shared/reference/ so the tests need nothing outside the repository)."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from planner import catalog  # noqa: E402
from planner.core.hardware import Cluster  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"

# DESIGN.md section 3, "Preset names that must exist" (hardware part), including the names the
# published-runs tables use and the heterogeneous and edge clusters.
DESIGN_DEVICES = [
    "a100-sxm-40gb", "a100-sxm-80gb", "h100-sxm-80gb", "h200-sxm-141gb", "b200", "mi250x-gcd", "mi300x",
    "ascend-910b", "tpu-v5p", "snapdragon-8gen3-cpu", "snapdragon-8gen3-gpu", "apple-a17-pro-gpu",
    "jetson-agx-orin",
    "h100-96gb-500w", "h800-sxm-80gb", "v100-sxm-32gb", "tpu-v4", "tpu-v5e",
]
DESIGN_LINKS = [
    "nvlink3", "nvlink4", "nvlink5", "pcie4", "pcie5", "xgmi", "hccs", "ib-hdr", "ib-ndr", "roce-100g",
    "roce-200g", "roce-400g", "eth-10g", "eth-25g", "eth-100g", "slingshot-11", "efa-v2", "wifi6", "5g",
]
DESIGN_NODE_CLUSTERS = [
    "dgx-a100-40gb", "dgx-a100-80gb", "dgx-h100", "hgx-h200", "frontier", "ascend-910b-x8",
    "phone-snapdragon-8gen3",
    "dgx-b200", "grand-teton-h100", "hgx-h800", "tpu-v4-pod", "tpu-v5e-pod", "tpu-v5p-pod",
]
DESIGN_FIXED_CLUSTERS = ["mixed-a100-h100", "two-pods-25gbe", "phones-snapdragon-wifi6", "jetson-orin-x4"]
DESIGN_CLUSTERS = DESIGN_NODE_CLUSTERS + DESIGN_FIXED_CLUSTERS

# Device and cluster names of ../shared/reference/calibration_runs_clean.csv (the `device` and `cluster`
# columns, 'unknown' aside), which `backtest` must resolve.
CALIBRATION_PAIRS = [
    ("a100-sxm-80gb", "dgx-a100-80gb"), ("b200", "dgx-b200"), ("h100-96gb-500w", "grand-teton-h100"),
    ("h100-sxm-80gb", "dgx-h100"), ("tpu-v5e", "tpu-v5e-pod"),
]

# Reference-table name -> catalog names carrying the same figures (README "Names": pcie4 is pcie4-x16 ...).
LINK_ALIASES = {
    "pcie4-x16": ["pcie4-x16", "pcie4"],
    "pcie5-x16": ["pcie5-x16", "pcie5"],
    "xgmi-mi300x": ["xgmi-mi300x", "xgmi"],
}
DEVICE_PEAK_COLUMNS = {
    "bf16": "peak_bf16_dense_tflops", "fp16": "peak_fp16_dense_tflops", "fp8": "peak_fp8_dense_tflops",
    "fp32": "peak_fp32_tflops", "tf32": "peak_tf32_dense_tflops",
}
# Where the catalog deliberately differs from a CSV column, with the reason; the test still checks the
# catalog against the converted CSV figure, so a typo cannot hide here.
UNIT_CONVERSIONS = {
    # devices.csv memory_gb says 32 and its notes "32 GiB (34.4 GB)"; the schema counts GB = 1e9 bytes.
    ("tpu-v4", "memory_gb"): lambda csv_value: csv_value * 2**30 / 1e9,
}


def _rows(name: str) -> list[dict[str, str]]:
    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(f))


def _num(text: str) -> float | None:
    text = (text or "").strip()
    return float(text) if text else None


def _close(a: float, b: float, rel: float = 0.01) -> bool:
    return math.isclose(a, b, rel_tol=rel)


# ---------------------------------------------------------------------------------------------------
# (a) every DESIGN.md preset loads


@pytest.mark.parametrize("name", DESIGN_DEVICES)
def test_design_devices_load(name):
    d = catalog.device(name)
    assert d.name == name
    assert d.peak_flops("bf16") > 0 and d.memory_bytes > 0 and d.memory_bandwidth_bytes_per_s > 0


@pytest.mark.parametrize("name", DESIGN_LINKS)
def test_design_links_load(name):
    link = catalog.link(name)
    assert link.name == name
    assert link.bytes_per_s > 0 and link.latency_s >= 0


@pytest.mark.parametrize("name", DESIGN_CLUSTERS)
def test_design_clusters_load(name):
    assert name in catalog.cluster_names()
    spec = catalog.cluster_spec(name)
    cluster = catalog.load_cluster(name, nodes=2 if spec.needs_node_count else None)
    assert isinstance(cluster, Cluster) and cluster.device_count >= 2


@pytest.mark.parametrize("name", DESIGN_NODE_CLUSTERS)
def test_node_presets_take_node_count(name):
    one = catalog.load_cluster(name, nodes=1)
    three = catalog.load_cluster(name, nodes=3)
    assert catalog.cluster_spec(name).needs_node_count
    assert three.device_count == 3 * one.device_count


@pytest.mark.parametrize("name", DESIGN_FIXED_CLUSTERS)
def test_fixed_clusters_have_a_size(name):
    spec = catalog.cluster_spec(name)
    assert not spec.needs_node_count
    total = sum(g.count for g in spec.groups)
    assert len(catalog.load_cluster(name).nodes) == total


@pytest.mark.parametrize(("device", "cluster"), CALIBRATION_PAIRS)
def test_calibration_names_resolve(device, cluster):
    c = catalog.load_cluster(cluster, nodes=2)
    assert c.device_types == [device]


def test_hand_checked_node_layouts():
    """The shapes DESIGN.md spells out: Frontier is 8 GCDs with 4 Slingshot-11 NICs (one per package);
    the phone is one CPU and one GPU sharing memory behind one Wi-Fi 6 radio; DGX nodes have 8 NICs."""
    frontier = catalog.node_type("frontier")
    assert sum(s.count for s in frontier.devices) == 8
    assert frontier.nics.link == "slingshot-11" and frontier.nics.count == 4 and frontier.nics.devices_per_nic == 2
    phone = catalog.node_type("phone-snapdragon-8gen3")
    assert [(s.device, s.count) for s in phone.devices] == [
        ("snapdragon-8gen3-cpu", 1), ("snapdragon-8gen3-gpu", 1)]
    assert phone.shared_memory and catalog.link(phone.intra_link).kind == "memory"
    assert phone.nics.link == "wifi6" and phone.nics.count == 1 and phone.nics.devices_per_nic == 2
    for name in ("dgx-a100-40gb", "dgx-a100-80gb", "dgx-h100", "hgx-h200", "dgx-b200", "hgx-h800",
                 "grand-teton-h100", "ascend-910b-x8"):
        node = catalog.node_type(name)
        assert sum(s.count for s in node.devices) == 8 and node.nics.count == 8, name
    wifi = catalog.link("wifi6")
    assert wifi.shared_medium and wifi.half_duplex


def test_every_node_and_cluster_resolves():
    for name in catalog.cluster_names():
        spec = catalog.cluster_spec(name)
        cluster = catalog.load_cluster(name, nodes=2 if spec.needs_node_count else None)
        assert cluster.device_count >= 1, name


# ---------------------------------------------------------------------------------------------------
# (b) every entry names its source


def _all_entries():
    for section in ("devices", "links", "nodes", "clusters"):
        for name in catalog.names(section):
            yield section, catalog._hardware_catalog()[section][name]


def test_every_entry_has_a_source():
    entries = list(_all_entries())
    assert len(entries) > 60
    for section, obj in entries:
        assert obj.source.strip(), f"{section} {obj.name} has no source"
        assert len(obj.source.strip()) >= 10, f"{section} {obj.name}: source too short to name a document"


def test_device_efficiency_overrides_name_their_measurement():
    default = catalog.device("tpu-v5p").efficiency  # no measurement: the defaults
    for name in catalog.names("devices"):
        eff = catalog.device(name).efficiency
        if (eff.matmul, eff.memory) != (default.matmul, default.memory):
            assert eff.source != default.source, f"{name}: efficiency changed but its source is the default's"


def test_assumed_numbers_are_flagged():
    """Every link without a sourced latency, and every device without a sourced memory bandwidth, says
    in its provenance and notes that the figure is assumed."""
    for row in _rows("links.csv"):
        if _num(row["latency_us"]) is None:
            for name in LINK_ALIASES.get(row["name"], [row["name"]]):
                link = catalog.link(name)
                assert link.provenance == "assumed", name
                assert "assumed" in link.notes.lower(), name
    for row in _rows("devices.csv"):
        if _num(row["memory_bw_gb_s"]) is None:
            dev = catalog.device(row["name"])
            assert dev.provenance == "assumed" and "assumed" in dev.notes.lower(), row["name"]
    for name in ("wifi6", "eth-10g", "eth-25g", "eth-100g", "xgmi", "hccs", "slingshot-11", "efa-v2"):
        assert catalog.link(name).provenance == "assumed", name


def test_derived_and_unofficial_devices_are_marked_derived():
    for row in _rows("devices.csv"):
        notes = row["notes"]
        if "DERIVED" in notes or "UNOFFICIAL" in notes or "Derived =" in notes:
            assert catalog.device(row["name"]).provenance in ("derived", "assumed"), row["name"]
    assert catalog.device("h100-96gb-500w").provenance == "derived"


# ---------------------------------------------------------------------------------------------------
# (c) the catalog agrees with the reference tables


def _expected(name: str, field: str, csv_value: float) -> float:
    convert = UNIT_CONVERSIONS.get((name, field))
    return convert(csv_value) if convert else csv_value


def test_every_reference_device_is_in_the_catalog():
    assert {r["name"] for r in _rows("devices.csv")} <= set(catalog.names("devices"))


@pytest.mark.parametrize("row", _rows("devices.csv"), ids=lambda r: r["name"])
def test_devices_agree_with_reference(row):
    d = catalog.device(row["name"])
    for dtype, column in DEVICE_PEAK_COLUMNS.items():
        value = _num(row[column])
        if value is not None:
            assert dtype in d.peak_tflops, f"{d.name}: reference gives {dtype} but the profile lacks it"
            assert _close(d.peak_tflops[dtype], value), (d.name, dtype, d.peak_tflops[dtype], value)
        else:
            assert dtype not in d.peak_tflops, f"{d.name}: {dtype} peak not in the reference table"
    for field, column in (("memory_gb", "memory_gb"), ("memory_bandwidth_gb_s", "memory_bw_gb_s"),
                          ("tdp_w", "tdp_w")):
        value = _num(row[column])
        if value is not None:
            got = getattr(d, field)
            want = _expected(d.name, field, value)
            assert got is not None and _close(got, want), (d.name, field, got, want)
    assert d.kind == row["kind"] and d.vendor == row["vendor"]


def test_every_reference_link_is_in_the_catalog():
    names = set(catalog.names("links"))
    for row in _rows("links.csv"):
        for name in LINK_ALIASES.get(row["name"], [row["name"]]):
            assert name in names, name


@pytest.mark.parametrize("row", _rows("links.csv"), ids=lambda r: r["name"])
def test_links_agree_with_reference(row):
    kind = row["kind"]
    for name in LINK_ALIASES.get(row["name"], [row["name"]]):
        link = catalog.link(name)
        assert link.kind == kind, name
        assert _close(link.bandwidth_gb_s, float(row["bandwidth_gb_s_per_direction_per_device"])), name
        latency = _num(row["latency_us"])
        if latency is not None:
            assert _close(link.latency_us, latency), (name, link.latency_us, latency)


def test_aliases_are_identical():
    for names in LINK_ALIASES.values():
        first = catalog.link(names[0]).model_dump(exclude={"name", "notes"})
        for other in names[1:]:
            assert catalog.link(other).model_dump(exclude={"name", "notes"}) == first


def test_measured_fractions_from_reference():
    """achievable_fraction where reference/clusters.md section 10 has a measurement."""
    assert catalog.link("nvlink4").bytes_per_s / 1e9 == pytest.approx(370, rel=0.01)  # ring busbw ~370
    assert 46 <= catalog.link("ib-ndr").bytes_per_s / 1e9 <= 48  # 46-48 GB/s per NDR NIC
    assert 0.9 <= catalog.link("ib-hdr").achievable_fraction <= 0.96
    assert catalog.link("nvlink3").bytes_per_s / 1e9 == pytest.approx(231.6, rel=0.01)


# ---------------------------------------------------------------------------------------------------
# (d) the CLI lists every DESIGN name


def test_cli_profiles_list_json_has_every_design_name():
    proc = subprocess.run([sys.executable, "cli.py", "profiles", "list", "--json"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert set(DESIGN_DEVICES) <= set(listed["devices"])
    assert set(DESIGN_LINKS) <= set(listed["links"])
    assert set(DESIGN_CLUSTERS) <= set(listed["clusters"])


def test_device_fit_can_be_switched_off_for_a_refit():
    """planner.eval.fit starts from the profiles' own values (catalog.use_device_fit(False)): the fitted overlay
    is the only thing that changes, and switching back restores it."""
    import yaml

    fitted = yaml.safe_load((catalog.profiles_dir() / catalog.FITTED_EFFICIENCY_FILE).read_text())["devices"]
    name, values = sorted(fitted.items())[0]
    on = catalog.device(name).efficiency
    try:
        catalog.use_device_fit(False)
        off = catalog.device(name).efficiency
    finally:
        catalog.use_device_fit(True)
    assert on.source.startswith("fitted") and not off.source.startswith("fitted")
    assert all(getattr(on, k) == pytest.approx(v) for k, v in values.items())
    assert on.model_dump(exclude={"source", *values}) == off.model_dump(exclude={"source", *values})
    assert catalog.device(name).efficiency == on
