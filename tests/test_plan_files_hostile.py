"""Plan files as an attacker or a careless editor writes them (issue 16): every command that reads one
(estimate --plan, export, simulate, validate) refuses a plan `estimate` would refuse, in one line naming the
file and field, before writing or starting anything; and no valid plan reports an MFU or HFU above 1."""
from __future__ import annotations

import json
import math
import os

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from planner import catalog
from planner.core.errors import BadInput, Infeasible
from planner.core.plan import DocumentMix, OffloadPolicy, ParallelPlan, Workload, parse_plan_file
from planner.cost.estimate import estimate
from planner.importers import load_model
from planner.planfile import load_plan_file, resolve_plan_file
from tests.cli_helpers import one_line, run

# tiny-llama-20m: 6 blocks; dgx-h100 x 1: 8 GPUs. dp 4 x pp 2, 4 micro-batches of 2: a plan estimate takes.
GOOD = {
    "schema_version": 1, "model": "tiny-llama-20m", "cluster": "dgx-h100", "nodes": 1,
    "workload": {"global_batch": 32, "seq_len": 1024},
    "plan": {"dp": 4, "pp": 2, "mbs": 2, "recompute": "full"},
}
MOE = {  # moe-tiny: 8 experts, top-2, 4 blocks; ep 2 over dp 8
    "schema_version": 1, "model": "moe-tiny", "cluster": "dgx-h100", "nodes": 1,
    "workload": {"global_batch": 16, "seq_len": 512}, "plan": {"dp": 8, "ep": 2, "mbs": 1},
}


def _with(base: dict, path: str, value) -> dict:
    """A deep copy of base with the dotted field set (a '-' value deletes it)."""
    d = json.loads(json.dumps(base))
    *parents, last = path.split(".")
    node = d
    for k in parents:
        node = node.setdefault(k, {})
    if value == "-":
        node.pop(last, None)
    else:
        node[last] = value
    return d


