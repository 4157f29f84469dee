"""What `plan --job JOB.yaml` and `estimate --infer` answer (docs/guide/rl.md): an RL post-training job mapped onto
a cluster (planner.planners.rl), and one generation engine's cost (planner.cost.inference). Each returns the
JSON object and the text a command prints; the command modules only parse flags and print."""
from __future__ import annotations

import json
from pathlib import Path

from planner.core.errors import BadInput, Infeasible
from planner.core.model import ModelGraph

TEXT_KEYS = ("generation_s", "inference_s", "training_s", "sync_s", "total_s")


def load_job(path: str):
    """The job file read safely (planner.catalog.read_data_file: no FIFO, oversized file, broken YAML, NaN) and
    parsed strictly (planner.core.job.parse_job), and its models loaded by role; BadInput, one line, naming
    the file and the key."""
    from planner.catalog import read_data_file
    from planner.core.job import parse_job
    from planner.importers import load_model

    job = parse_job(read_data_file(Path(path), "RL job file (YAML or JSON)"), path)
    models: dict[str, ModelGraph] = {}
    for i, m in enumerate(job.models):
        try:
            graph = load_model(m.model)
        except BadInput as e:
            raise BadInput(f"{path}: models.{i}.model: {e}") from None
        if graph.family == "diffusion" or not any(layer.kind == "head" for layer in graph.layers) or \
                not any(layer.kind == "attention" and layer.causal for layer in graph.layers):
            raise BadInput(f"{path}: models.{i}.model: '{m.model}' is a {graph.family} model, not a decoder "
                           "with causal attention and an LM head; an RL job takes decoder language models")
        models[m.role] = graph
    return job, models


def run_job(path: str, cluster_name: str, nodes: int | None = None, as_json: bool = False) -> tuple[dict, str]:
    """`plan --job PATH --cluster NAME [--nodes N]`: both mappings of the job, the faster first."""
    from planner import catalog
    from planner.planners.rl import plan_job

    job, models = load_job(path)
    cluster = catalog.load_cluster(cluster_name, nodes)
    out = plan_job(job, models, cluster)
    out = {"job": {"path": str(path), "algorithm": job.algorithm, "models": {m.role: m.model for m in job.models},
                   "sequences": job.sequences, "seq_len": job.seq_len, "optimizer_steps": job.steps},
           "cluster": cluster.name, "nodes": nodes, "devices": cluster.device_count, **out}
    return out, (json.dumps(out, indent=2, default=str) if as_json else job_text(out))


def job_text(out: dict) -> str:
    """The answer as a few lines: each mapping's iteration, its pools, and why."""
    j = out["job"]
    lines = [f"RL job {j['path']}: {j['algorithm'].upper()}, {j['sequences']} sequences of {j['seq_len']} tokens, "
             f"{j['optimizer_steps']} optimizer steps per iteration on {out['cluster']} ({out['devices']} devices)",
             "", f"{'mapping':<15}" + "".join(f"{k.removesuffix('_s') + ' s':>13}" for k in TEXT_KEYS)]
    for m in [out] + out["alternatives"]:
        lines.append(f"{m['mapping']:<15}" + "".join(f"{m['iteration'][k]:>13.4g}" for k in TEXT_KEYS))
    lines.append("")
    for m in [out] + out["alternatives"]:
        for p in m["pools"]:
            lines.append(f"{m['mapping']}: devices {p['first_device']}-{p['first_device'] + p['devices'] - 1}: "
                         f"{', '.join(p['roles'])}: {_pool_text(p['plan'])}")
    lines += ["", "why: " + out["why"]]
    return "\n".join(lines)


def _pool_text(plan: dict) -> str:
    parts = []
    g = plan.get("generation")
    if g:
        parts.append(f"generation {g['engines']} x tp{g['tp']} engines, batch {g['max_batch']}, {g['waves']} wave(s), "
                     f"{g['seconds']:.1f} s")
    for role, f in plan.get("forward", {}).items():
        parts.append(f"{role} forward {f['replicas']} x tp{f['tp']} {f['seconds']:.1f} s")
    for role, t in plan.get("training", {}).items():
        parts.append(f"{role} training {t['label']} {t['steps']} x {t['step_time_s']:.2f} s")
    if plan.get("offload"):
        parts.append(f"idle states offloaded ({plan['offload_s']:.1f} s)")
    if plan.get("reshard_s"):
        parts.append(f"reshard {plan['reshard_s']:.2f} s")
    return "; ".join(parts)


