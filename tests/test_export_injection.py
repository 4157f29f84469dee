"""Exports carry free text (the model and cluster names, which may be file paths) into a bash script, a TOML
file and a Python module (issue 16). A name that holds shell, TOML or Python syntax must stay text: the bash
script passes `bash -n` and runs up to its launcher (a stub torchrun) without running anything else, the
Python module imports without running anything, and the TOML parses with the payload only inside strings.
Names with line breaks are refused in one line by the plan file; the writers escape them all the same."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from planner.core.plan import ParallelPlan, PlanFile, Workload
from planner.export import ExportContext, export_text
from planner.export.common import Unsupported
from planner.importers import load_model
from tests.cli_helpers import one_line, run

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "models" / "tiny-llama-20m.yaml"
CLUSTER_YAML = 'name: cluster-from-file\nsource: "test cluster"\ngroups:\n  - {node: dgx-h100, count: 1}\n'
PLAN = ParallelPlan(dp=4, pp=2, mbs=2, recompute="full")  # 8 devices: one DGX H100 node
WORKLOAD = Workload(global_batch=32, seq_len=1024)


def payloads(marker: Path) -> list[str]:
    """Strings that run `touch marker/PWNED_<n>` if any format lets them out of their string or comment."""
    m = str(marker)
    return [
        f"x\ntouch {m}/PWNED_newline",
        f"x\r\ntouch {m}/PWNED_crlf",
        f"$(touch {m}/PWNED_subst)",
        f"`touch {m}/PWNED_backtick`",
        f"x'; touch {m}/PWNED_quote; echo '",
        f'x"; touch {m}/PWNED_dquote; echo "',
        f'x"""; import os; os.system("touch {m}/PWNED_docstring") #',
        f'x"); __import__("os").system("touch {m}/PWNED_call"); ("',
        f"x\n__import__('os').system('touch {m}/PWNED_pyline')",
        f'x"\n[evil]\ncommand = "touch {m}/PWNED_toml',
        f"x\\\"; touch {m}/PWNED_backslash; #",
        f"x\x00\x1b[2J\x7f\u2028touch {m}/PWNED_controls",
    ]


def _stub_bin(tmp: Path) -> Path:
    """A PATH folder whose torchrun records that the script reached it and exits 0."""
    fake = tmp / "bin"
    fake.mkdir(exist_ok=True)
    for name in ("torchrun", "python", "python3"):
        exe = fake / name
        exe.write_text('#!/bin/sh\necho "$@" > "$LAUNCHED"\nexit 0\n')
        exe.chmod(0o755)
    return fake


def _stub_torchtitan(tmp: Path) -> Path:
    """Just enough of torchtitan for the exported module to import (its imports at the top)."""
    root = tmp / "stubs"
    pkg = root / "torchtitan"
    (pkg / "distributed").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "distributed" / "__init__.py").write_text("")
    (pkg / "distributed" / "activation_checkpoint.py").write_text(
        "class FullAC:\n    class Config:\n        pass\n\n\nclass SelectiveAC:\n    class Config:\n        pass\n")
    (pkg / "trainer.py").write_text("class Trainer:\n    class Config:\n        pass\n")
    return root


def _markers(marker: Path) -> list[str]:
    return sorted(p.name for p in marker.rglob("PWNED*"))