# (name, file text, exit status, words the one line must hold)
BAD = [
    # the issue's cases: pp 1000 on 32 layers (with and without the devices for it), partitions, the cluster
    ("pp1000-devices", _with(_with(GOOD, "plan.pp", 1000), "plan.dp", 1), 2, ["1000 devices", "has 8"]),
    ("pp1000-blocks", _with(_with(_with(GOOD, "plan.pp", 1000), "plan.dp", 1), "nodes", 125), 2,
     ["1000 pipeline chunks", "6 blocks"]),
    ("negative-partition", _with(GOOD, "plan.partition", [{"layers": [0, -2]}, {"layers": [-2, 6]}]), 2,
     ["plan.partition.0.layers", "greater than or equal to 0"]),
    ("backwards-partition", _with(GOOD, "plan.partition", [{"layers": [0, 8]}, {"layers": [8, 6]}]), 2,
     ["plan.partition.1.layers", "first <= last"]),
    ("empty-stage", _with(GOOD, "plan.partition", [{"layers": [0, 0]}, {"layers": [0, 6]}]), 2,
     ["plan.partition.0.layers", "at least one block"]),
    ("short-partition", _with(GOOD, "plan.partition", [{"layers": [0, 3]}, {"layers": [3, 5]}]), 2,
     ["does not cover blocks 0..5"]),
    ("misspelled-cluster", _with(GOOD, "cluster", "dgx-h10o"), 2, ["cluster", "unknown cluster", "did you mean",
                                                                    "dgx-h100"]),
    ("misspelled-model", _with(GOOD, "model", "tiny-lama-20m"), 2, ["model", "did you mean", "tiny-llama-20m"]),
    ("nodes-on-fixed-cluster", _with(_with(GOOD, "cluster", "mixed-a100-h100"), "nodes", 3), 2,
     ["4 nodes", "drop nodes 3"]),
    # micro-batches that disagree with the batch (they inflated tokens/s), and the batch that does not divide
    ("microbatches", _with(GOOD, "plan.num_microbatches", 1), 2,
     ["plan.num_microbatches 1", "32 / (2 x 4) = 4"]),
    ("indivisible-batch", _with(GOOD, "workload.global_batch", 30), 2, ["global_batch 30", "not divisible"]),
    # strict types: no "yes" for true, no 2.0 or "2" for 2, no true for a ZeRO stage, no NaN or Infinity
    ("yes-bool", _with(GOOD, "plan.sp", "yes"), 2, ["plan.sp", "boolean", "'yes'"]),
    ("float-int", _with(GOOD, "plan.mbs", 2.0), 2, ["plan.mbs", "integer"]),
    ("string-int", _with(GOOD, "plan.mbs", "2"), 2, ["plan.mbs", "integer"]),
    ("fraction-int", _with(GOOD, "plan.dp", 1.5), 2, ["plan.dp", "integer"]),
    ("bool-zero", _with(GOOD, "plan.zero", True), 2, ["plan.zero"]),
    ("float-zero", _with(GOOD, "plan.zero", 1.0), 2, ["plan.zero"]),
    ("bool-version", _with(GOOD, "schema_version", True), 2, ["schema_version"]),
    ("null-estimate", json.dumps(GOOD)[:-1] + ', "estimate": null}', 0, []),  # the control: valid as it is
    ("nan-offload", json.dumps(_with(GOOD, "plan.offload", {"optimizer": 0.5})).replace("0.5", "NaN"), 2,
     ["plan.offload.optimizer"]),
    ("infinite-imbalance", json.dumps(_with(MOE, "workload.moe_imbalance", 2.5)).replace("2.5", "Infinity"), 2,
     ["workload.moe_imbalance"]),
    ("huge-capacity", _with(MOE, "workload.moe_capacity_factor", 1e30), 2, ["workload.moe_capacity_factor"]),
    ("capacity-0.01", _with(MOE, "workload.moe_capacity_factor", 0.01), 2,
     ["workload.moe_capacity_factor", "greater than or equal to 1"]),
    ("huge-int", _with(GOOD, "plan.dp", 10**40), 2, ["plan.dp", "cap"]),
    ("huge-seq", _with(GOOD, "workload.seq_len", 2**40), 2, ["workload.seq_len", "cap"]),
    ("huge-batch", _with(GOOD, "workload.global_batch", 8 * 10**9), 2, ["global_batch", "cap"]),
    ("mbs-over-batch", _with(GOOD, "plan.mbs", 64), 2, ["plan.mbs 64", "cap"]),
    ("many-microbatches", _with(_with(GOOD, "workload.global_batch", 8 * 10**6), "plan.mbs", 1), 2,
     ["micro-batches", "cap"]),
    # estimate's own rules, run on the file: ep must divide the experts, vpp needs interleaving, ...
    ("ep-experts", _with(_with(MOE, "plan.ep", 8), "plan.dp", 8), 0, []),  # the control: 8 | 8 experts
    ("ep-not-dividing", _with(_with(MOE, "plan.ep", 3), "plan.dp", 8), 2, ["plan.ep 3", "experts"]),
    ("ep-dense", _with(GOOD, "plan.ep", 2), 2, ["no MoE layers"]),
    ("vpp-schedule", _with(GOOD, "plan.vpp", 2), 2, ["vpp=2", "interleaved-1f1b"]),
    ("cp-a2a-heads", _with(_with(_with(GOOD, "plan.cp", 4), "plan.dp", 1), "plan.cp_comm", "a2a"), 2,
     ["heads"]),
    ("seq-chunks", _with(GOOD, "plan.seq_chunks", 3), 2, ["seq_chunks 3", "1024"]),
    ("interleaved-microbatches", _with(_with(_with(_with(GOOD, "plan.vpp", 3), "plan.schedule", "interleaved-1f1b"),
                                             "workload.global_batch", 8), "plan.mbs", 2), 2,
     ["micro-batches (1)", "pipeline stages (2)"]),
    ("estimate-nan", json.dumps(_with(GOOD, "estimate", {
        "step_time_s": 1.0, "tokens_per_s": 1.0, "mfu": 0.5, "hfu": 0.5, "peak_memory_bytes": 1.0,
        "memory_capacity_bytes": 2.0, "fits": True})).replace('"mfu": 0.5', '"mfu": NaN'), 2, ["estimate"]),
    ("estimate-negative", _with(GOOD, "estimate", {
        "step_time_s": -1.0, "tokens_per_s": 1.0, "mfu": 0.5, "hfu": 0.5, "peak_memory_bytes": 1.0,
        "memory_capacity_bytes": 2.0, "fits": True}), 2, ["estimate.step_time_s"]),
    ("newline-model", _with(GOOD, "model", "tiny-llama-20m\ntouch /tmp/PWNED_plan"), 2, ["model", "printable"]),
    ("empty-model", _with(GOOD, "model", ""), 2, ["model"]),
    ("long-model-path", _with(GOOD, "model", "m" * 300 + ".yaml"), 2, ["model: ", "too long"]),
    ("unknown-field", _with(GOOD, "plan.dpp", 2), 2, ["plan.dpp", "Extra inputs"]),
    ("missing-workload", _with(GOOD, "workload", "-"), 2, ["workload", "required"]),
    ("version-99", _with(GOOD, "schema_version", 99), 2, ["schema_version 99"]),
    ("empty", "", 2, ["JSON"]),
    ("null", "null", 2, ["object"]),
    ("list", "[]", 2, ["object"]),
    ("deep", "[" * 100_000 + "]" * 100_000, 2, ["recursion"]),
    ("truncated", json.dumps(GOOD)[:40], 2, ["JSON"]),
]


