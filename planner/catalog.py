"""The catalogs: device, link and cluster profiles (hardware_profiles/) and model presets (models/).

This is the I/O edge for hardware: YAML in, validated pydantic objects out, every error one line. The
catalog is found in the checkout (hardware_profiles/ beside planner/) or, when installed from a wheel,
in the package's data folders planner/profiles and planner/model_catalog that pyproject.toml maps them to.

Over the shipped profiles lie the user's own (planner.userdata): the calibration `calibrate --backend
torch` wrote into the user's data folder (the `local` node type, device and link), and a calibration
folder named by `--cluster DIR`; each replaces a shipped entry of the same name. A shipped profile is never
the answer for `local`: without the user's calibration, `local` is a one-line error saying how to make one.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError

from planner import userdata
from planner.core.errors import BadInput, did_you_mean
from planner.core.hardware import (
    Cluster,
    ClusterSpec,
    Device,
    DeviceRef,
    Link,
    NodeInstance,
    NodeType,
)
from planner.core.stack import ErrorBand, Stack
from planner.files import path_exists

T = TypeVar("T", bound=BaseModel)
REPO_ROOT = Path(__file__).resolve().parent.parent
_REINSTALL = "reinstall it: pip install --force-reinstall parallel-planner (or pip install -e . in a checkout)"


def _data_dir(checkout_name: str, package_dir: str, pattern: str) -> Path:
    """A catalog folder: the checkout's (hardware_profiles/, models/ beside planner/) or the installed
    package's (planner/profiles, planner/model_catalog). The installed folders are located from the
    regular package `planner` (a real folder once pip has installed a wheel) rather than through
    importlib.resources on the data folders themselves: those have no __init__.py, so resources gives a
    namespace MultiplexedPath, whose str() is no path (the empty catalog of issue 16). Shipping them as
    packages instead would put __init__.py files into the checkout's data folders."""
    local = REPO_ROOT / checkout_name
    if local.is_dir():
        return local
    installed = resources.files("planner") / package_dir
    if not isinstance(installed, Path):  # pragma: no cover - a zipped install: no folder to read
        raise BadInput(f"the {checkout_name} catalog is inside an archive ({installed}); {_REINSTALL}")
    if not installed.is_dir() or not any(installed.glob(pattern)):
        raise BadInput(f"the {checkout_name} catalog is missing or empty: looked in {local} and {installed}; "
                       f"{_REINSTALL}")
    return installed


def profiles_dir() -> Path:
    return _data_dir("hardware_profiles", "profiles", "devices/*.yaml")


def models_dir() -> Path:
    return _data_dir("models", "model_catalog", "*.yaml")


# ---------------------------------------------------------------------------------------------------
# Reading files: one clear line for every way a file can be wrong.

# Deepest nesting and most values a model, cluster or profile file may hold. Real ones nest 4 levels
# (an HF config's rope_scaling, a cluster's groups) and hold a few hundred values; the caps refuse a
# 100k-deep or alias-bomb file in one line instead of a RecursionError or an exponential walk.
MAX_NESTING = 64
MAX_VALUES = 200_000
# Integers beyond int64 (2^63) mean nothing to any field here and overflow numpy downstream.
MAX_INT = 2**63 - 1


def read_data_file(path: Path, what: str = "YAML or JSON file", allow_empty: bool = False) -> Any:
    """Parse a YAML or JSON file; BadInput naming the file (and line) for every way it can be broken:
    missing, unreadable, a FIFO or device, oversized (files.read_input), not UTF-8, broken syntax, empty
    (unless allow_empty: then None), nested too deeply, too many values, NaN / Infinity anywhere, or an
    integer beyond 2^63 (or beyond Python's 4,300-digit int-from-text limit)."""
    from planner.files import read_input

    path = Path(path)
    text = read_input(path, what)
    if _bracket_depth(text) > MAX_NESTING:
        # Before parsing: PyYAML's scanner re-checks every open bracket level on each token, so 100k
        # nested brackets take minutes (quadratic) before its composer would hit the recursion limit.
        raise BadInput(f"{path}: nested too deeply to read (at most {MAX_NESTING} levels of [ ] or {{ }})")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}:{e.lineno}:{e.colno}: broken JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInput(f"{where}: broken YAML: {problem}") from None
    except RecursionError:
        raise BadInput(f"{path}: nested too deeply to read (at most {MAX_NESTING} levels)") from None
    except (ValueError, OverflowError) as e:
        # int('9' * 5000) in either parser: "Exceeds the limit (4300 digits) for integer string conversion"
        raise BadInput(f"{path}: a number is too long to read (Python reads integers of at most 4,300 "
                       f"digits: {type(e).__name__}); every size this tool reads is below 2^63") from None
    if data is None and not allow_empty:
        raise BadInput(f"{path}: the file is empty (or holds only comments); expected a {what} of "
                       "'field: value' lines")
    _check_values(data, str(path))
    return data


