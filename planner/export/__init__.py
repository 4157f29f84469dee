"""Launcher exports of a plan file: Megatron-LM arguments, a DeepSpeed config, torchtitan job configs.

`export_text(plan_file, fmt)` writes one format; `parse_text(fmt, text)` reads an exported text back into
`LauncherSettings`, the launcher-visible half of a plan (degrees, batch sizes, recompute, schedule), so
tests can hold export -> import to the identity. Every flag and key spelling comes from
docs/launchers.md (section cited next to each one in the writers).

A plan that a launcher cannot express is refused with `Unsupported` (BadInput, exit 2): one line that names
the plan field, says why, and where possible which launcher can run it.
"""
from __future__ import annotations

from planner.core.errors import BadInput
from planner.core.model import ModelGraph
from planner.core.plan import PlanFile
from planner.export.common import (
    ExportContext,
    LauncherSettings,
    Unsupported,
    check_common,
    expected_settings,
    header_lines,
    one_line,
)

FORMATS = ("megatron", "deepspeed", "torchtitan", "torchtitan-py")


def make_context(pf: PlanFile, model: ModelGraph | None = None, devices_per_node: int | None = None,
                 load_cluster: bool = True) -> ExportContext:
    """Load what the plan file names (model, and the cluster for the node size when asked)."""
    if model is None:
        from planner.importers import load_model

        model = load_model(pf.model)
    if devices_per_node is None and load_cluster:
        from planner import catalog

        # an unknown cluster is refused, not read as one node (it wrote NUM_NODES=1 for a misspelled name)
        devices_per_node = _node_size(catalog.load_cluster(pf.cluster, pf.nodes))
    return ExportContext(pf=pf, model=model, devices_per_node=devices_per_node)


def _node_size(cluster) -> int | None:
    """Devices per node when every node has as many (torchrun starts the same count on each); else None."""
    sizes = {len(n.devices) for n in cluster.nodes}
    return sizes.pop() if len(sizes) == 1 else None


def context_of(loaded) -> ExportContext:
    """The context of a checked plan file (planner.planfile.load_plan_file): its model and cluster as resolved
    there, and the estimate made now, which the headers quote, not the one the file was saved with."""
    pf = loaded.pf.model_copy(update={"estimate": loaded.estimate})
    return ExportContext(pf=pf, model=loaded.model, devices_per_node=_node_size(loaded.cluster))


def export_text(ctx: ExportContext, fmt: str) -> str:
    from planner.export import deepspeed, megatron, torchtitan

    writers = {"megatron": megatron.to_megatron, "deepspeed": deepspeed.to_deepspeed,
               "torchtitan": torchtitan.to_toml, "torchtitan-py": torchtitan.to_python}
    if fmt not in writers:
        raise BadInput(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    return writers[fmt](ctx)


def parse_text(fmt: str, text: str) -> LauncherSettings:
    from planner.export import deepspeed, megatron, torchtitan

    readers = {"megatron": megatron.parse_megatron, "deepspeed": deepspeed.parse_deepspeed,
               "torchtitan": torchtitan.parse_toml, "torchtitan-py": torchtitan.parse_python}
    if fmt not in readers:
        raise BadInput(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    return readers[fmt](text)


__all__ = ["FORMATS", "ExportContext", "LauncherSettings", "Unsupported", "check_common", "context_of",
           "expected_settings", "export_text", "header_lines", "make_context", "one_line", "parse_text"]