def check_bash(text: str, tmp: Path, marker: Path) -> None:
    script = tmp / "launch.sh"
    script.write_text(text)
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert syntax.returncode == 0, syntax.stderr
    launched = tmp / "launched.txt"
    env = {**os.environ, "PATH": f"{_stub_bin(tmp)}:{os.environ.get('PATH', '')}", "LAUNCHED": str(launched)}
    launched.unlink(missing_ok=True)
    res = subprocess.run(["bash", str(script), "--data-path", "x"], cwd=tmp, env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert launched.exists() and "pretrain_gpt.py" in launched.read_text()  # it ran up to the launcher
    assert _markers(marker) == []


def check_python(text: str, tmp: Path, marker: Path, model: str) -> None:
    moddir = tmp / "mod"
    moddir.mkdir(exist_ok=True)
    (moddir / "planner_export_cfg.py").write_text(text)
    code = ("import sys, json\n"
            f"sys.path[:0] = [{str(_stub_torchtitan(tmp))!r}, {str(moddir)!r}]\n"
            "import planner_export_cfg as m\n"
            "try:\n    m.planner_plan()\nexcept NotImplementedError as e:\n    print(json.dumps(str(e)))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert _markers(marker) == []
    # the name went into a string literal and came back exactly
    assert json.loads(res.stdout) == f"planner export: no torchtitan recipe for {model}"


def check_toml(text: str, model: str, cluster: str) -> None:
    cfg = tomllib.loads(text)
    assert set(cfg) == {"job", "model", "parallelism", "training", "activation_checkpoint"}, set(cfg)
    assert cfg["job"] == {"description": f"planner export: {model} on {cluster}"}

    def strings(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
        elif isinstance(node, str):
            yield node

    others = [s for s in strings({k: v for k, v in cfg.items() if k != "job"})]
    assert not [s for s in others if "PWNED" in s]


def test_writers_escape_every_payload(tmp_path):
    """The writers alone, on plan files built without PlanFile's checks (model_construct): even a name with
    a newline, NUL or escape sequence stays inside its comment or string in every format."""
    marker = tmp_path / "marker"
    marker.mkdir()
    graph = load_model(str(TINY_MODEL))
    for i, payload in enumerate(payloads(marker)):
        pf = PlanFile.model_construct(schema_version=1, model=payload, cluster=payload + "-c", nodes=1,
                                      workload=WORKLOAD, plan=PLAN, estimate=None)
        ctx = ExportContext(pf=pf, model=graph, devices_per_node=8)
        work = tmp_path / f"case{i}"
        work.mkdir()
        check_bash(export_text(ctx, "megatron"), work, marker)
        # torchtitan runs only the model flavours it ships: a model it has no flavour for (any of these
        # names) is refused in one line, the name escaped (planner/export/torchtitan.py)
        for fmt in ("torchtitan", "torchtitan-py"):
            with pytest.raises(Unsupported) as refused:
                export_text(ctx, fmt)
            assert "\n" not in str(refused.value) and refused.value.field == "model"
        json.loads(export_text(ctx, "deepspeed"))
        assert _markers(marker) == []


def _plan_file(path: Path, model: str, cluster: str) -> Path:
    pf = PlanFile(model=model, cluster=cluster, nodes=None, workload=WORKLOAD, plan=PLAN)
    path.write_text(pf.model_dump_json())
    return path


def test_cli_exports_of_real_files_with_hostile_names(capsys, tmp_path):
    """The whole path a user takes: a model file and a cluster file whose names are shell, Python and TOML
    syntax (a file name holds anything but '/' and NUL) resolve, export, and run nothing. The payloads touch
    relative names, and everything runs in `work`, so a marker would land there."""
    work = tmp_path / "work"
    work.mkdir()
    names = ["$(touch PWNED_subst)", "`touch PWNED_backtick`", "'; touch PWNED_quote; echo '",
             '"; touch PWNED_dquote; echo "', '"""; import os; os.system("touch PWNED_doc") #',
             '"); __import__("os").system("touch PWNED_call"); ("', '" [evil] x = "PWNED_toml', "\\\\"]
    for i, name in enumerate(names):
        model = work / f"m{i}{name}.yaml"
        shutil.copy(TINY_MODEL, model)
        cluster = work / f"c{i}{name}.yaml"
        cluster.write_text(CLUSTER_YAML)
        plan = _plan_file(tmp_path / f"plan{i}.json", str(model), str(cluster))
        case = tmp_path / f"case{i}"
        case.mkdir()
        for fmt, suffix in (("megatron", "sh"), ("torchtitan", "toml"), ("torchtitan-py", "py")):
            out = case / f"export.{suffix}"
            rc, _, err = run(capsys, "export", plan, "--to", fmt, "-o", out)
            if fmt.startswith("torchtitan"):  # no torchtitan flavour for a model file: one line, nothing written
                assert rc == 2 and err.count("\n") == 1 and "no model flavour" in err and not out.exists(), err
                continue
            assert rc == 0, err
            text = out.read_text()
            if fmt == "megatron":
                check_bash(text, work, work)
            elif fmt == "torchtitan":
                check_toml(text, str(model), str(cluster))
            else:
                check_python(text, work, work, str(model))
    assert _markers(tmp_path) == []


@pytest.mark.parametrize("field", ["model", "cluster"])
def test_names_with_line_breaks_are_refused_in_one_line(capsys, tmp_path, field):
    marker = tmp_path / "marker"
    marker.mkdir()
    for i, payload in enumerate(p for p in payloads(marker) if not p.isprintable()):
        doc = {"schema_version": 1, "model": "tiny-llama-20m", "cluster": "dgx-h100", "nodes": 1,
               "workload": WORKLOAD.model_dump(), "plan": PLAN.model_dump(), field: payload}
        path = tmp_path / f"p{i}.json"
        path.write_text(json.dumps(doc))
        for fmt in ("megatron", "torchtitan", "torchtitan-py", "deepspeed"):
            out = tmp_path / f"out{i}.{fmt}"
            rc, _, err = run(capsys, "export", path, "--to", fmt, "-o", out)
            line = one_line(rc, err, 2)
            assert f"{field}: want a catalog name or a file path" in line
            assert not out.exists()
    assert _markers(marker) == []