def _text(body) -> str:
    return body if isinstance(body, str) else json.dumps(body)


COMMANDS = [["estimate", "--plan"], ["export", "--to", "megatron", "-o", "OUT"], ["simulate", "--json"],
            ["validate"]]


# validate would start a run for the two valid controls: they run through the other three commands
CASES = [(c, *b) for c in COMMANDS for b in BAD if not (c == ["validate"] and b[2] == 0)]


@pytest.mark.parametrize("command, name, body, code, words", CASES, ids=[f"{c[0][0]}-{c[1]}" for c in CASES])
def test_bad_plan_files_are_refused_by_every_command(capsys, tmp_path, command, name, body, code, words):
    path = tmp_path / f"{name}.json"
    path.write_text(_text(body))
    out = tmp_path / "out.sh"
    args = [a if a != "OUT" else str(out) for a in command]
    args = args[:2] + [str(path)] + args[2:] if command[0] == "estimate" else [args[0], str(path), *args[1:]]
    rc, _, err = run(capsys, *args)
    if code == 0:
        assert rc == 0, err
        return
    line = one_line(rc, err, code)
    assert str(path) in line, line
    for w in words:
        assert w in line, (w, line)
    assert not out.exists()  # nothing written for a refused plan


def test_the_issue_cases_before_and_after(capsys, tmp_path):
    """The three numbers of the issue, on a real model: an inconsistent micro-batch count used to give
    several times the tokens/s, a capacity factor of 0.01 an MFU of 157%. Now the file is refused, and the
    consistent file's tokens/s is exactly its global batch x sequence over its step time."""
    base = {"schema_version": 1, "model": "llama3-8b", "cluster": "dgx-h100", "nodes": 4,
            "workload": {"global_batch": 256, "seq_len": 4096}, "plan": {"dp": 32, "mbs": 1, "zero": 1}}
    good = tmp_path / "good.json"
    good.write_text(json.dumps(base))
    rc, out, err = run(capsys, "estimate", "--plan", good, "--json")
    assert rc == 0, err
    est = json.loads(out)
    assert est["tokens_per_s"] == pytest.approx(256 * 4096 / est["step_time_s"], rel=1e-12)
    bad = tmp_path / "nmb.json"
    bad.write_text(json.dumps(_with(base, "plan.num_microbatches", 1)))
    rc, _, err = run(capsys, "estimate", "--plan", bad)
    assert "num_microbatches 1" in one_line(rc, err, 2)


def test_empty_output_names_are_refused(capsys, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(GOOD))
    for command in (["export", path, "--to", "megatron", "-o", ""], ["simulate", path, "-o", ""]):
        rc, out, err = run(capsys, *command)
        assert "-o ''" in one_line(rc, err, 2) and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


# root reads a file of mode 000: the unreadable case only where permissions hold
@pytest.mark.parametrize("kind", ["fifo", "directory", "oversized", "binary", "missing"]
                         + (["unreadable"] if os.geteuid() != 0 else []))
