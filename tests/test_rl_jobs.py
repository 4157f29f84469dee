"""RL post-training jobs: the job file's checks (planner/core/job.py), the two mappings (planner/planners/rl.py) and
`plan --job` (planner.app.rl_job.run_job), on tiny models and on the 7B examples on two DGX H100."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from planner import catalog
from planner.app.rl_job import load_job, run_job
from planner.core.errors import BadInput, Infeasible
from planner.core.job import parse_job
from planner.importers import load_model
from planner.planners import rl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "jobs"
TINY = "tiny-llama-20m"


def tiny_job(algorithm="ppo", **rollout) -> dict:
    models = [{"role": "actor", "model": TINY, "train": True}]
    if algorithm == "ppo":
        models += [{"role": "critic", "model": TINY, "train": True},
                   {"role": "reward", "model": TINY, "train": False}]
    models.append({"role": "reference", "model": TINY, "train": False})
    job = {"kind": "rl", "algorithm": algorithm, "models": models, "training": {"global_batch": 32}}
    if algorithm == "dpo":
        job["training"]["seq_len"] = 384
    else:
        job["rollout"] = {"prompts_per_step": 64, "samples_per_prompt": 1, "prompt_len": 128, "response_len": 256,
                          **rollout}
    return job


def write(tmp_path, data, name="job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# the job file


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.update(extra=1), "unknown key 'extra'; known keys: kind, algorithm"),
    (lambda d: d["rollout"].update(respons_len=9), "unknown key 'respons_len' in rollout; known keys: prompts_per"),
    (lambda d: d["models"][1].update(role="judge"), "models.1.role: Input should be 'actor', 'critic'"),
    (lambda d: d["models"][1].update(train=1), "models.1.train: Input should be a valid boolean (got 1)"),
    (lambda d: d["rollout"].update(prompts_per_step="64"), "rollout.prompts_per_step: Input should be a valid integer"),
    (lambda d: d["rollout"].update(off_policy_steps=True), "rollout.off_policy_steps"),
    (lambda d: d.update(algorithm="grpo"), "models.1.role: GRPO has no critic"),
    (lambda d: d["models"].pop(1), "models: PPO needs a critic model; add {role: critic"),
    (lambda d: d["models"][3].update(train=True), "models.3.train: the reference is frozen in PPO; set train: false"),
    (lambda d: d["models"].append(dict(d["models"][0])), "models.4.role: role 'actor' is given twice"),
    (lambda d: d["training"].update(global_batch=30), "training.global_batch: the rollout's 64 sequences"),
    (lambda d: d["training"].update(seq_len=100), "training.seq_len: 100 differs from prompt_len + response_len = 384"),
    (lambda d: d.pop("training"), "missing key 'training'"),
    (lambda d: d.update(algorithm="dpo"), "DPO has no critic"),
    (lambda d: d["rollout"].update(prompt_len=2**24), "past the cap of 16,777,216 tokens"),
    (lambda d: d["models"][0].update(model="a\nb"), "models.0.model: want a catalog name"),
])
def test_job_file_mistakes_are_one_line_naming_the_key_and_the_fix(change, expected):
    data = tiny_job()
    change(data)
    with pytest.raises(BadInput) as e:
        parse_job(data, "job.yaml")
    msg = str(e.value)
    assert msg.startswith("job.yaml: ") and expected in msg and "\n" not in msg


def test_dpo_generates_nothing_and_grpo_needs_a_rollout():
    dpo = tiny_job("dpo")
    assert parse_job(dpo).sequences == 32
    dpo["rollout"] = tiny_job()["rollout"]
    with pytest.raises(BadInput, match="rollout: DPO generates nothing"):
        parse_job(dpo)
    grpo = tiny_job("grpo")
    del grpo["rollout"]
    with pytest.raises(BadInput, match="rollout: GRPO generates its training data"):
        parse_job(grpo)


def test_unknown_or_unsuitable_models_name_their_entry(tmp_path):
    data = tiny_job()
    data["models"][2]["model"] = "tiny-lama-20m"
    with pytest.raises(BadInput, match=r"job.yaml: models.2.model: unknown model 'tiny-lama-20m' \(did you mean"):
        load_job(write(tmp_path, data))
    data["models"][2]["model"] = "pixart-alpha-512"
    with pytest.raises(BadInput, match="models.2.model: 'pixart-alpha-512' is a diffusion model, not a decoder"):
        load_job(write(tmp_path, data))


def test_the_examples_parse_and_count_their_steps():
    job, models = load_job(str(EXAMPLES / "grpo-7b.yaml"))
    assert (job.algorithm, job.sequences, job.seq_len, job.steps) == ("grpo", 1024, 1536, 4)
    assert set(models) == {"actor", "reference"}
    job, models = load_job(str(EXAMPLES / "ppo-7b.yaml"))
    assert set(models) == {"actor", "critic", "reference", "reward"} and job.steps == 2


# ---------------------------------------------------------------------------------------------------------
# the mappings


def test_value_heads_replace_the_lm_head():
    m = load_model(TINY)
    head = next(x for x in m.layers if x.kind == "head")
    v = rl.value_head(m)
    assert m.params - v.params == head.vocab * head.hidden - head.hidden


def test_both_mappings_are_costed_with_pools_inside_the_cluster(tmp_path):
    out, text = run_job(write(tmp_path, tiny_job()), "dgx-h100", 1)
    mappings = {out["mapping"]} | {a["mapping"] for a in out["alternatives"]}
    assert mappings == {"colocated", "disaggregated"}
    for m in [out] + out["alternatives"]:
        it = m["iteration"]
        assert it["total_s"] > 0 and all(it[k] >= 0 for k in it)
        used = sorted(i for p in m["pools"] for i in range(p["first_device"], p["first_device"] + p["devices"]))
        assert used == list(range(out["devices"]))  # every device in exactly one pool
    colo = next(m for m in [out] + out["alternatives"] if m["mapping"] == "colocated")
    it = colo["iteration"]
    assert it["total_s"] == pytest.approx(it["generation_s"] + it["inference_s"] + it["training_s"] + it["sync_s"])
    trained = colo["pools"][0]["plan"]["training"]
    assert set(trained) == {"actor", "critic"}  # PPO trains both; each with its own searched plan
    assert out["iteration"]["total_s"] <= min(a["iteration"]["total_s"] for a in out["alternatives"])
    assert "colocated" in text and "why:" in text
    js, _ = run_job(write(tmp_path, tiny_job()), "dgx-h100", 1, as_json=True)
    assert json.loads(_)["mapping"] == js["mapping"]


def test_one_step_off_policy_overlaps_the_disaggregated_pools(tmp_path):
    def disagg(data):
        out, _ = run_job(write(tmp_path, data), "dgx-h100", 1)
        return next(m for m in [out] + out["alternatives"] if m["mapping"] == "disaggregated")
    sync = disagg(tiny_job())
    overlap = disagg(tiny_job(off_policy_steps=1))
    s, o = sync["iteration"], overlap["iteration"]
    assert s["total_s"] == pytest.approx(s["generation_s"] + s["inference_s"] + s["training_s"] + s["sync_s"])
    assert o["total_s"] == pytest.approx(max(o["generation_s"], o["inference_s"] + o["training_s"]) + o["sync_s"])
    assert o["total_s"] < s["total_s"]


def test_grpo_trains_no_critic_and_dpo_generates_nothing(tmp_path):
    grpo, _ = run_job(write(tmp_path, tiny_job("grpo")), "dgx-h100", 1)
    ppo, _ = run_job(write(tmp_path, tiny_job("ppo")), "dgx-h100", 1)
    for out in (grpo, ppo):
        colo = next(m for m in [out] + out["alternatives"] if m["mapping"] == "colocated")
        assert ("critic" in colo["pools"][0]["plan"]["training"]) == (out is ppo)
    dpo, _ = run_job(write(tmp_path, tiny_job("dpo")), "dgx-h100", 1)
    for m in [dpo] + dpo["alternatives"]:
        assert m["iteration"]["generation_s"] == 0 and m["iteration"]["sync_s"] == 0


def test_resharding_gathers_only_what_a_device_lacks():
    ctx = rl._Job(job=parse_job(tiny_job()), models={"actor": load_model("qwen2-7b")},
                  cluster=catalog.load_cluster("dgx-h100", 2))
    replicated = {"tp": 1, "pp": 1, "dp": 16, "zero": 2}  # every device holds all the weights
    sharded = {"tp": 1, "pp": 1, "dp": 16, "zero": 3}  # each holds 1/16
    local, gathered = rl._reshard_s(ctx, replicated, 1), rl._reshard_s(ctx, sharded, 1)
    assert 0 < local < gathered
    assert rl._reshard_s(ctx, sharded, 2) < gathered  # a tp2 engine needs half the bytes per device


def test_offload_moves_every_idle_state_to_the_host_and_back():
    job = parse_job(tiny_job())
    models = {r: load_model(TINY) for r in ("actor", "critic", "reference", "reward")}
    cluster = catalog.load_cluster("dgx-h100", 1)
    ctx = rl._Job(job=job, models=models, cluster=cluster)
    kw = dict(generate=True, forward=ctx.forward_roles(), train=ctx.trained_roles())
    off = rl.timeshare(ctx, 0, 8, offload=True, **kw)
    stay = rl.timeshare(ctx, 0, 8, offload=False, **kw)
    states = sum(ctx.state_bytes(r, 8) for r in ("actor", "critic", "reference", "reward"))
    assert off["offload_s"] == pytest.approx(2 * states / cluster.nodes[0].host_link.bytes_per_s)
    assert stay["offload_s"] == 0
    # states left on the devices leave less room for the KV cache
    assert off["generation"]["max_batch"] >= stay["generation"]["max_batch"]


def test_a_job_that_fits_nowhere_is_infeasible(tmp_path):
    data = tiny_job("grpo")
    data["models"][0]["model"] = data["models"][1]["model"] = "llama3.1-405b"
    with pytest.raises(Infeasible, match="no mapping fits on dgx-h100"):
        run_job(write(tmp_path, data), "dgx-h100", 1)


def test_grpo_7b_on_two_dgx_h100():
    """The must-show at full size: both mappings, pools within the 16 devices, and the published direction
    (colocated ahead of a synchronous disaggregated split at this scale)."""
    out, _ = run_job(str(EXAMPLES / "grpo-7b.yaml"), "dgx-h100", 2)
    assert out["devices"] == 16 and out["mapping"] == "colocated"
    dis = out["alternatives"][0]
    assert dis["mapping"] == "disaggregated" and sum(p["devices"] for p in dis["pools"]) == 16
    assert all(s["producer_devices"] + s["training_devices"] == 16 for s in dis["splits"])
    assert dis["iteration"]["total_s"] > out["iteration"]["total_s"]


def test_mixed_clusters_are_refused(tmp_path):
    with pytest.raises(BadInput, match="mixes device or node types"):
        run_job(write(tmp_path, tiny_job("grpo")), "mixed-a100-h100")


def test_cli_plan_job_and_estimate_infer(run_cli):
    """The command line reaches both: `plan --job` (both mappings, JSON with pools inside the cluster) and
    `estimate --infer`; a job with --model, or --infer without its lengths, is one line, exit 2."""
    import json

    rc, out, err = run_cli("plan", "--job", "examples/jobs/grpo-7b.yaml", "--cluster", "dgx-h100", "--nodes", "2",
                           "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert {res["mapping"], res["alternatives"][0]["mapping"]} == {"colocated", "disaggregated"}
    assert all(sum(p["devices"] if isinstance(p["devices"], int) else len(p["devices"]) for p in a["pools"]) <= 16
               for a in (res, *res["alternatives"]) if a["mapping"] == "disaggregated")
    rc, out, err = run_cli("plan", "--job", "examples/jobs/grpo-7b.yaml", "--cluster", "dgx-h100", "--model", "x")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--model" in err
    rc, out, err = run_cli("estimate", "--infer", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "1",
                           "--batch", "8", "--prompt-len", "256", "--gen-len", "128", "--json")
    assert rc == 0, err
    assert json.loads(out)["decode_s"] > 0
    rc, out, err = run_cli("estimate", "--infer", "--model", "llama3-8b", "--cluster", "dgx-h100")
    assert rc == 2 and "--batch" in err and len(err.strip().splitlines()) == 1
