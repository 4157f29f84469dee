"""`planner profiles list|show`: the device, link, cluster, model and software-stack presets, and what a file holds."""
from __future__ import annotations

from pathlib import Path

from planner import catalog
from planner.app.commands.output import emit
from planner.core.errors import BadInput, did_you_mean
from planner.files import path_exists


def _all_presets() -> dict[str, list[str]]:
    from planner.importers import model_names

    return {
        "devices": catalog.names("devices"),
        "links": catalog.names("links"),
        "clusters": catalog.cluster_names(),
        "models": model_names(),
    }


def _stacks() -> list[dict]:
    """Each software stack (hardware_profiles/stacks/) as name, family, attention kernel, features, aliases."""
    return [catalog.find_stack(n).summary() for n in catalog.names("stacks")]


def cmd_profiles_list(args) -> None:
    presets = _all_presets()
    lines = []
    for section, names in presets.items():
        lines.append(f"{section} ({len(names)}):")
        lines.extend(f"  {n}" for n in names)
    stacks = _stacks()
    lines.append(f"stacks ({len(stacks)}):")
    lines.extend(f"  {s['name']:<20} {s['family']:<10} {', '.join(s['features'])}" for s in stacks)
    emit({**presets, "stacks": stacks}, args.json, "\n".join(lines))


def _cluster_summary(name: str) -> dict:
    spec = catalog.cluster_spec(name)
    cluster = catalog.resolve_cluster(spec, nodes=1 if spec.needs_node_count else None)
    out = spec.model_dump()
    out["resolved"] = {
        "nodes": len(cluster.nodes),
        "devices": cluster.device_count,
        "device_types": cluster.device_types,
        "devices_per_node": cluster.devices_per_node,
        "islands": sorted({n.island for n in cluster.nodes}),
        "per_node_is_preset": spec.needs_node_count,
    }
    if spec.needs_node_count:
        out["resolved"]["note"] = "a node-type preset: --nodes N sets how many nodes"
    return out


def cmd_profiles_show(args) -> None:
    from planner.importers import load_model, model_names

    name = args.name
    for section, getter in (("devices", catalog.device), ("links", catalog.link)):
        if name in catalog.names(section):
            obj = getter(name).model_dump()
            obj["type"] = section[:-1]
            return emit(obj, args.json, _as_text(obj))
    stack = catalog.find_stack(name)
    if stack is not None and name not in catalog.cluster_names():
        obj = catalog.load_stack(name).model_dump()  # with the fitted values laid over the priors
        obj["type"] = "stack"
        return emit(obj, args.json, _as_text(obj))
    if name in catalog.cluster_names():
        obj = _cluster_summary(name)
        obj["type"] = "cluster"
        return emit(obj, args.json, _as_text(obj))
    if name in model_names() or path_exists(name) or Path(name).suffix in (".json", ".yaml", ".yml"):
        path = Path(name)
        if path.suffix in (".yaml", ".yml") and path_exists(path) and _looks_like_cluster(path):
            obj = _cluster_summary(str(path))
            obj["type"] = "cluster"
            return emit(obj, args.json, _as_text(obj))
        graph = load_model(name)
        obj = graph.summary()
        obj["type"] = "model"
        return emit(obj, args.json, _as_text(obj))
    from planner import userdata

    if name in userdata.LOCAL_NAMES:  # the user's own calibration, not made yet
        raise BadInput(userdata.no_calibration_message(name))
    known = [n for names in _all_presets().values() for n in names]
    raise BadInput(f"unknown preset '{name}'{did_you_mean(name, known)}; see `profiles list`, "
                   "or give a path to a config.json, model file or cluster file")


def _looks_like_cluster(path: Path) -> bool:
    data = catalog.read_data_file(path)
    return isinstance(data, dict) and "groups" in data


def _as_text(obj: dict, indent: int = 0) -> str:
    lines = []
    for k, v in obj.items():
        if isinstance(v, dict):
            lines.append(" " * indent + f"{k}:")
            lines.append(_as_text(v, indent + 2))
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**6:
            lines.append(" " * indent + f"{k}: {v:,} ({v / 1e9:.3f} B)")
        else:
            lines.append(" " * indent + f"{k}: {v}")
    return "\n".join(lines)


def register(sub) -> None:
    """Adds `profiles` and its `list` and `show` actions."""
    prof = sub.add_parser("profiles", help="list and show device, link, cluster, model and stack presets")
    # the actions' parsers are of the class of `prof` (argparse's default): one-line usage errors too
    prof_sub = prof.add_subparsers(dest="action", required=True)
    pl = prof_sub.add_parser("list", help="every preset name")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_profiles_list)
    ps = prof_sub.add_parser("show", help="one preset, or a config.json / model / cluster file")
    ps.add_argument("name")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=cmd_profiles_show)