def test_plan_paths_that_are_not_plan_files(capsys, tmp_path, kind):
    path = tmp_path / "p.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "unreadable":
        path.write_text(json.dumps(GOOD))
        path.chmod(0)
    elif kind == "oversized":
        path.write_text(" " * (17 * 2**20) + json.dumps(GOOD))
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe" + json.dumps(GOOD).encode())
    for command in (["estimate", "--plan", path], ["export", path, "--to", "deepspeed"], ["simulate", path, "--json"]):
        rc, _, err = run(capsys, *command)
        assert str(path) in one_line(rc, err, 2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_plan_files_never_crash(data):
    """A valid file with one field replaced by a hostile value: parse and check either accept it (and it
    then estimates) or refuse it with a one-line PlannerError; nothing else escapes."""
    base = data.draw(st.sampled_from([GOOD, MOE]))
    fields = ["schema_version", "model", "cluster", "nodes", "workload.global_batch", "workload.seq_len",
              "workload.dtype", "workload.moe_capacity_factor", "workload.moe_imbalance", "workload.documents",
              "plan.dp", "plan.tp", "plan.pp", "plan.vpp", "plan.cp", "plan.ep", "plan.etp", "plan.sp", "plan.zero",
              "plan.mbs", "plan.num_microbatches", "plan.recompute", "plan.recompute_num_layers", "plan.schedule",
              "plan.offload", "plan.partition", "plan.seq_chunks", "plan.cp_comm", "plan.moe_dispatch",
              "plan.attention_pool"]
    hostile = st.one_of(
        st.integers(-3, 3), st.integers(min_value=2**31, max_value=2**70), st.sampled_from([-(2**63), 2**64, 10**30]),
        st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
        st.sampled_from(["yes", "false", "1", "1e30", "", "NaN", "a\nb", "$(touch /tmp/PWNED_h)", "dgx-h100",
                         "interleaved-1f1b", "full", "a2a", "deepep", "tp_slice"]),
        st.lists(st.integers(-2, 8), max_size=3), st.just([{"layers": [0, 3]}, {"layers": [3, 6]}]),
        st.just({"mean_tokens": 100}), st.just({"optimizer": 2}), st.just("-"))
    doc = _with(base, data.draw(st.sampled_from(fields)), data.draw(hostile))
    text = json.dumps(doc, allow_nan=True)
    try:
        loaded = resolve_plan_file(parse_plan_file(text, "fuzz.json"), "fuzz.json")
    except (BadInput, Infeasible) as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.json")
        return
    assert math.isfinite(loaded.estimate.step_time_s) and loaded.estimate.step_time_s > 0
    assert loaded.estimate.mfu <= 1 and loaded.estimate.hfu <= 1


def test_load_plan_file_returns_what_it_resolved(tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(GOOD))
    loaded = load_plan_file(path)
    assert loaded.model.num_blocks == 6 and loaded.cluster.device_count == 8
    again = estimate(loaded.model, loaded.cluster, loaded.pf.workload, loaded.pf.plan)
    assert loaded.estimate.step_time_s == again.step_time_s


# ---------------------------------------------------------------------------------------------------
# MFU and HFU never exceed 1, over random valid plans (capacity factors and imbalance included)

CLUSTERS = {(name, nodes): catalog.load_cluster(name, nodes)
            for name, nodes in (("dgx-h100", 1), ("dgx-h100", 4), ("dgx-a100-80gb", 2), ("jetson-orin-x4", None),
                                ("mixed-a100-h100", None))}
MODELS = {n: load_model(n) for n in ("tiny-llama-20m", "moe-tiny", "mixtral-8x7b", "qwen3-30b-a3b", "llama3-8b")}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def valid_cases(draw):
    cname = draw(st.sampled_from(sorted(CLUSTERS)))
    cluster = CLUSTERS[cname]
    mname = draw(st.sampled_from(sorted(MODELS)))
    model = MODELS[mname]
    n = cluster.device_count
    tp = draw(st.sampled_from([d for d in _divisors(n) if d <= 8]))
    pp = draw(st.sampled_from([d for d in _divisors(n // tp) if d <= model.num_blocks]))
    cp = draw(st.sampled_from(_divisors(n // (tp * pp))[:3]))
    dp = n // (tp * pp * cp)
    vpp = draw(st.sampled_from([v for v in (1, 2) if pp > 1 and pp * v <= model.num_blocks] or [1]))
    experts = sorted({layer.experts for layer in model.layers if layer.kind == "moe"})
    ep = 1
    if experts:
        ep = draw(st.sampled_from([e for e in _divisors(dp * cp * tp) if all(x % e == 0 for x in experts)]))
    mbs = draw(st.sampled_from([1, 2]))
    m = draw(st.integers(1, 16)) * (pp if vpp > 1 else 1)  # interleaving needs m a multiple of pp
    recompute = draw(st.sampled_from(["none", "selective", "full"]))
    flash = draw(st.booleans())
    chunks = draw(st.sampled_from([1, 1, 2, 4])) if vpp == 1 and flash else 1
    documents = draw(st.one_of(st.none(), st.builds(DocumentMix, mean_tokens=st.integers(64, 4096))))
    plan = ParallelPlan(dp=dp, tp=tp, pp=pp, cp=cp, vpp=vpp, ep=ep, mbs=mbs, recompute=recompute,
                        sp=tp > 1 and draw(st.booleans()), zero=draw(st.sampled_from([0, 1, 2, 3])),
                        schedule="interleaved-1f1b" if vpp > 1 else draw(st.sampled_from(["1f1b", "gpipe"])),
                        overlap_grad_reduce=draw(st.booleans()), overlap_tp_comm=tp > 1 and draw(st.booleans()),
                        flash_attention=flash, seq_chunks=chunks if documents is None else 1,
                        attention_pool=documents is not None and draw(st.booleans()),
                        offload=OffloadPolicy(optimizer=draw(st.sampled_from([0.0, 0.5])),
                                              activations=draw(st.sampled_from([0.0, 0.5]))),
                        num_microbatches=m if draw(st.booleans()) else None)
    cf = draw(st.one_of(st.none(), st.floats(1.0, 4.0))) if experts else None
    imbalance = draw(st.floats(1.0, 3.0)) if experts else 1.0
    workload = Workload(global_batch=mbs * dp * m, seq_len=draw(st.sampled_from([512, 2048, 8192])),
                        dtype=draw(st.sampled_from(["bf16", "fp8", "fp32"])), moe_capacity_factor=cf,
                        moe_imbalance=imbalance, documents=documents)
    return mname, cname, workload, plan  # names: a failing case prints short


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=valid_cases())
def test_mfu_and_hfu_never_exceed_one(case):
    mname, cname, workload, plan = case
    try:
        est = estimate(MODELS[mname], CLUSTERS[cname], workload, plan)
    except (BadInput, Infeasible):
        assume(False)
    assert 0 < est.mfu <= 1 and 0 < est.hfu <= 1, (est.mfu, est.hfu, plan, workload)
    assert est.mfu <= est.hfu * (1 + 1e-12)


def test_capacity_factor_below_one_is_refused():
    """CF < 1 caps every expert, the busiest included, below the balanced share: the cost model then timed
    less expert work than the model FLOPs it counted (MFU 157% at 0.01). The workload refuses it."""
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        Workload(global_batch=8, seq_len=512, moe_capacity_factor=0.5)
    ok = Workload(global_batch=8, seq_len=512, moe_capacity_factor=1.0)
    model, cluster = MODELS["moe-tiny"], CLUSTERS[("dgx-h100", 1)]
    est = estimate(model, cluster, ok, ParallelPlan(dp=8, ep=8, mbs=1))
    assert est.mfu <= 1


# ---------------------------------------------------------------------------------------------------
# validate: memory and process count are checked before anything starts


def test_validate_refuses_a_plan_that_does_not_fit_this_machine(capsys, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from planner.backends.torch import validate as v

    started = []

    def launch(*args, **kw):  # stands in for the run: records that the checks let it start
        started.append(args)
        raise RuntimeError("ran")

    monkeypatch.setattr(v, "launch", launch)
    # llama3-8b, dp 8 without ZeRO: each rank holds the whole model's fp32 weights, gradients and Adam states
    big = {"schema_version": 1, "model": "llama3-8b", "cluster": "dgx-h100", "nodes": 1,
           "workload": {"global_batch": 8, "seq_len": 4096}, "plan": {"dp": 8, "mbs": 1}}
    path = tmp_path / "big.json"
    path.write_text(json.dumps(big))
    monkeypatch.setattr(v, "usable_cores", lambda: 2)  # the cap on processes is 4 per core: 8 here
    rc, _, err = run(capsys, "validate", path)
    line = one_line(rc, err, 1)
    assert "GB per process" in line and "--force" in line and not started
    need = float(line.split("predicted peak is ")[1].split(" GB")[0])
    assert need > 100  # 8B parameters x 16 bytes of states at least
    # --force goes past the check (the stub launcher stands in for the run)
    with pytest.raises(RuntimeError, match="ran"):
        run(capsys, "validate", path, "--force", "--device", "cpu")
    assert started


def test_validate_bounds_nproc(capsys, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from planner.backends.torch import validate as v

    monkeypatch.setattr(v, "usable_cores", lambda: 2)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(GOOD))  # 8 devices: 8 processes, at the cap of 2 cores x 4
    rc, _, err = run(capsys, "validate", path, "--nproc", "9")
    assert "cap of 8 processes" in one_line(rc, err, 2)
    rc, _, err = run(capsys, "validate", path, "--nproc", "100000")
    assert "cap" in one_line(rc, err, 2)
    rc, _, err = run(capsys, "validate", path, "--nproc", "4")
    assert "--nproc 8" in one_line(rc, err, 2)
    wide = tmp_path / "wide.json"  # 32 devices on 2 cores: more processes than the cap, refused by default
    wide.write_text(json.dumps(_with(_with(GOOD, "nodes", 4), "plan.dp", 16)))
    rc, _, err = run(capsys, "validate", wide)
    assert "32 devices" in one_line(rc, err, 2)
