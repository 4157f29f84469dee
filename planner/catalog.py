"""The catalogs: device, link and cluster profiles (hardware_profiles/) and model presets (models/).

This is the I/O edge for hardware: YAML in, validated pydantic objects out, every error one line. The
catalog is found in the checkout (hardware_profiles/ beside planner/) or, when installed from a wheel,
in the package data `planner.profiles` / `planner.model_catalog` that pyproject.toml maps them to.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from planner.errors import BadInput, did_you_mean
from planner.hardware import (
    Cluster, ClusterSpec, Device, DeviceRef, Link, NodeInstance, NodeType,
)

T = TypeVar("T", bound=BaseModel)
_REPO_ROOT = Path(__file__).resolve().parent.parent


def _data_dir(checkout_name: str, package: str) -> Path:
    local = _REPO_ROOT / checkout_name
    if local.is_dir():
        return local
    try:
        return Path(str(resources.files(package)))
    except ModuleNotFoundError:  # pragma: no cover - broken install
        raise BadInput(f"cannot find the {checkout_name} catalog; reinstall the package") from None


def profiles_dir() -> Path:
    return _data_dir("hardware_profiles", "planner.profiles")


def models_dir() -> Path:
    return _data_dir("models", "planner.model_catalog")


# ---------------------------------------------------------------------------------------------------
# Reading files: one clear line for every way a file can be wrong.


def read_data_file(path: Path) -> Any:
    """Parse a YAML or JSON file; BadInput naming the file (and line) when it is missing or broken."""
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir():
        raise BadInput(f"{path}: is a directory, expected a YAML or JSON file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}:{e.lineno}:{e.colno}: broken JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInput(f"{where}: broken YAML: {problem}") from None
    except RecursionError:
        raise BadInput(f"{path}: nested too deeply to read") from None


_MAX_LISTED = 3  # errors named in the one line; the rest are counted


def _one_error(e: dict) -> str:
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        return f"unknown field '{loc}' (remove it or check its spelling)"
    if e["type"] == "missing":
        return f"missing field '{loc}'"
    msg = e["msg"]
    if e["type"] == "value_error":
        # A validator's own message ("heads (6) must be a multiple of kv_heads (4)") says it all.
        msg = msg.removeprefix("Value error, ")
        return f"field '{loc}': {msg}" if loc else msg
    value = e.get("input")
    shown = "" if isinstance(value, (dict, list, tuple, set)) else f" (got {_short(value)})"
    return f"field '{loc}': {msg}{shown}" if loc else f"{msg}{shown}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_message(err: ValidationError, where: str) -> str:
    """Every pydantic error (up to three) as one line: file, field path, what is wrong."""
    errors = err.errors()
    parts = list(dict.fromkeys(_one_error(e) for e in errors))
    shown = "; ".join(parts[:_MAX_LISTED])
    more = f" (and {len(parts) - _MAX_LISTED} more)" if len(parts) > _MAX_LISTED else ""
    return f"{where}: {shown}{more}"


def parse_as(model: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise BadInput(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise BadInput(validation_message(e, where)) from None


# ---------------------------------------------------------------------------------------------------
# The hardware catalog.

_SECTIONS = {"devices": Device, "links": Link, "nodes": NodeType, "clusters": ClusterSpec}


@lru_cache(maxsize=1)
def _hardware_catalog() -> dict[str, dict[str, BaseModel]]:
    root = profiles_dir()
    catalog: dict[str, dict[str, BaseModel]] = {k: {} for k in _SECTIONS}
    for section, model in _SECTIONS.items():
        folder = root / section
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.yaml")):
            data = read_data_file(path)
            entries = data if isinstance(data, list) else [data]
            for entry in entries:
                obj = parse_as(model, entry, str(path))
                if obj.name in catalog[section]:
                    raise BadInput(f"{path}: {section[:-1]} '{obj.name}' is defined twice")
                catalog[section][obj.name] = obj
    _apply_fitted_efficiency(root / FITTED_EFFICIENCY_FILE, catalog["devices"], devices_too=_DEVICE_FIT[0])
    return catalog


FITTED_EFFICIENCY_FILE = "fitted_efficiency.yaml"
_STACK_FITS: dict[str, dict[str, dict]] = {}
_DEVICE_FIT = [True]


def use_device_fit(on: bool) -> None:
    """Whether devices carry the fitted efficiencies (the default) or their datasheet / measured profile
    values alone. planner.fit turns it off, so that a refit, its starting point and its leave-one-source-out
    figures never see the previous fit's numbers (which were fitted on the very rows held out)."""
    if _DEVICE_FIT[0] != on:
        _DEVICE_FIT[0] = on
        _hardware_catalog.cache_clear()