def run_infer(model_name: str, cluster_name: str, nodes: int | None = None, *, batch: int, prompt_len: int,
              gen_len: int, tp: int = 1, pp: int = 1, as_json: bool = False) -> tuple[dict, str]:
    """`estimate --infer --model M --cluster C [--nodes N] --batch B --prompt-len P --gen-len G [--tp T --pp P]`:
    one engine of tp x pp devices generating G tokens for B prompts of P tokens (planner.cost.inference)."""
    from planner import catalog
    from planner.core.limits import MAX_DEVICES, MAX_GLOBAL_BATCH, MAX_SEQ_LEN, check_int
    from planner.cost import inference
    from planner.importers import load_model

    check_int("--batch", batch, MAX_GLOBAL_BATCH, "sequences")
    check_int("--prompt-len", prompt_len, MAX_SEQ_LEN, "tokens")
    check_int("--gen-len", gen_len, MAX_SEQ_LEN, "tokens")
    check_int("--tp", tp, MAX_DEVICES)
    check_int("--pp", pp, MAX_DEVICES)
    if prompt_len + gen_len > MAX_SEQ_LEN:
        raise BadInput(f"--prompt-len + --gen-len = {prompt_len + gen_len:,} is past the cap of {MAX_SEQ_LEN:,} "
                       "tokens per sequence; shorten them")
    model = load_model(model_name)
    cluster = catalog.load_cluster(cluster_name, nodes)
    _check_engine(model, cluster, tp, pp)
    tp_link = cluster.collective(range(tp)) if tp > 1 else None
    pp_link = cluster.p2p(0, tp) if pp > 1 else None
    device = cluster.devices[0].device
    g = inference.generate(model, device, batch, prompt_len, gen_len, tp=tp, pp=pp, tp_link=tp_link, pp_link=pp_link)
    if g.max_batch == 0:
        raise Infeasible(f"{model.name} does not fit on tp{tp} x pp{pp} {device.name}: weights "
                         f"{g.weights_bytes / 1e9:.1f} GB per device plus the workspace exceed "
                         f"{inference.GPU_MEMORY_UTILIZATION:.0%} of {device.memory_bytes / 1e9:.0f} GB; "
                         "raise --tp or --pp")
    out = {"model": model.name, "cluster": cluster.name, "device": device.name, "batch": batch,
           "prompt_len": prompt_len, "gen_len": gen_len, **g.as_dict()}
    text = (f"{model.name} on tp{tp} x pp{pp} {device.name}: {batch} sequences, prompt {prompt_len}, "
            f"generate {gen_len}\n"
            f"prefill {g.prefill_s:.3f} s, decode {g.decode_s:.3f} s, {g.tokens_per_s:,.0f} tokens/s\n"
            f"KV cache {g.kv_cache_bytes / 1e9:.2f} GB, weights {g.weights_bytes / 1e9:.2f} GB per device; "
            f"max batch {g.max_batch}, {g.waves} wave(s), fits: {'yes' if g.fits else 'no'}")
    return out, (json.dumps(out, indent=2, default=str) if as_json else text)


def _check_engine(model: ModelGraph, cluster, tp: int, pp: int) -> None:
    """An engine's tp x pp within the cluster, tp inside one node, heads divisible by tp, a block per stage."""
    if tp * pp > cluster.device_count:
        raise BadInput(f"--tp {tp} x --pp {pp} = {tp * pp} devices, but {cluster.name} has {cluster.device_count}; "
                       "lower them or raise --nodes")
    if tp > cluster.devices_per_node:
        raise BadInput(f"--tp {tp} spans nodes ({cluster.devices_per_node} devices per node); an engine keeps tp "
                       "inside a node: use --pp across nodes")
    heads = next((layer.heads for layer in model.layers if layer.kind == "attention"), 0)
    if not heads:
        raise BadInput(f"{model.name} has no attention layers; --infer costs decoder language models")
    if heads % tp:
        raise BadInput(f"--tp {tp} does not divide {model.name}'s {heads} attention heads; give a divisor of {heads}")
    if pp > model.num_blocks:
        raise BadInput(f"--pp {pp} is more stages than {model.name}'s {model.num_blocks} blocks; lower --pp")