def _bracket_depth(text: str) -> int:
    """The deepest running count of open [ and { brackets (quotes not parsed: an upper bound on the
    nesting of flow collections, and exact for JSON without brackets inside strings)."""
    import numpy as np

    raw = np.frombuffer(text.encode("utf-8", "replace"), dtype=np.uint8)
    step = np.zeros(256, dtype=np.int32)
    step[[ord("["), ord("{")]] = 1
    step[[ord("]"), ord("}")]] = -1
    return int(np.cumsum(step[raw]).max(initial=0))


def _check_values(data: Any, where: str) -> None:
    """Walk what a parser returned (iteratively: no recursion to exhaust) and refuse, naming the field,
    what no field of this tool can mean: NaN or infinite floats, integers beyond int64, more than
    MAX_NESTING levels or MAX_VALUES values (YAML aliases count once per use, as a consumer sees them)."""
    import math

    stack: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    seen = 0
    while stack:
        value, loc, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise BadInput(f"{where}: more than {MAX_VALUES:,} values; no model or cluster file is that "
                           "large (YAML aliases count each time they are used)")
        field = ".".join(str(p) for p in loc) or "(top level)"
        if isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise BadInput(f"{where}: field '{field}' is {value!r}; give a finite number")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise BadInput(f"{where}: field '{field}' is an integer of {len(str(abs(value)))} digits, beyond "
                           f"2^63; no size this tool reads is that large")
        if isinstance(value, (dict, list)):
            if depth >= MAX_NESTING:
                raise BadInput(f"{where}: field '{field}' is nested more than {MAX_NESTING} levels deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, loc + (k,), depth + 1) for k, v in items)


_MAX_LISTED = 3  # errors named in the one line; the rest are counted

# Pydantic's words for a strict-mode type error, with what to write instead.
_HINTS = {
    "bool_type": "write true or false",
    "int_type": "write a whole number",
    "float_type": "write a number",
    "string_type": "write text",
}


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
    if e["type"] == "model_type" or e["type"] == "dict_type":
        return f"field '{loc}': expected a mapping of fields, got {_kind(value)}" if loc else \
            f"expected a mapping of fields, got {_kind(value)}"
    if e["type"] == "list_type":
        return f"field '{loc}': expected a list, got {_kind(value)}"
    shown = "" if isinstance(value, (dict, list, tuple, set)) else f" (got {_short(value)})"
    hint = f"; {_HINTS[e['type']]}" if e["type"] in _HINTS else ""
    return f"field '{loc}': {msg}{shown}{hint}" if loc else f"{msg}{shown}{hint}"


def _kind(value: Any) -> str:
    """A user's word for what a YAML/JSON value is."""
    if value is None:
        return "nothing (an empty value)"
    return {dict: "a mapping", list: "a list", str: "text", bool: "true/false", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**40 else f"<{len(str(value))}-digit integer>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_message(err: ValidationError, where: str) -> str:
    """Every pydantic error (up to three) as one line: file, field path, what is wrong."""
    errors = err.errors()
    parts = list(dict.fromkeys(_one_error(e) for e in errors))
    shown = "; ".join(parts[:_MAX_LISTED])
    more = f" (and {len(parts) - _MAX_LISTED} more)" if len(parts) > _MAX_LISTED else ""
    return f"{where}: {shown}{more}"


def parse_as(model: type[T], data: Any, where: str) -> T:
    """Validate a file's mapping as `model`, strictly: a number field takes a number, not true or "12",
    and a true/false field takes true or false, not "yes" or 1 (pydantic's lax mode would turn "yes"
    into True and True into 1)."""
    if data is None:
        raise BadInput(f"{where}: empty; expected a mapping of fields ('field: value' lines)")
    if not isinstance(data, dict):
        raise BadInput(f"{where}: expected a mapping of fields ('field: value' lines), got {_kind(data)}")
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as e:
        raise BadInput(validation_message(e, where)) from None
    except RecursionError:
        raise BadInput(f"{where}: nested too deeply to read") from None


# ---------------------------------------------------------------------------------------------------
# The hardware catalog.

_SECTIONS = {"devices": Device, "links": Link, "nodes": NodeType, "clusters": ClusterSpec, "stacks": Stack}


def _hardware_catalog() -> dict[str, dict[str, Any]]:
    """The shipped profiles, then the user's calibration, then the calibration folders named by --cluster
    (planner.userdata), each replacing an earlier entry of the same name; then the shipped efficiency fit
    and the user's over it. Rebuilt only when one of these places changes.

    Called once per device when a cluster is built (16k times for 16,384 GPUs), so where the places are
    is itself remembered per environment (HOME, XDG_DATA_HOME) and --cluster folders: finding them costs
    ~60 us, the lookup ~1 us. calibrate clears it (cache_clear) when it creates the user's folder."""
    key = (os.environ.get("HOME"), os.environ.get("XDG_DATA_HOME"), tuple(_EXTRA_ROOTS), _DEVICE_FIT[0])
    args = _PLACES.get(key)
    if args is None:
        user = userdata.calibration_dir()
        shipped = profiles_dir()
        roots = (shipped, *([user] if user.is_dir() else []), *_EXTRA_ROOTS)
        fits = (shipped / FITTED_EFFICIENCY_FILE, userdata.fit_file())
        args = _PLACES[key] = (roots, fits, _DEVICE_FIT[0])
    return _build_catalog(*args)


_PLACES: dict[tuple, tuple] = {}


def _clear_catalog_cache() -> None:
    _PLACES.clear()
    _build_catalog.cache_clear()


@lru_cache(maxsize=8)
def _build_catalog(roots: tuple[Path, ...], fits: tuple[Path, ...], devices_too: bool) -> dict[str, dict[str, Any]]:
    catalog: dict[str, dict[str, Any]] = {k: {} for k in _SECTIONS}
    for i, root in enumerate(roots):
        seen: dict[str, set[str]] = {k: set() for k in _SECTIONS}
        for section, model in _SECTIONS.items():
            folder = root / section
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob("*.yaml")):
                data = read_data_file(path)
                entries = data if isinstance(data, list) else [data]
                for entry in entries:
                    obj = parse_as(model, entry, str(path))
                    if i == 0 and obj.name in userdata.LOCAL_NAMES:
                        # `local` is the user's own calibration; a shipped one (a stale build/ folder put an
                        # old local.yaml into a wheel) must never answer for it
                        continue
                    if obj.name in seen[section]:
                        raise BadInput(f"{path}: {section[:-1]} '{obj.name}' is defined twice")
                    seen[section].add(obj.name)
                    catalog[section][obj.name] = obj  # a later root (the user's) replaces a shipped entry
        if i == 0 and not catalog["devices"]:
            raise BadInput(f"no device profiles in {root / 'devices'}: the catalog is missing; {_REINSTALL}")
    _check_aliases(catalog["stacks"])
    catalog["_stack_fits"], catalog["_bands"] = {}, {}
    for path in fits:
        _apply_fitted_efficiency(path, catalog["devices"], catalog["_stack_fits"], devices_too, catalog["_bands"])
    catalog["_resolved_stacks"] = {}  # load_stack's answers, dropped with the catalog
    return catalog


def _check_aliases(stacks: dict[str, Stack]) -> None:
    """A stack's alias may name no other stack, nor be another's alias: one name, one stack."""
    seen = {name: name for name in stacks}
    for st in stacks.values():
        for alias in st.aliases:
            if seen.setdefault(alias, st.name) != st.name:
                raise BadInput(f"stack '{st.name}': alias '{alias}' already names stack '{seen[alias]}'; drop one")


_hardware_catalog.cache_clear = _clear_catalog_cache  # type: ignore[attr-defined]
_EXTRA_ROOTS: list[Path] = []  # calibration folders given as --cluster DIR in this process

FITTED_EFFICIENCY_FILE = "fitted_efficiency.yaml"
_DEVICE_FIT = [True]


def use_device_fit(on: bool) -> None:
    """Whether devices carry the fitted efficiencies (the default) or their datasheet / measured profile
    values alone. planner.eval.fit turns it off, so that a refit, its starting point and its leave-one-source-out
    figures never see the previous fit's numbers (which were fitted on the very rows held out)."""
    if _DEVICE_FIT[0] != on:
        _DEVICE_FIT[0] = on
        _clear_catalog_cache()


def stack_efficiency(stack: str, device_name: str) -> dict:
    """Efficiency fields fitted for one software stack on one device ({} when there is no such fit)."""
    return dict(_hardware_catalog()["_stack_fits"].get(stack, {}).get(device_name, {}))


def _apply_fitted_efficiency(path: Path, devices: dict, stack_fits: dict, devices_too: bool = True,
                             bands: dict | None = None) -> None:
    """Overlay the efficiencies `python -m planner.eval.fit --write` fitted on published runs; the
    datasheet files stay as published, the fit stays regenerable, and its provenance is kept. The
    per-stack fits (and their error bands, into `bands`) are always read; the per-device ones only with
    devices_too (use_device_fit). A later file (the user's fit) replaces the fields and stacks it fits and
    keeps the rest. Files written before the fit measured bands have none: they load all the same."""
    if not path.exists():
        return
    doc = read_data_file(path) or {}
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: expected a mapping (fitted_on, devices, stacks); re-run python -m planner.eval.fit --write")
    bands = {} if bands is None else bands
    for stack, fit in (doc.get("stacks") or {}).items():
        if not isinstance(fit, dict):
            raise BadInput(f"{path}: stacks.{stack}: expected a mapping (fitted_on, devices, band); re-run "
                           "python -m planner.eval.fit --write")
        stack_fits[stack] = {**stack_fits.get(stack, {}), **(fit.get("devices") or {})}
        _read_bands(path, f"stacks.{stack}", fit, bands.setdefault(stack, {}))
    if doc.get("band") is not None:
        bands["_pooled"] = _fitted_band(path, "band", doc["band"], doc)
    for name, values in ((doc.get("devices") or {}) if devices_too else {}).items():
        if name not in devices:
            raise BadInput(f"{path}: fitted device '{name}' is not in the catalog")
        dev = devices[name]
        src = f"fitted on {doc.get('fitted_on')} ({doc.get('rows')} rows, {doc.get('date')}), planner.eval.fit"
        eff = dev.efficiency.model_copy(update={**values, "source": src})
        devices[name] = dev.model_copy(update={"efficiency": eff})


def _fitted_band(path: Path, where: str, entry: Any, doc: dict) -> ErrorBand:
    """One band the fit wrote ({p10, p90, rows, method}) as an ErrorBand saying where it comes from."""
    if not isinstance(entry, dict):
        raise BadInput(f"{path}: {where}: expected a mapping (p10, p90, rows, method); re-run python -m "
                       "planner.eval.fit --write")
    rows = entry.get("rows", doc.get("rows"))
    src = (f"{entry.get('method') or doc.get('method') or 'planner.eval.fit'} ({rows} rows of "
           f"{doc.get('fitted_on')}, {doc.get('date')})")
    fields = {k: v for k, v in entry.items() if k not in ("method", "rows")}
    return parse_as(ErrorBand, {**fields, "rows": rows, "source": src}, f"{path}: {where}")


def _read_bands(path: Path, where: str, fit: dict, out: dict) -> None:
    """A stack's fitted band and per-device bands, and the provenance of its fitted efficiencies, into `out`."""
    out["meta"] = f"fitted on {fit.get('fitted_on')} ({fit.get('rows')} rows, {fit.get('date')})"
    if fit.get("band") is not None:
        out["band"] = _fitted_band(path, f"{where}.band", fit["band"], fit)
    for dev, entry in (fit.get("device_bands") or {}).items():
        out.setdefault("device_bands", {})[dev] = _fitted_band(path, f"{where}.device_bands.{dev}", entry, fit)


def names(section: str) -> list[str]:
    return sorted(_hardware_catalog()[section])


# ---------------------------------------------------------------------------------------------------
# Software stacks (hardware_profiles/stacks/, planner.core.stack).


def find_stack(name: str) -> Stack | None:
    """The profile of the stack called `name` or one of its aliases, as the file has it; None if none."""
    table = _hardware_catalog()["stacks"]
    return table.get(name) or next((st for st in table.values() if name in st.aliases), None)


def load_stack(name: str, priors: bool = True) -> Stack:
    """The stack `name` (or an alias) with fitted_efficiency.yaml's `stacks:` values laid over its priors
    (planner.core.stack.resolve); priors=False keeps the fitted values and bands alone (the backtest, whose
    rows the fit saw). An unknown name is one line naming the known stacks (BadInput, exit 2)."""
    cat = _hardware_catalog()
    key = (name, priors)
    if key not in cat["_resolved_stacks"]:
        raw = find_stack(name)
        if raw is None:
            known = sorted(cat["stacks"])
            aliases = [a for st in cat["stacks"].values() for a in st.aliases]
            raise BadInput(f"unknown stack '{name}'{did_you_mean(name, known + aliases)}; known stacks: "
                           f"{', '.join(known)} (`profiles list`)")
        from planner.core.stack import resolve

        bands = cat["_bands"]
        cat["_resolved_stacks"][key] = resolve(raw, cat["_stack_fits"].get(raw.name, {}),
                                               bands.get(raw.name, {}), bands.get("_pooled"), priors)
    return cat["_resolved_stacks"][key]


def apply_stack(cluster: Cluster, stack: str | Stack | None, priors: bool = True, missing_ok: bool = False) -> Cluster:
    """`cluster` running `stack` (a name, an alias or a Stack; None: the cluster unchanged). missing_ok: a
    name without a profile (a runs table's own name) gets the fit's values for that name, if any, instead
    of an error."""
    if stack is None:
        return cluster
    if isinstance(stack, str) and missing_ok and find_stack(stack) is None:
        fits = _hardware_catalog()["_stack_fits"].get(stack, {})
        return cluster.with_efficiency(**fits.get(cluster.device_types[0], {})) if cluster.is_homogeneous \
            else cluster
    return cluster.with_stack(load_stack(stack, priors) if isinstance(stack, str) else stack)


def _lookup(section: str, name: str, what: str):
    table = _hardware_catalog()[section]
    if name not in table:
        if name in userdata.LOCAL_NAMES:
            raise BadInput(userdata.no_calibration_message(name))
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
    """A cluster preset name, a node type name (one group of that node), a path to a cluster file, or a
    calibration folder (what `calibrate --backend torch --out-dir DIR` writes; a file inside it works too)."""
    cat = _hardware_catalog()
    if name_or_path in cat["clusters"]:
        return cat["clusters"][name_or_path]
    if name_or_path in cat["nodes"]:
        return _node_cluster(cat["nodes"][name_or_path])
    if name_or_path in userdata.LOCAL_NAMES:
        raise BadInput(userdata.no_calibration_message(name_or_path))
    path = Path(name_or_path)
    try:
        folder = _calibration_folder(path)
        is_dir = path.is_dir()
    except (OSError, ValueError) as e:  # a name the OS refuses to look up (too long, a NUL byte)
        raise BadInput(f"--cluster {_short(name_or_path)}: not a usable path ({getattr(e, 'strerror', None) or e}); "
                       "give a preset name (see `profiles list`) or a cluster file") from None
    if folder is not None:
        return _calibration_cluster(folder)
    if is_dir:
        raise BadInput(f"--cluster {path}: a folder, but not a calibration folder (no nodes/*.yaml in it); "
                       "give a cluster file, a preset name, or a folder `calibrate --out-dir` wrote")
    if path.suffix in (".yaml", ".yml", ".json") or path_exists(path):
        spec = parse_as(ClusterSpec, read_data_file(path), str(path))
        _check_references(spec, str(path))
        return spec
    known = cluster_names()
    raise BadInput(f"unknown cluster '{name_or_path}'{did_you_mean(name_or_path, known)}; "
                   "give a preset name (see `profiles list`) or a path to a cluster YAML file")


def _node_cluster(node: NodeType) -> ClusterSpec:
    return ClusterSpec(name=node.name, source=node.source, provenance=node.provenance, groups=[{"node": node.name}])


def _calibration_folder(path: Path) -> Path | None:
    """The calibration folder a --cluster path names: the folder itself, its calibration.json, or one of
    its profile files (DIR/nodes/local.yaml); None when the path is none of these."""
    if userdata.is_calibration_dir(path):
        return path
    if path.is_file():
        if path.name == userdata.CALIBRATION_RECORD and userdata.is_calibration_dir(path.parent):
            return path.parent
        if path.parent.name in userdata.SECTIONS and userdata.is_calibration_dir(path.parent.parent):
            return path.parent.parent
    return None


def _calibration_cluster(folder: Path) -> ClusterSpec:
    """Add a calibration folder's devices, links and node types to the catalog (over the shipped ones and
    the user's, for the rest of this process) and give its node type as a one-group cluster."""
    folder = folder.resolve()
    node_files = sorted((folder / "nodes").glob("*.yaml"))
    if len(node_files) != 1:
        raise BadInput(f"--cluster {folder}: {len(node_files)} node files in {folder / 'nodes'}; a calibration "
                       "folder holds one (give the cluster by that node type's name instead)")
    if folder not in _EXTRA_ROOTS:
        _EXTRA_ROOTS.append(folder)
    node = read_data_file(node_files[0])
    name = node.get("name") if isinstance(node, dict) else None
    table = _hardware_catalog()["nodes"]
    if name not in table:
        raise BadInput(f"{node_files[0]}: expected a node type with a 'name' field; re-run calibrate")
    return _node_cluster(table[name])


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
            if name in userdata.LOCAL_NAMES:
                raise BadInput(f"{where}: field '{field}': {userdata.no_calibration_message(name)}")
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


def _check_device_count(spec: ClusterSpec, nodes: int | None) -> None:
    """Refuse a cluster past limits.MAX_DEVICES before building it: resolving makes one object per device
    (--nodes 1000000000 took 5.9 GB before being killed)."""
    from planner.core.limits import MAX_DEVICES

    total = 0
    for group in spec.groups:
        count = group.count if group.count is not None else nodes or 1
        total += count * sum(slot.count for slot in node_type(group.node).devices)
    if total > MAX_DEVICES:
        fix = "lower --nodes" if any(g.count is None for g in spec.groups) else "lower the groups' count"
        raise BadInput(f"{total:,} devices, past the cap of {MAX_DEVICES:,} devices per cluster; {fix}")


def _resolve_cluster(spec: ClusterSpec, nodes: int | None = None) -> Cluster:
    _check_device_count(spec, nodes)
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


# ---------------------------------------------------------------------------------------------------------
# device prices (hardware_profiles/prices.yaml): what planner/cost/energy.py charges per device-hour

PRICES_FILE = "prices.yaml"


class DevicePrice(BaseModel):
    """One device's price per hour, with where and when it held."""

    model_config = {"extra": "forbid", "frozen": True}
    device: str
    usd_per_hour: float = Field(gt=0, le=10_000)  # far above any single accelerator's on-demand price
    instance: str
    source: str = Field(min_length=3)
    date: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    provenance: str
    notes: str = ""


@lru_cache(maxsize=4)
def _prices(path: Path) -> dict[str, DevicePrice]:
    if not path.is_file():
        return {}
    data = read_data_file(path, allow_empty=True) or []
    out: dict[str, DevicePrice] = {}
    for entry in data if isinstance(data, list) else [data]:
        price = parse_as(DevicePrice, entry, str(path))
        if price.device in out:
            raise BadInput(f"{path}: device '{price.device}' is priced twice; keep one entry")
        out[price.device] = price
    return out


def device_price(device_name: str) -> DevicePrice | None:
    """The catalog's price of one device-hour of `device_name`, None where the catalog has none."""
    return _prices(profiles_dir() / PRICES_FILE).get(device_name)
