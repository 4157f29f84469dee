"""Command line: `python cli.py ...` in a checkout, `planner ...` once installed (DESIGN.md section 3).

Every user error ends as one line on stderr and exit status 2 (1 for infeasible requests); a traceback
means a bug in the planner, never in the input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from planner import catalog
from planner.errors import BadInput, PlannerError, did_you_mean


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the contract), not usage text plus a line."""

    def error(self, message: str):  # noqa: D102
        raise BadInput(f"{self.prog}: {message} (see --help)")


def _emit(obj, as_json: bool, text: str) -> None:
    if as_json:
        json.dump(obj, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text.rstrip() + "\n")


# ---------------------------------------------------------------------------------------------------
# profiles


def _all_presets() -> dict[str, list[str]]:
    from planner.importers import model_names

    return {
        "devices": catalog.names("devices"),
        "links": catalog.names("links"),
        "clusters": catalog.cluster_names(),
        "models": model_names(),
    }


def cmd_profiles_list(args) -> None:
    presets = _all_presets()
    lines = []
    for section, names in presets.items():
        lines.append(f"{section} ({len(names)}):")
        lines.extend(f"  {n}" for n in names)
    _emit(presets, args.json, "\n".join(lines))


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
            return _emit(obj, args.json, _as_text(obj))
    if name in catalog.cluster_names():
        obj = _cluster_summary(name)
        obj["type"] = "cluster"
        return _emit(obj, args.json, _as_text(obj))
    if name in model_names() or Path(name).exists() or Path(name).suffix in (".json", ".yaml", ".yml"):
        path = Path(name)
        if path.suffix in (".yaml", ".yml") and path.exists() and _looks_like_cluster(path):
            obj = _cluster_summary(str(path))
            obj["type"] = "cluster"
            return _emit(obj, args.json, _as_text(obj))
        graph = load_model(name)
        obj = graph.summary()
        obj["type"] = "model"
        return _emit(obj, args.json, _as_text(obj))
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


# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="planner", description="Parallelism planner and cost model for distributed training.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    prof = sub.add_parser("profiles", help="list and show device, link, cluster and model presets")
    prof_sub = prof.add_subparsers(dest="action", required=True, parser_class=_Parser)
    pl = prof_sub.add_parser("list", help="every preset name")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_profiles_list)
    ps = prof_sub.add_parser("show", help="one preset, or a config.json / model / cluster file")
    ps.add_argument("name")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=cmd_profiles_show)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
        return 0
    except PlannerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