def stack_efficiency(stack: str, device_name: str) -> dict:
    """Efficiency fields fitted for one software stack on one device ({} when there is no such fit)."""
    _hardware_catalog()
    return dict(_STACK_FITS.get(stack, {}).get(device_name, {}))


def _apply_fitted_efficiency(path: Path, devices: dict, devices_too: bool = True) -> None:
    """Overlay the efficiencies `python -m planner.fit --write` fitted on published runs; the
    datasheet files stay as published, the fit stays regenerable, and its provenance is kept. The
    per-stack fits are always read; the per-device ones only with devices_too (use_device_fit)."""
    if not path.exists():
        return
    doc = read_data_file(path) or {}
    _STACK_FITS.clear()
    for stack, fit in (doc.get("stacks") or {}).items():
        _STACK_FITS[stack] = fit.get("devices") or {}
    for name, values in ((doc.get("devices") or {}) if devices_too else {}).items():
        if name not in devices:
            raise BadInput(f"{path}: fitted device '{name}' is not in the catalog")
        dev = devices[name]
        src = f"fitted on {doc.get('fitted_on')} ({doc.get('rows')} rows, {doc.get('date')}), planner.fit"
        eff = dev.efficiency.model_copy(update={**values, "source": src})
        devices[name] = dev.model_copy(update={"efficiency": eff})


def names(section: str) -> list[str]:
    return sorted(_hardware_catalog()[section])


def _lookup(section: str, name: str, what: str):
    table = _hardware_catalog()[section]
    if name not in table:
        raise BadInput(f"unknown {what} '{name}'{did_you_mean(name, table)}; "
                       f"see `profiles list` for the {len(table)} known")
    return table[name]


def device(name: str) -> Device:
    return _lookup("devices", name, "device")


def link(name: str) -> Link:
    return _lookup("links", name, "link")


def node_type(name: str) -> NodeType:
    return _lookup("nodes", name, "node type")


def cluster_names() -> list[str]:
    """Cluster presets: every node type (one group, --nodes decides how many) and every cluster file."""
    return sorted(set(_hardware_catalog()["nodes"]) | set(_hardware_catalog()["clusters"]))


def cluster_spec(name_or_path: str) -> ClusterSpec:
    """A cluster preset name, a node type name (one group of that node), or a path to a cluster file."""
    cat = _hardware_catalog()
    if name_or_path in cat["clusters"]:
        return cat["clusters"][name_or_path]
    if name_or_path in cat["nodes"]:
        node = cat["nodes"][name_or_path]
        return ClusterSpec(name=node.name, source=node.source, provenance=node.provenance,
                           groups=[{"node": node.name}])
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        spec = parse_as(ClusterSpec, read_data_file(path), str(path))
        _check_references(spec, str(path))
        return spec
    known = cluster_names()
    raise BadInput(f"unknown cluster '{name_or_path}'{did_you_mean(name_or_path, known)}; "
                   "give a preset name (see `profiles list`) or a path to a cluster YAML file")


def _check_references(spec: ClusterSpec, where: str) -> None:
    """A cluster file's node types and links must exist: say so naming the file and the field."""
    cat = _hardware_catalog()
    refs = [(f"groups.{i}.node", g.node, "nodes", "node type") for i, g in enumerate(spec.groups)]
    if spec.fabric is not None:
        refs.append(("fabric", spec.fabric, "links", "link"))
    if spec.between_islands is not None:
        refs.append(("between_islands.link", spec.between_islands.link, "links", "link"))
    for field, name, section, what in refs:
        if name not in cat[section]:
            hint = did_you_mean(name, cat[section])
            if section == "nodes" and name in cat["devices"]:
                hint = f" ('{name}' is a device; a group names a node type, see `profiles list`)"
            raise BadInput(f"{where}: field '{field}': unknown {what} '{name}'{hint}")


