"""Exports that start (issue 19): the three must-show cases planned with `plan --for X --save`, exported with
`export --to X`, and read by the launcher's own parser (DeepSpeedConfig, torchtitan 0.2.2 ConfigManager) or
held to the rules Megatron-LM's validate_args enforces (megatron/training/arguments.py @ d98e8a64dd; Megatron
is not installable on CPU). Plans are searched once per module (each search takes seconds)."""
from __future__ import annotations

import json
import re
import shlex

import pytest

from planner.app.cli import main
from planner.importers import load_model

CASES = {  # name: plan flags (the must-show cases on DGX H100)
    "llama3-70b": ["--model", "llama3-70b", "--cluster", "dgx-h100", "--nodes", "8", "--seq", "8192", "--gbs", "512"],
    "mixtral-8x22b": ["--model", "mixtral-8x22b", "--cluster", "dgx-h100", "--nodes", "16", "--seq", "4096",
                      "--gbs", "256"],
    "llama3-8b": ["--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "8", "--seq", "131072", "--gbs", "64"],
}
LAUNCHERS = ("megatron", "deepspeed", "torchtitan")
# What cannot run (exit 1 Infeasible or 2 BadInput) and a word of its one-line reason.
REFUSED = {("mixtral-8x22b", "torchtitan"): (2, "no model flavour"), ("llama3-8b", "deepspeed"): (1, "80 GB")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(case, launcher) -> (rc, plan JSON, export text, stderr) of `plan --for L --save` then `export --to L`."""
    import contextlib
    import io

    out = {}
    d = tmp_path_factory.mktemp("startup")
    for case, flags in CASES.items():
        for launcher in LAUNCHERS:
            saved, target = d / f"{case}-{launcher}.json", d / f"{case}-{launcher}.out"
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(["plan", *flags, "--for", launcher, "--top", "1", "--save", str(saved)])
                if rc == 0:
                    rc = main(["export", str(saved), "--to", launcher, "-o", str(target)])
            out[case, launcher] = (rc, json.loads(saved.read_text()) if saved.exists() else None,
                                   target.read_text() if target.exists() else None, err.getvalue())
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_plan_for_then_export(exported, case, launcher):
    """Every `plan --for X` plan exports to X; a launcher that cannot run the case refuses in one line."""
    rc, pf, text, err = exported[case, launcher]
    if (case, launcher) in REFUSED:
        code, word = REFUSED[case, launcher]
        assert rc == code and text is None
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and word in lines[0], err
        return
    assert rc == 0, err
    assert pf["stack"] == {"megatron": "megatron-core"}.get(launcher, launcher)


def _megatron_args(text: str) -> dict[str, list[str]]:
    body = re.search(r"^MEGATRON_ARGS=\((.*?)^\)", text, re.S | re.M).group(1)
    args, cur = {}, None
    for tok in shlex.split(body, comments=True):
        if tok.startswith("--"):
            cur = tok
            args[cur] = []
        else:
            args[cur].append(tok)
    return args


def _megatron_env(text: str) -> str | None:
    """CUDA_DEVICE_MAX_CONNECTIONS as the script leaves it ('unset' when it unsets it)."""
    if re.search(r"^unset CUDA_DEVICE_MAX_CONNECTIONS", text, re.M):
        return "unset"
    m = re.search(r"^export CUDA_DEVICE_MAX_CONNECTIONS=(\S+)", text, re.M)
    return m.group(1) if m else None


def megatron_startup_errors(text: str) -> list[str]:
    """The validate_args assertions (arguments.py @ d98e8a64dd) an exported script can trip, on a Hopper GPU."""
    a, env = _megatron_args(text), _megatron_env(text)
    tp = int(a.get("--tensor-model-parallel-size", ["1"])[0])
    cp = int(a.get("--context-parallel-size", ["1"])[0])
    fsdp = "--use-megatron-fsdp" in a
    sp = "--sequence-parallel" in a and tp > 1  # validate_args turns sp off with tp 1
    errors = []
    if "--tp-comm-overlap" in a and not sp:
        errors.append("tp_comm_overlap needs sequence_parallel")
    if fsdp and env == "1":
        errors.append("FSDP requires CUDA_DEVICE_MAX_CONNECTIONS > 1 or unset")
    if fsdp and a.get("--ckpt-format") != ["fsdp_dtensor"]:
        errors.append("Megatron-FSDP requires the fsdp_dtensor checkpointing format")
    if a.get("--ckpt-format") == ["fsdp_dtensor"] and not fsdp:
        errors.append("--ckpt-format fsdp_dtensor is only tested with Megatron FSDP")
    if (tp > 1 or cp > 1) and not fsdp and env != "1":
        errors.append("tp or cp > 1 requires CUDA_DEVICE_MAX_CONNECTIONS=1")
    if "--optimizer-cpu-offload" in a and "--use-precision-aware-optimizer" not in a:
        errors.append("optimizer_cpu_offload needs use_precision_aware_optimizer")
    if "--multi-latent-attention" in a and "--group-query-attention" in a:
        errors.append("GQA is mutually exclusive with MLA")
    if a.get("--recompute-granularity") == ["selective"] and "--recompute-method" in a:
        errors.append("recompute method is not supported with selective granularity")
    if a.get("--moe-flex-dispatcher-backend") and a.get("--moe-token-dispatcher-type") != ["flex"]:
        errors.append("the deepep backend needs the flex dispatcher")
    return errors


def test_startup_rules_catch_what_megatron_refuses():
    """The rule checker fails the scripts Megatron refused before this issue (so its passes below mean something)."""
    old_fsdp = "MEGATRON_ARGS=(\n --tensor-model-parallel-size 2 --use-megatron-fsdp --sequence-parallel\n)\n"
    assert set(megatron_startup_errors(old_fsdp)) == {"Megatron-FSDP requires the fsdp_dtensor checkpointing format"}
    old_tp = "MEGATRON_ARGS=(\n --tensor-model-parallel-size 4 --tp-comm-overlap\n)\n"
    assert len(megatron_startup_errors(old_tp)) == 2


@pytest.mark.parametrize("case", CASES)
def test_megatron_starts_with_the_models_architecture(exported, case):
    rc, pf, text, err = exported[case, "megatron"]
    assert rc == 0, err
    assert megatron_startup_errors(text) == []
    a, p = _megatron_args(text), pf["plan"]
    model = load_model(case)
    attn = next(layer for layer in model.layers if layer.kind == "attention")
    # Megatron's defaults are learned positions, tied embeddings, GeLU and LayerNorm: a Llama/Mixtral is none
    assert a["--position-embedding-type"] == ["rope"]
    assert a["--rotary-base"] == [{"mixtral-8x22b": "1000000"}.get(case, "500000")]
    assert "--untie-embeddings-and-output-weights" in a and "--swiglu" in a
    assert a["--normalization"] == ["RMSNorm"]
    assert "--group-query-attention" in a and a["--num-query-groups"] == [str(attn.kv_heads)]
    assert a["--num-layers"] == [str(model.num_blocks)] and a["--hidden-size"] == [str(attn.hidden)]
    if p["cp"] > 1:
        assert a["--cp-comm-type"] == [{"ring": "p2p", "a2a": "a2a"}[p["cp_comm"]]]
    moe = next((layer for layer in model.layers if layer.kind == "moe"), None)
    if moe is not None:
        assert a["--num-experts"] == [str(moe.experts)] and a["--moe-router-topk"] == [str(moe.topk)]
        want = {"a2a": ["alltoall"], "deepep": ["flex"]}[p["moe_dispatch"]]
        assert a["--moe-token-dispatcher-type"] == want  # never Megatron's default allgather
    else:
        assert "--num-experts" not in a


def _exported_cases(launcher: str) -> list[str]:
    """The cases `launcher` runs (its refusals are test_plan_for_then_export's)."""
    return [c for c in CASES if (c, launcher) not in REFUSED]


@pytest.mark.parametrize("case", _exported_cases("deepspeed"))
def test_deepspeed_config_accepts(exported, case, monkeypatch):
    rc, pf, text, err = exported[case, "deepspeed"]
    import deepspeed.runtime.config as dsc

    p = pf["plan"]
    # no process group: the world DeepSpeedConfig divides by sequence_parallel_size is the plan's
    monkeypatch.setattr(dsc.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dsc.dist, "get_world_size", lambda *a, **k: p["dp"] * p["tp"] * p["pp"] * p["cp"])
    cfg = dsc.DeepSpeedConfig(json.loads(text))
    assert cfg.world_size == p["dp"]  # the batch assertion ran against the plan's dp
    assert cfg.train_batch_size == pf["workload"]["global_batch"] and cfg.zero_optimization_stage == p["zero"]
    if p["cp"] > 1:
        assert p["cp_comm"] == "a2a" and json.loads(text)["sequence_parallel_size"] == p["cp"]


def _torchtitan_config_manager():
    """torchtitan 0.2.2's ConfigManager without torchtitan/__init__.py (tests/test_export.py loads it)."""
    from tests.test_export import _torchtitan_022_config_manager

    return _torchtitan_022_config_manager()


@pytest.mark.parametrize("case", _exported_cases("torchtitan"))
def test_torchtitan_config_manager_accepts(exported, case, tmp_path):
    rc, pf, text, err = exported[case, "torchtitan"]
    path = tmp_path / "job.toml"
    path.write_text(text)
    job = _torchtitan_config_manager()().parse_args(["--job.config_file", str(path)])
    p = pf["plan"]
    assert (job.model.name, job.model.flavor) == ("llama3", {"llama3-70b": "70B", "llama3-8b": "8B"}[case])
    par = job.parallelism
    assert par.data_parallel_replicate_degree * par.data_parallel_shard_degree == p["dp"]
    assert (par.tensor_parallel_degree, par.pipeline_parallel_degree, par.context_parallel_degree) == \
        (p["tp"], p["pp"], p["cp"])
