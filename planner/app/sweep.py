"""What-if grids: the best plan for every combination of model, cluster, node count, scale-out link,
sequence length, global batch and precision, as one table (a pandas DataFrame; `sweep` on the command line
writes it as CSV, or --format). The cells run one after another here, or as tasks on a Dask cluster
(executor="dask"): each cell is independent, and the rows come back in grid order either way.

Each cell runs the same search as `plan --top 1` (planner.search.search, exact branch and bound with stage
partition refinement) and keeps its best plan. A cell where no plan fits is a row with status "infeasible"
and the search's one-line reason; a cell whose request no plan can take at all (a batch no micro-batch size
divides, say) is "no-plan" with the rule that emptied the space. Names are checked before the first cell,
so a typo fails at once (BadInput, exit 2) rather than after a long sweep.

Clusters whose size is fixed by their preset (two-pods-25gbe, mixed-a100-h100, ...) run once at their own
size whatever the node list says. `link` replaces the scale-out link of every node (its NICs, same count and
sharing) and the fabric between nodes: "what if this cluster had 100 GbE instead of InfiniBand NDR".
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Sequence

from planner.core import dtypes

DTYPES = dtypes.TRAIN_DTYPES
COLUMNS = [
    "model", "cluster", "nodes", "devices", "link", "seq", "gbs", "dtype", "stack", "status",
    "tp", "pp", "dp", "vpp", "cp", "ep", "zero", "sp", "mbs", "recompute", "schedule", "uneven_partition",
    "label", "step_time_s", "tokens_per_s", "mfu", "hfu", "peak_memory_gb", "memory_capacity_gb",
    "bubble_s", "why", "evaluated", "search_s",
]


def _as_list(x) -> list:
    if x is None:
        return [None]
    if isinstance(x, (str, int)):
        return [x]
    out = list(x)
    return out or [None]


def parse_list(text: str | None, kind=str, what: str = "value", cap: int | None = None) -> list:
    """'a,b,c' -> [a, b, c] (converted by `kind`, integers at most `cap`); BadInput naming the bad item."""
    from planner.core.errors import BadInput

    if text is None:
        return [None]
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise BadInput(f"empty {what} in list '{text}'")
        try:
            val = kind(item)
        except ValueError:
            raise BadInput(f"{what} '{item}' is not a valid {kind.__name__}") from None
        if kind is int and val <= 0:
            raise BadInput(f"{what} must be a positive integer, got {val}")
        if kind is int and cap is not None and val > cap:
            raise BadInput(f"{what} {val} is past the cap of {cap:,} (planner.core.limits); give at most {cap:,}")
        out.append(val)
    return out


def cells(models: Sequence, clusters: Sequence, nodes: Sequence = (None,), seqs: Sequence = (4096,),
          gbs: Sequence = (512,), links: Sequence = (None,), dtypes: Sequence = ("bf16",),
          stacks: Sequence = (None,)) -> list[dict]:
    """Every combination, with fixed-size clusters collapsed to their own size (nodes None)."""
    from planner import catalog

    out, seen = [], set()
    for model, cluster, n, link, seq, g, dtype, stack in itertools.product(
            models, clusters, nodes, links, seqs, gbs, dtypes, stacks):
        if isinstance(cluster, str) and not catalog.cluster_spec(cluster).needs_node_count:
            n = None
        key = (str(model), str(cluster), n, link, seq, g, dtype, stack)
        if key in seen:
            continue
        seen.add(key)
        out.append({"model": model, "cluster": cluster, "nodes": n, "link": link, "seq": seq, "gbs": g,
                    "dtype": dtype, "stack": stack})
    return out


def _check_size(*lists) -> None:
    """Refuse a grid past limits.MAX_SWEEP_CELLS before building it (each cell is a whole search)."""
    from planner.core.errors import BadInput
    from planner.core.limits import MAX_SWEEP_CELLS

    total = 1
    for values in lists:
        total *= len(values)
    if total > MAX_SWEEP_CELLS:
        raise BadInput(f"the sweep has {total:,} cells, past the cap of {MAX_SWEEP_CELLS:,}; give shorter lists "
                       "(--model, --cluster, --nodes, --seq, --gbs, --link, --dtype, --stack)")


def _check_names(models, clusters, links, dtypes=(), stacks=()) -> None:
    """Fail before the first cell on an unknown model, cluster, link, precision or stack (BadInput)."""
    from planner import catalog
    from planner.core.errors import BadInput, did_you_mean
    from planner.importers import load_model

    for m in dict.fromkeys(models):
        if isinstance(m, str):
            load_model(m)
    for c in dict.fromkeys(clusters):
        if isinstance(c, str):
            catalog.cluster_spec(c)
    for ln in dict.fromkeys(links):
        if ln is not None and ln not in catalog.names("links"):
            raise BadInput(f"unknown link '{ln}'{did_you_mean(ln, catalog.names('links'))}; see `profiles list`")
    for d in dict.fromkeys(dtypes):
        if d not in DTYPES:
            raise BadInput(f"unknown dtype '{d}'; use one of {', '.join(DTYPES)}")
    for st in dict.fromkeys(stacks):
        if st is not None:
            catalog.load_stack(st)


def stack_search(model, cluster, w, constraints, stack=None, top_k: int = 5, **kw):
    """planner.search.search restricted to the pipeline schedules `stack` runs (a Stack; None: every schedule).

    Constraints fix one schedule or none, so a stack that runs some but not all of them is searched once per
    schedule it runs and the results merged, fastest first. Plans with pp = 1 run the same work under every
    schedule: they come from the 1F1B search where the stack runs 1F1B. The other schedules' searches ask for
    twice top_k so such duplicates do not crowd out their pp > 1 plans."""
    from planner.core.dims import SEARCHED_SCHEDULES
    from planner.core.errors import BadInput, Infeasible
    from planner.search.search import search

    if stack is None or constraints.schedule is not None or set(SEARCHED_SCHEDULES) <= set(stack.schedules):
        if stack is not None and constraints.schedule is not None:
            stack.check_schedule(constraints.schedule)
        return search(model, cluster, w, constraints, top_k=top_k, **kw)
    results, refused = [], []
    for s in stack.schedules:
        wide = s != "1f1b" and "1f1b" in stack.schedules
        try:
            res = search(model, cluster, w, dataclasses.replace(constraints, schedule=s),
                         top_k=2 * top_k if wide else top_k, **kw)
        except (Infeasible, BadInput) as e:  # this schedule has no plan (fits): the others may
            refused.append(e)
            continue
        results.append(dataclasses.replace(res, plans=[rp for rp in res.plans if not (wide and rp.plan.pp == 1)]))
    if not results:
        raise next((e for e in refused if isinstance(e, Infeasible)), refused[0])
    plans = sorted((rp for r in results for rp in r.plans), key=lambda rp: rp.estimate.step_time_s)[:top_k]
    total = {f: sum(getattr(r, f) for r in results) for f in ("enumerated", "pruned_memory", "pruned_bound",
                                                                "evaluated", "wall_s", "partition_refined")}
    return dataclasses.replace(results[0], plans=plans, filters=[f for r in results for f in r.filters], **total)



def run_cell(cell: dict, constraints=None, refine_partition: bool = True, _models: dict | None = None) -> dict:
    """The best plan of one cell as a row of COLUMNS."""
    from planner.app.loaders import load_cluster, load_model
    from planner.app.rows import plan_row
    from planner.core.errors import BadInput, Infeasible
    from planner.core.plan import Workload
    from planner.search.search import search
    from planner.search.space import Constraints

    _models = {} if _models is None else _models
    key = id(cell["model"]) if not isinstance(cell["model"], str) else cell["model"]
    if key not in _models:
        _models[key] = load_model(cell["model"])
    model = _models[key]
    row = {c: None for c in COLUMNS}
    row.update(model=model.name, cluster=cell["cluster"] if isinstance(cell["cluster"], str) else cell["cluster"].name,
               nodes=cell["nodes"], link=cell["link"] or "", seq=cell["seq"], gbs=cell["gbs"], dtype=cell["dtype"],
               stack=cell.get("stack") or "")
    t0 = time.perf_counter()
    try:
        cluster = load_cluster(cell["cluster"], cell["nodes"], link=cell["link"])
        row["devices"] = cluster.device_count
        if row["nodes"] is None:
            row["nodes"] = len(cluster.nodes)
        workload = Workload(global_batch=cell["gbs"], seq_len=cell["seq"], dtype=cell["dtype"])
        c = constraints or Constraints()
        if cell.get("stack"):  # the stack's efficiencies, plan fields and schedules (stack_search)
            from planner import catalog

            stack = catalog.load_stack(cell["stack"])
            cluster = cluster.with_stack(stack)
            c = dataclasses.replace(c, **stack.plan_defaults.model_dump())
            res = stack_search(model, cluster, workload, c, stack, top_k=1, refine_partition=refine_partition,
                               progress=False)
        else:
            res = search(model, cluster, workload, c, top_k=1, refine_partition=refine_partition, progress=False)
    except Infeasible as e:
        row.update(status="infeasible", why=str(e), search_s=time.perf_counter() - t0)
        return row
    except BadInput as e:
        row.update(status="no-plan", why=str(e), search_s=time.perf_counter() - t0)
        return row
    best = res.plans[0]
    row.update({k: v for k, v in plan_row(best.plan, best.estimate).items() if k in COLUMNS})
    row.update(status="ok", evaluated=res.evaluated, search_s=time.perf_counter() - t0)
    return row


EXECUTORS = ("serial", "dask")
DASK_MISSING = "--executor dask needs Dask, which is not installed: pip install 'parallel-planner[dask]'"
# how long to wait for a --scheduler to answer and for its first worker (a typo should not hang the sweep)
CONNECT_TIMEOUT_S = 10.0
# local worker processes at most: each is a whole Python process with the planner loaded (~150 MB)
MAX_LOCAL_WORKERS = 256


def check_executor(executor: str, workers: int | None, scheduler: str | None) -> None:
    """BadInput for an unknown executor, or --workers/--scheduler that cannot apply."""
    from planner.core.errors import BadInput

    if executor not in EXECUTORS:
        raise BadInput(f"unknown executor '{executor}'; use one of {', '.join(EXECUTORS)}")
    if executor != "dask" and (workers is not None or scheduler is not None):
        flag = "--workers" if workers is not None else "--scheduler"
        raise BadInput(f"{flag} applies to the Dask executor; add --executor dask")
    if workers is not None and scheduler is not None:
        raise BadInput("--workers starts a local Dask cluster, --scheduler uses an existing one; give one of them")
    if workers is not None and not 0 < workers <= MAX_LOCAL_WORKERS:
        raise BadInput(f"--workers {workers}: want 1 to {MAX_LOCAL_WORKERS} local worker processes")


def _planner_version() -> str:
    """Run on each worker before the sweep: it fails there when the worker cannot import the planner."""
    import planner

    return getattr(planner, "__version__", "?")


def _connect(scheduler: str | None, workers: int | None, n_cells: int):
    """(Client, LocalCluster or None): the scheduler at `scheduler`, or a new LocalCluster of worker
    processes (one thread each: a cell is CPU-bound Python, threads would share one GIL)."""
    import os

    from planner.core.errors import BadInput

    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise BadInput(DASK_MISSING) from None
    if scheduler is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n = min(workers or cpus, n_cells, MAX_LOCAL_WORKERS)  # the CPUs this process may use, not the machine's
        local = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(local), local
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as e:
        raise BadInput(f"--scheduler {scheduler}: no Dask scheduler answered ({e}); start one with "
                       "`dask scheduler`, or leave --scheduler out for a local cluster") from None
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        versions = set(client.run(_planner_version).values())
    except (TimeoutError, OSError):
        client.close()
        raise BadInput(f"--scheduler {scheduler}: no worker joined within {CONNECT_TIMEOUT_S:g} s; start some with "
                       f"`dask worker {scheduler}`") from None
    except ImportError as e:
        client.close()
        raise BadInput(f"--scheduler {scheduler}: a worker cannot import the planner ({e}); install "
                       "parallel-planner on every worker") from None
    if versions != {_planner_version()}:
        client.close()
        raise BadInput(f"--scheduler {scheduler}: workers run planner {', '.join(sorted(versions))}, this is "
                       f"{_planner_version()}; install the same version everywhere")
    return client, None


def _run_on_dask(grid: list[dict], constraints, refine_partition: bool, workers: int | None,
                 scheduler: str | None, on_done) -> list[dict]:
    """run_cell of every cell as one Dask task each, the rows in grid order; on_done() after each cell.

    A task carries its cell dict (names, numbers; a model or cluster object given to the API travels
    pickled, a few KB) and loads model and cluster in the worker. A cell's own Infeasible/BadInput is its
    status row there, as in the serial path; anything else is raised here, as serially."""
    client, local = _connect(scheduler, workers, len(grid))  # first: BadInput when Dask is not installed
    from distributed import as_completed

    try:
        futures = client.map(run_cell, grid, constraints=constraints, refine_partition=refine_partition,
                             pure=False)
        for _ in as_completed(futures):
            on_done()
        return [f.result() for f in futures]
    finally:
        client.close()
        if local is not None:
            local.close()


def sweep(models: Iterable | str, clusters: Iterable | str, nodes: Iterable | int | None = None,
          seqs: Iterable | int = (4096,), gbs: Iterable | int = (512,), links: Iterable | str | None = None,
          dtypes: Iterable | str = ("bf16",), constraints=None, refine_partition: bool = True,
          progress: bool | None = None, executor: str = "serial", workers: int | None = None,
          scheduler: str | None = None, stacks: Iterable | str | None = None):
    """The best plan of every cell of the grid, as a pandas DataFrame in COLUMNS order (grid order).

    executor: "serial" (this process) or "dask" (the cells as tasks on a dask.distributed cluster: a
    LocalCluster of `workers` processes, or the scheduler at address `scheduler`); same rows either way.
    progress: a tqdm bar of finished cells on stderr (None: only when stderr is a terminal)."""
    import pandas as pd
    from tqdm import tqdm

    check_executor(executor, workers, scheduler)
    models, clusters = _as_list(models), _as_list(clusters)
    nodes, seqs, gbs, links, dtypes, stacks = (_as_list(x) for x in (nodes, seqs, gbs, links, dtypes, stacks))
    _check_size(models, clusters, nodes, seqs, gbs, links, dtypes, stacks)
    _check_names(models, clusters, links, dtypes, stacks)
    grid = cells(models, clusters, nodes, seqs, gbs, links, dtypes, stacks)
    bar = tqdm(total=len(grid), desc="sweep", unit="cell", disable=None if progress is None else not progress)
    try:
        if executor == "dask":
            rows = _run_on_dask(grid, constraints, refine_partition, workers, scheduler, on_done=bar.update)
        else:
            rows, cache = [], {}
            for cell in grid:
                bar.set_postfix_str(f"{cell['model']} {cell['cluster']} x{cell['nodes'] or '-'} seq {cell['seq']}",
                                    refresh=False)
                rows.append(run_cell(cell, constraints, refine_partition, cache))
                bar.update()
    finally:
        bar.close()
    return pd.DataFrame(rows, columns=COLUMNS)


def write_csv(df, path, force: bool = False) -> None:
    """Write the table as CSV through a temporary file and os.replace; an existing file needs force."""
    from planner.files import check_output, write_atomic

    check_output(path, force)
    write_atomic(path, df.to_csv(index=False, float_format="%.6g"))


