"""The CLI's error contract (DESIGN.md section 3): bad input is one line on stderr and exit status 2,
never a traceback, and the line names the problem and where it is (file and line, field, or name)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from cli_helpers import one_line
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.app.cli import main

TINY = {
    "name": "tiny", "source": "test model", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2,
    "ffn_hidden": 128, "vocab": 1000, "max_seq": 128,
}
HF_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 128,
}


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------
# Files that are missing or do not parse: the line names the file, and the line number where it broke.


def test_missing_model_file(run_cli):
    rc, out, err = run_cli("profiles", "show", "/nonexistent/config.json")
    line = one_line(rc, err)
    assert "/nonexistent/config.json" in line
    assert "no such file" in line.lower()
    assert out == ""


def test_broken_json(run_cli, tmp_path):
    path = tmp_path / "config.json"
    # Truncated mid-file: the parser gives up at the end of line 4.
    path.write_text('{\n  "model_type": "llama",\n  "hidden_size": 4096,\n  "num_hidden_layers": ')
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert f"{path}:4:" in line
    assert "JSON" in line


def test_broken_yaml_bad_indentation(run_cli, tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("name: bad\nlayers: 2\n  hidden: 64\nheads: 4\n")
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert f"{path}:3:" in line
    assert "YAML" in line


# ---------------------------------------------------------------------------------------------------
# Project model files with bad values: the line names the file and the field.


def test_zero_dimension_names_the_field(run_cli, tmp_path):
    path = write_yaml(tmp_path / "model.yaml", {**TINY, "hidden": 0})
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert "'hidden'" in line


def test_negative_dimension_names_the_field(run_cli, tmp_path):
    path = write_yaml(tmp_path / "model.yaml", {**TINY, "layers": -2})
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert "'layers'" in line
    assert "-2" in line


def test_zero_and_negative_dimension_both_named(run_cli, tmp_path):
    path = write_yaml(tmp_path / "model.yaml", {**TINY, "hidden": 0, "layers": -2})
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert "'hidden'" in line and "'layers'" in line


def test_unknown_field_in_model_yaml(run_cli, tmp_path):
    path = write_yaml(tmp_path / "model.yaml", {**TINY, "hiden": 4096})
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert "unknown field 'hiden'" in line


def test_heads_not_a_multiple_of_kv_heads(run_cli, tmp_path):
    path = write_yaml(tmp_path / "model.yaml", {**TINY, "heads": 6, "kv_heads": 4, "head_dim": 16})
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert "kv_heads" in line and "multiple" in line
    assert "(top level)" not in line and "Value error" not in line


def test_hf_heads_not_a_multiple_of_kv_heads(run_cli, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**HF_LLAMA, "num_attention_heads": 6, "num_key_value_heads": 4,
                                "head_dim": 16}))
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert "kv_heads" in line and "multiple" in line


# ---------------------------------------------------------------------------------------------------
# Unknown names: the line names the unknown thing and suggests the closest known ones.


def test_unknown_preset_suggests_llama3_8b(run_cli):
    rc, _, err = run_cli("profiles", "show", "llama3-8bb")
    line = one_line(rc, err)
    assert "llama3-8bb" in line
    assert "did you mean" in line
    assert "'llama3-8b'" in line


def test_unknown_preset_suggests_tiny_llama(run_cli):
    rc, _, err = run_cli("profiles", "show", "tiny-llama-2Om")
    line = one_line(rc, err)
    assert "tiny-llama-2Om" in line
    assert "did you mean" in line
    assert "'tiny-llama-20m'" in line


# ---------------------------------------------------------------------------------------------------
# Hugging Face config.json files the importer cannot use.


def test_hf_unknown_model_type(run_cli, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**HF_LLAMA, "model_type": "bert", "architectures": ["BertModel"]}))
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert "'bert'" in line and "not supported" in line


def test_hf_missing_required_key(run_cli, tmp_path):
    cfg = dict(HF_LLAMA)
    del cfg["num_hidden_layers"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert "'num_hidden_layers'" in line and "missing" in line


@pytest.mark.parametrize("cfg, field", [
    # A value of the wrong type where the importer does arithmetic (gpt2's ffn = 4 * n_embd).
    ({"model_type": "gpt2", "n_embd": {}, "n_layer": 2, "n_head": 2, "vocab_size": 10}, "n_embd"),
    # Values the MoE / MLA sub-configs refuse: they must end as one line too.
    ({**HF_LLAMA, "model_type": "mixtral", "num_local_experts": 0, "num_experts_per_tok": 2}, "experts"),
    ({**HF_LLAMA, "model_type": "mixtral", "num_local_experts": [8], "num_experts_per_tok": 2}, "experts"),
    ({**HF_LLAMA, "model_type": "deepseek_v3", "kv_lora_rank": 0, "qk_nope_head_dim": 8,
      "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 8}, "kv_lora_rank"),
])
def test_hf_bad_value(run_cli, tmp_path, cfg, field):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert field in line


# ---------------------------------------------------------------------------------------------------
# Cluster files.

CLUSTER = {"name": "test-cluster", "source": "a test cluster", "groups": [{"node": "dgx-h100", "count": 2}]}


def test_cluster_file_that_is_valid_is_shown(run_cli, tmp_path):
    # The baseline the error cases below differ from by one field.
    path = write_yaml(tmp_path / "cluster.yaml", CLUSTER)
    rc, out, err = run_cli("profiles", "show", path, "--json")
    assert rc == 0, err
    assert err == ""
    assert json.loads(out)["resolved"]["devices"] == 16


def test_cluster_unknown_field(run_cli, tmp_path):
    path = write_yaml(tmp_path / "cluster.yaml", {**CLUSTER, "fabrik": "ib-ndr"})
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert "unknown field 'fabrik'" in line


def test_cluster_unknown_field_in_a_group(run_cli, tmp_path):
    path = write_yaml(tmp_path / "cluster.yaml",
                      {**CLUSTER, "groups": [{"node": "dgx-h100", "count": 2, "devices": 8}]})
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert "unknown field 'groups.0.devices'" in line


def test_cluster_unknown_node_type(run_cli, tmp_path):
    path = write_yaml(tmp_path / "cluster.yaml", {**CLUSTER, "groups": [{"node": "dgx-h100x", "count": 2}]})
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert "'dgx-h100x'" in line
    assert "did you mean" in line and "'dgx-h100'" in line


def test_cluster_names_a_device_where_a_node_type_goes(run_cli, tmp_path):
    path = write_yaml(tmp_path / "cluster.yaml",
                      {**CLUSTER, "groups": [{"node": "h100-sxm-80gb", "count": 2}]})
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert "'h100-sxm-80gb'" in line and "device" in line


def test_cluster_unknown_device(run_cli, tmp_path):
    path = write_yaml(tmp_path / "cluster.yaml", {**CLUSTER, "groups": [{"node": "h100-sxm-80gbx", "count": 2}]})
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert "unknown" in line and "'h100-sxm-80gbx'" in line


def test_cluster_unknown_link(run_cli, tmp_path):
    path = write_yaml(tmp_path / "cluster.yaml", {**CLUSTER, "fabric": "ib-ndrr"})
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert str(path) in line
    assert "'fabric'" in line and "'ib-ndrr'" in line
    assert "did you mean" in line and "'ib-ndr'" in line


# ---------------------------------------------------------------------------------------------------
# Bad command lines: one line, not argparse's usage block.


@pytest.mark.parametrize("args, words", [
    (["bogus"], ["invalid choice", "'bogus'"]),
    ([], ["required", "command"]),
    (["profiles"], ["required", "action"]),
    (["profiles", "show"], ["required", "name"]),
    (["profiles", "list", "--bogus"], ["unrecognized", "--bogus"]),
])
def test_bad_usage(run_cli, args, words):
    rc, out, err = run_cli(*args)
    line = one_line(rc, err)
    for w in words:
        assert w in line
    assert out == ""


def test_error_line_stays_one_line_with_a_newline_in_the_name(run_cli):
    rc, _, err = run_cli("profiles", "show", "llama\nbogus")
    one_line(rc, err)


def test_error_line_stays_one_line_with_a_line_break_in_a_key(run_cli, tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({**TINY, "a\u2028b\nc\x85": 1}))
    rc, _, err = run_cli("profiles", "show", path)
    line = one_line(rc, err)
    assert "unknown field" in line


# ---------------------------------------------------------------------------------------------------
# Fuzz: whatever is in the model file, the CLI answers 0 or one line and 2 — never a traceback.

_FIELDS = sorted(set(TINY) | set(HF_LLAMA) | {
    "family", "backbone", "groups", "moe", "mla", "head_dim", "n_embd", "n_layer", "n_head", "n_inner",
    "num_local_experts", "num_experts_per_tok", "num_experts", "moe_intermediate_size", "kv_lora_rank",
    "tied_embeddings", "gated_mlp", "norm", "position"})
_MODEL_TYPES = ["llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "deepseek_v3", "gpt2", "gpt_neox", "bert"]

_scalars = (st.none() | st.booleans() | st.integers(-2, 64) | st.floats(allow_nan=False, width=32)
            | st.text(max_size=6) | st.sampled_from(_MODEL_TYPES))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
_keys = st.sampled_from(_FIELDS) | st.text(max_size=6)
_random_dicts = st.dictionaries(_keys, _values, max_size=8)
# One field of a valid model (project or HF) replaced, added or removed.
_mutated = st.builds(
    lambda base, key, value, drop: ({k: v for k, v in base.items() if k != key} if drop
                                    else {**base, key: value}),
    st.sampled_from([TINY, HF_LLAMA, {**HF_LLAMA, "model_type": "mixtral", "num_local_experts": 4,
                                      "num_experts_per_tok": 2}]),
    _keys, _values, st.booleans())
_docs = st.one_of(_random_dicts, _mutated, _values)

_fuzz = settings(max_examples=30, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _check_in_process(capsys, path: Path) -> None:
    capsys.readouterr()
    rc = main(["profiles", "show", str(path)])
    out, err = capsys.readouterr()
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err
    if rc == 0:
        assert err == ""
    else:
        assert len(err.splitlines()) == 1 and err.strip(), err


@_fuzz
@given(doc=_docs, suffix=st.sampled_from([".yaml", ".json"]))
def test_fuzz_model_file_contents(capsys, doc, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"model{suffix}"
        path.write_text(json.dumps(doc) if suffix == ".json" else yaml.safe_dump(doc))
        _check_in_process(capsys, path)


_yamlish = st.text(alphabet=st.sampled_from(list("ab1-:[]{}\n #&*!|>'\",?%@\t")), max_size=120)


@_fuzz
@given(data=st.binary(max_size=200) | _yamlish.map(str.encode), suffix=st.sampled_from([".yaml", ".json"]))
def test_fuzz_model_file_bytes(capsys, data, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"model{suffix}"
        path.write_bytes(data)
        _check_in_process(capsys, path)
