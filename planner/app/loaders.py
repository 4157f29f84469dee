"""The model and cluster arguments of the Python API and the sweep: a catalog name, a file path, or an
object already loaded (ModelGraph, Cluster), with the scale-out link replaceable ("what if this cluster had
100 GbE"). Below both api and sweep, so that neither imports the other to load its inputs. The catalog and
the importers load on first use, as before, so importing the API stays cheap."""
from __future__ import annotations

from planner.core.errors import BadInput
from planner.core.hardware import Cluster
from planner.core.model import ModelGraph


def load_model(model: str | ModelGraph) -> ModelGraph:
    """A catalog name, a config.json or model file path, or a ModelGraph (returned as is)."""
    if isinstance(model, ModelGraph):
        return model
    from planner.importers import load_model as load_model_by_name

    return load_model_by_name(str(model))


def with_link(cluster: Cluster, link: str) -> Cluster:
    """The same cluster with every node's scale-out NICs (same count and sharing) and the fabric between
    nodes replaced by the catalog link `link`; links inside a node and between islands stay. A new Cluster
    (its topology caches start empty)."""
    from planner import catalog

    ln = catalog.link(link)
    nodes = [n.model_copy(update={"nic_link": ln}) if n.nic_link is not None else n for n in cluster.nodes]
    spec = cluster.spec.model_copy(update={"fabric": link})
    return Cluster(name=f"{cluster.name}+{link}", spec=spec, nodes=nodes, devices=list(cluster.devices),
                   fabric=ln, island_link=cluster.island_link, island_ports_per_node=cluster.island_ports_per_node)


def load_cluster(cluster: str | Cluster, nodes: int | None = None, link: str | None = None) -> Cluster:
    """A catalog name or cluster file (node-type presets take `nodes`), or a Cluster (nodes must be None);
    `link` replaces the scale-out link (with_link)."""
    if isinstance(cluster, Cluster):
        if nodes is not None:
            raise BadInput("nodes applies to a cluster name, not to a Cluster already loaded")
        c = cluster
    else:
        from planner import catalog

        c = catalog.load_cluster(str(cluster), nodes)
    return with_link(c, link) if link else c