def load_cluster(name_or_path: str, nodes: int | None = None, devices: int | None = None) -> Cluster:
    """Resolve a cluster: look up every node type, device and link, number the devices.

    `nodes` fills in the count of a group that has none (a node-type preset); a cluster whose groups all
    have counts refuses a different --nodes rather than silently ignoring it. `devices` below one node's
    size keeps only the first devices of a single node (a run on 2 of a DGX's 8 GPUs).
    """
    if devices is not None:
        cluster = load_cluster(name_or_path, nodes)
        if devices <= 0:
            raise BadInput(f"--devices must be a positive integer, got {devices}")
        if devices == cluster.device_count:
            return cluster
        if len(cluster.nodes) != 1 or devices > cluster.device_count:
            raise BadInput(f"cluster '{cluster.name}' has {cluster.device_count} devices on "
                           f"{len(cluster.nodes)} nodes; {devices} devices must be whole nodes or part of one")
        return part_of_node(cluster, devices)
    spec = cluster_spec(name_or_path)
    if nodes is not None and nodes <= 0:
        raise BadInput(f"--nodes must be a positive integer, got {nodes}")
    if spec.needs_node_count and nodes is None:
        nodes = 1
    elif not spec.needs_node_count and nodes is not None:
        total = sum(g.count or 0 for g in spec.groups)
        if nodes != total:
            raise BadInput(f"cluster '{spec.name}' fixes its size at {total} nodes; drop --nodes {nodes}")
    return resolve_cluster(spec, nodes)


def part_of_node(cluster: Cluster, devices: int) -> Cluster:
    """The first `devices` devices of a one-node cluster, with that node's links."""
    node = cluster.nodes[0].model_copy(update={"devices": cluster.nodes[0].devices[:devices]})
    return cluster.model_copy(update={"nodes": [node], "devices": cluster.devices[:devices],
                                      "name": f"{cluster.name}[{devices}]"})


def resolve_cluster(spec: ClusterSpec, nodes: int | None = None) -> Cluster:
    try:
        return _resolve_cluster(spec, nodes)
    except BadInput as e:
        # A preset that names a missing node type, device or link: say which cluster it was.
        raise BadInput(f"cluster '{spec.name}': {e}") from None


def _resolve_cluster(spec: ClusterSpec, nodes: int | None = None) -> Cluster:
    node_instances: list[NodeInstance] = []
    devices: list[DeviceRef] = []
    for group in spec.groups:
        ntype = node_type(group.node)
        count = group.count if group.count is not None else nodes or 1
        intra = link(ntype.intra_link) if ntype.intra_link else None
        nic_link = link(ntype.nics.link) if ntype.nics else None
        host = link(ntype.host_link) if ntype.host_link else None
        for _ in range(count):
            n = len(node_instances)
            local_ids = []
            local = 0
            for slot in ntype.devices:
                dev = device(slot.device)
                for _ in range(slot.count):
                    nic = local // ntype.nics.devices_per_nic if ntype.nics else None
                    if ntype.nics and nic is not None and nic >= ntype.nics.count:
                        nic = ntype.nics.count - 1
                    devices.append(DeviceRef(index=len(devices), node=n, local=local, device=dev,
                                             island=group.island, nic=nic))
                    local_ids.append(len(devices) - 1)
                    local += 1
            node_instances.append(NodeInstance(
                index=n, node_type=ntype, island=group.island, devices=local_ids, intra_link=intra,
                nic_link=nic_link, nic_count=ntype.nics.count if ntype.nics else 0,
                devices_per_nic=ntype.nics.devices_per_nic if ntype.nics else 0, host_link=host))
    fabric = link(spec.fabric) if spec.fabric else None
    island_link = link(spec.between_islands.link) if spec.between_islands else None
    return Cluster(name=spec.name, spec=spec, nodes=node_instances, devices=devices, fabric=fabric,
                   island_link=island_link,
                   island_ports_per_node=spec.between_islands.ports_per_node if spec.between_islands else 1)
