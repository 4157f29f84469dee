"""Record the golden regression suite that tests/test_golden.py replays (issue 17, "Rules": behaviour does not
move through the cost-model restructuring).

    python benchmarks/record_golden.py --out tests/golden [--reference-dir ../shared/reference]

Every case is a command line of the planner run in this process (planner.app.cli.main, the console script's
entry point) with --json, so the suite pins what a user sees, not an internal function that the
restructuring may move: `plan` (dense, MoE, long context, mixed devices, NIC islands, phones), `estimate`
of plan files covering every schedule, context-parallel exchange, ZeRO stage, offload, recompute policy,
sequence parallelism, sequence chunks and MoE dispatch, `simulate`, and `backtest` of the two published-run
tables (copied into --out so a clean clone has them). Each golden file holds its cases' specs and results,
so the test recomputes from the file alone.

Record from the commit that defines the behaviour, with its tree first on the path; from the checkout root:
    repo=$(pwd) base=$(mktemp -d)/golden-base
    git worktree add "$base" <commit>
    (cd "$base" && PYTHONPATH="$base" python "$repo/benchmarks/record_golden.py" --out "$repo/tests/golden")
    git worktree remove "$base"
The script prints which planner it imported; check it is the tree you meant.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Keys whose values are not behaviour: the search's own run time. Dropped wherever they appear.
IGNORED_KEYS = frozenset({"wall_s", "request"})  # request: the echo of the command line (paths of the run)

# Placeholders in a case's argv: the plan file written from the case's "plan_file", and the folder of the
# golden files (the backtest tables live there).
PLAN_PH, GOLDEN_PH = "{plan}", "{golden}"

# Published-run tables whose whole backtest is recorded (../shared/reference; copied next to the golden files).
RUN_TABLES = ("calibration_runs_clean.csv", "vtrain_single_node.csv")


# ---------------------------------------------------------------------------------------------------
# the cases


def _pf(model: str, cluster: str, nodes: int | None, workload: dict, plan: dict) -> dict:
    """A plan file (the format `plan --save` writes; no estimate, so `estimate --plan` computes it)."""
    return {"schema_version": 1, "model": model, "cluster": cluster, "nodes": nodes, "workload": workload,
            "plan": plan}


def _wl(gbs: int, seq: int, **extra) -> dict:
    return {"global_batch": gbs, "seq_len": seq, **extra}


def _est(name: str, pf: dict) -> dict:
    return {"name": name, "argv": ["estimate", "--plan", PLAN_PH, "--json"], "plan_file": pf}


def _sim(name: str, pf: dict) -> dict:
    return {"name": name, "argv": ["simulate", PLAN_PH, "--json"], "plan_file": pf}


def _plan(name: str, *args: str) -> dict:
    return {"name": name, "argv": ["plan", *args, "--top", "3", "--json"]}


def plan_cases() -> list[dict]:
    return [
        _plan("dense-llama3-8b-1node", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "1",
              "--gbs", "32", "--seq", "8192"),
        _plan("dense-llama3-8b-4nodes", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "4",
              "--gbs", "256", "--seq", "8192"),
        _plan("moe-mixtral-8x7b-4nodes", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--nodes", "4",
              "--gbs", "256", "--seq", "4096"),
        # the full DeepSeek-V3 search takes minutes on 2 cores; tp and pp fixed keep the DeepEP choice in it
        _plan("moe-deepseek-v3-128nodes-fp8", "--model", "deepseek-v3", "--cluster", "dgx-h100", "--nodes", "128",
              "--gbs", "8192", "--seq", "4096", "--dtype", "fp8", "--tp", "1", "--pp", "32", "--zero", "1"),
        _plan("longctx-llama3-8b-seq131072", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "1",
              "--gbs", "8", "--seq", "131072", "--seq-chunks", "1,2,4", "--max-pp", "4"),
        _plan("mixed-a100-h100", "--model", "llama3-8b", "--cluster", "mixed-a100-h100", "--gbs", "64",
              "--seq", "4096"),
        _plan("islands-two-pods-25gbe", "--model", "llama3-8b", "--cluster", "two-pods-25gbe", "--gbs", "64",
              "--seq", "4096"),
        _plan("phones-snapdragon-wifi6", "--model", "llama3.2-3b", "--cluster", "phones-snapdragon-wifi6",
              "--gbs", "8", "--seq", "512"),
    ]


def estimate_cases() -> list[dict]:
    cases = []
    wl8b = _wl(32, 4096)
    # every schedule, dense (llama3-8b, 8 H100) and MoE (mixtral-8x7b, 16 H100)
    for sched in ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1"):
        vpp = 2 if sched == "interleaved-1f1b" else 1
        cases.append(_est(f"schedule-{sched}-dense", _pf("llama3-8b", "dgx-h100", 1, wl8b, dict(
            tp=2, pp=4, dp=1, vpp=vpp, sp=True, mbs=1, schedule=sched))))
        cases.append(_est(f"schedule-{sched}-moe", _pf("mixtral-8x7b", "dgx-h100", 2, _wl(32, 4096), dict(
            tp=2, pp=2, dp=4, vpp=vpp, ep=4, sp=True, mbs=1, zero=1, schedule=sched))))
    # context parallelism: ring and all-to-all (Ulysses), inside a node and across nodes
    for comm in ("ring", "a2a"):
        cases.append(_est(f"cp-{comm}-in-node", _pf("llama3-8b", "dgx-h100", 1, _wl(8, 32768), dict(
            tp=2, cp=4, dp=1, sp=True, mbs=1, cp_comm=comm))))
        cases.append(_est(f"cp-{comm}-cross-node", _pf("llama3-8b", "dgx-h100", 2, _wl(8, 65536), dict(
            tp=2, cp=8, dp=1, sp=True, mbs=1, cp_comm=comm, recompute="selective"))))
    # ZeRO stages, grads reduced after the backward and overlapped with it
    for zero in (0, 1, 2, 3):
        for overlap in (False, True):
            cases.append(_est(f"zero{zero}-overlap-{overlap}", _pf("llama3-8b", "dgx-h100", 2, _wl(64, 4096), dict(
                dp=16, mbs=1, zero=zero, overlap_grad_reduce=overlap))))
    # offload: optimizer states, activations, both
    for name, off, zero in (("optimizer-all", {"optimizer": 1.0}, 1),
                            ("optimizer-half-zero3", {"optimizer": 0.5}, 3),
                            ("activations-half", {"activations": 0.5}, 1),
                            ("both", {"optimizer": 1.0, "activations": 1.0}, 2)):
        cases.append(_est(f"offload-{name}", _pf("llama3-8b", "dgx-h100", 1, _wl(16, 8192), dict(
            tp=2, dp=4, sp=True, mbs=2, zero=zero, offload=off))))
    # recompute policies on a 70B pipeline, and Megatron's partial (block) recompute
    for name, extra in (("none", {}), ("selective", {"recompute": "selective"}), ("full", {"recompute": "full"}),
                        ("full-2-layers", {"recompute": "full", "recompute_num_layers": 2})):
        cases.append(_est(f"recompute-{name}-llama3-70b", _pf("llama3-70b", "dgx-h100", 4, _wl(32, 8192), dict(
            tp=8, pp=4, dp=1, sp=True, mbs=1, zero=1, **extra))))
    # sequence parallelism on and off, tensor-parallel comm overlap, unfused attention
    for sp in (False, True):
        cases.append(_est(f"sp-{sp}-tp4", _pf("llama3-8b", "dgx-h100", 1, _wl(16, 8192), dict(
            tp=4, dp=2, sp=sp, mbs=1))))
    cases.append(_est("overlap-tp-comm-tp8", _pf("llama3-8b", "dgx-h100", 1, _wl(16, 8192), dict(
        tp=8, dp=1, sp=True, mbs=1, overlap_tp_comm=True))))
    cases.append(_est("unfused-attention", _pf("llama3-8b", "dgx-h100", 1, _wl(32, 2048), dict(
        tp=2, dp=4, mbs=1, flash_attention=False))))
    # sequence chunks (1f1b and gpipe) at 128K tokens
    for sched, chunks in (("1f1b", 4), ("gpipe", 2)):
        cases.append(_est(f"seq-chunks-{chunks}-{sched}", _pf("llama3-8b", "dgx-h100", 1, _wl(8, 131072), dict(
            tp=2, pp=4, dp=1, sp=True, mbs=1, recompute="full", schedule=sched, seq_chunks=chunks))))
    # variable-length documents, with and without the attention pool
    for pool in (False, True):
        cases.append(_est(f"documents-pool-{pool}", _pf("llama3-8b", "dgx-h100", 8, _wl(
            64, 131072, documents={"mean_tokens": 16384, "max_tokens": 131072}), dict(
            tp=8, cp=8, dp=1, sp=True, mbs=1, recompute="full", attention_pool=pool))))
    # MoE token exchange: all-to-all, Pipeline MoE's tp_slice, DeepEP (and its all-to-all twin), expert tp,
    # capacity factor and routing imbalance
    cases.append(_est("moe-a2a-ep8", _pf("mixtral-8x7b", "dgx-h100", 2, _wl(64, 4096), dict(
        dp=16, ep=8, mbs=1, zero=1, moe_dispatch="a2a"))))
    cases.append(_est("moe-tp-slice", _pf("mixtral-8x7b", "dgx-h100", 2, _wl(64, 4096), dict(
        tp=2, dp=8, ep=2, etp=1, mbs=1, zero=1, moe_dispatch="tp_slice"))))
    cases.append(_est("moe-etp1-tp2-ep4", _pf("mixtral-8x7b", "dgx-h100", 2, _wl(64, 4096), dict(
        tp=2, dp=8, ep=4, etp=1, sp=True, mbs=1, zero=1))))
    cases.append(_est("moe-capacity-imbalance", _pf("mixtral-8x7b", "dgx-h100", 2, _wl(
        64, 4096, moe_capacity_factor=1.25, moe_imbalance=1.3), dict(dp=16, ep=8, mbs=1, zero=1))))
    for dispatch in ("a2a", "deepep"):
        cases.append(_est(f"moe-{dispatch}-qwen3-30b-a3b-4nodes", _pf("qwen3-30b-a3b", "dgx-h100", 4, _wl(
            256, 4096), dict(dp=32, ep=16, mbs=1, zero=1, moe_dispatch=dispatch))))
        cases.append(_est(f"moe-{dispatch}-deepseek-v3-128nodes", _pf("deepseek-v3", "dgx-h100", 128, _wl(
            8192, 4096, dtype="fp8"), dict(tp=1, pp=32, cp=4, dp=8, ep=16, mbs=1, zero=1, moe_dispatch=dispatch))))
    # precisions, gradient dtype, optimizers
    for dtype in ("fp8", "fp16", "fp32"):
        cases.append(_est(f"dtype-{dtype}", _pf("llama3-8b", "dgx-h100", 1, _wl(32, 4096, dtype=dtype), dict(
            tp=2, dp=4, sp=True, mbs=1, zero=1))))
    cases.append(_est("grad-bf16-sgd", _pf("llama3-8b", "dgx-h100", 1, _wl(
        32, 4096, grad_dtype="bf16", optimizer="sgd"), dict(tp=2, dp=4, sp=True, mbs=1, zero=1))))
    cases.append(_est("explicit-microbatches", _pf("llama3-8b", "dgx-h100", 1, _wl(32, 4096), dict(
        tp=2, pp=2, dp=2, sp=True, mbs=2, num_microbatches=8))))
    # an uneven stage partition
    cases.append(_est("uneven-partition", _pf("llama3-8b", "dgx-h100", 1, _wl(32, 4096), dict(
        tp=2, pp=2, dp=2, sp=True, mbs=1, partition=[{"layers": [0, 14]}, {"layers": [14, 32]}]))))
    # mixed devices (stages on their own device type), NIC islands
    cases.append(_est("mixed-a100-h100-stages", _pf("llama3-8b", "mixed-a100-h100", None, _wl(64, 4096), dict(
        tp=8, pp=2, dp=2, sp=True, mbs=1, zero=1, partition=[{"layers": [0, 12], "device_type": "a100-sxm-80gb"},
                                                             {"layers": [12, 32], "device_type": "h100-sxm-80gb"}]))))
    cases.append(_est("mixed-a100-h100-plain", _pf("llama3-8b", "mixed-a100-h100", None, _wl(64, 4096), dict(
        tp=2, pp=2, dp=8, sp=True, mbs=1, zero=1))))
    cases.append(_est("islands-pp2-zb-h1", _pf("llama3-8b", "two-pods-25gbe", None, _wl(64, 4096), dict(
        pp=2, dp=32, mbs=1, zero=1, schedule="zb-h1"))))
    cases.append(_est("islands-dp64", _pf("llama3-8b", "two-pods-25gbe", None, _wl(64, 4096), dict(
        dp=64, mbs=1, zero=2))))
    # other hardware and a large dense model
    cases.append(_est("gpt3-175b-a100-interleaved", _pf("gpt3-175b", "dgx-a100-80gb", 16, _wl(256, 2048), dict(
        tp=8, pp=8, dp=2, vpp=3, sp=True, mbs=1, zero=1, recompute="selective", schedule="interleaved-1f1b"))))
    cases.append(_est("llama3-8b-frontier", _pf("llama3-8b", "frontier", 2, _wl(32, 4096), dict(
        tp=2, dp=8, sp=True, mbs=1, zero=1))))
    # the flags path of `estimate` (dp derived from the devices; tp_slice sets ep = tp, etp = 1)
    cases.append({"name": "flags-readme-seq-chunks", "argv": [
        "estimate", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "1", "--tp", "2", "--pp", "4",
        "--sp", "--recompute", "full", "--mbs", "1", "--gbs", "8", "--seq", "131072", "--schedule", "1f1b",
        "--seq-chunks", "4", "--json"]})
    cases.append({"name": "flags-tp-slice", "argv": [
        "estimate", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--nodes", "2", "--tp", "2", "--mbs", "1",
        "--gbs", "64", "--seq", "4096", "--zero", "1", "--moe-dispatch", "tp_slice", "--json"]})
    cases.append({"name": "flags-offload-activations-vpp", "argv": [
        "estimate", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "1", "--tp", "2", "--pp", "2",
        "--vpp", "2", "--mbs", "1", "--gbs", "32", "--seq", "8192", "--offload-activations", "0.75", "--json"]})
    return cases


def simulate_cases() -> list[dict]:
    return [
        _sim("interleaved-llama3-8b", _pf("llama3-8b", "dgx-h100", 1, _wl(16, 4096), dict(
            tp=2, pp=2, dp=2, vpp=2, sp=True, mbs=1, schedule="interleaved-1f1b"))),
        _sim("zb-h1-mixtral", _pf("mixtral-8x7b", "dgx-h100", 2, _wl(16, 4096), dict(
            tp=2, pp=2, dp=4, ep=4, sp=True, mbs=1, zero=1, schedule="zb-h1"))),
        _sim("seq-chunks-1f1b-131072", _pf("llama3-8b", "dgx-h100", 1, _wl(8, 131072), dict(
            tp=2, pp=4, dp=1, sp=True, mbs=1, recompute="full", schedule="1f1b", seq_chunks=4))),
    ]


def backtest_cases() -> list[dict]:
    return [{"name": Path(t).stem, "argv": ["backtest", "--runs", f"{GOLDEN_PH}/{t}", "--json"]} for t in RUN_TABLES]


# file name -> cases; one golden JSON per group
GROUPS = {"plan": plan_cases, "estimate": estimate_cases, "simulate": simulate_cases, "backtest": backtest_cases}


# ---------------------------------------------------------------------------------------------------
# running a case (the test calls this too)


def strip_ignored(obj):
    """obj without the keys in IGNORED_KEYS, at any depth."""
    if isinstance(obj, dict):
        return {k: strip_ignored(v) for k, v in obj.items() if k not in IGNORED_KEYS}
    if isinstance(obj, list):
        return [strip_ignored(v) for v in obj]
    return obj


def run_case(case: dict, golden_dir: Path) -> dict:
    """The JSON a case's command prints, parsed, without the ignored keys. RuntimeError (with the planner's
    one-line error) when the command fails."""
    from planner.app.cli import main

    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        plan_path = Path(tmp) / "plan.json"
        if "plan_file" in case:  # a private scratch file, not a user's: a plain write is enough
            plan_path.write_text(json.dumps(case["plan_file"], indent=2) + "\n")
        argv = [a.replace(PLAN_PH, str(plan_path)).replace(GOLDEN_PH, str(golden_dir)) for a in case["argv"]]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"case {case['name']}: `planner {' '.join(case['argv'])}` exited {rc}: "
                           f"{err.getvalue().strip()}")
    return strip_ignored(json.loads(out.getvalue()))


def _check_no_paths(name: str, obj, roots: tuple[str, ...]) -> None:
    """Refuse a result that carries an absolute path of this machine (it would not replay elsewhere)."""
    text = json.dumps(obj)
    for root in roots:
        if root in text:
            raise SystemExit(f"case {name}: its output contains the path {root}; add the key to IGNORED_KEYS")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder of the golden files (tests/golden)")
    ap.add_argument("--reference-dir", default=str(REPO_ROOT.parent / "shared" / "reference"),
                    help="where the published-run tables are (default ../shared/reference)")
    args = ap.parse_args(argv)

    import planner
    from planner.files import write_atomic

    tree = Path(planner.__file__).resolve().parent.parent
    print(f"planner imported from {tree / 'planner'}")
    ref = Path(args.reference_dir)
    missing = [t for t in RUN_TABLES if not (ref / t).is_file()]
    if missing:
        raise SystemExit(f"--reference-dir {ref}: no {', '.join(missing)}; give the folder of the published-run "
                         "tables (../shared/reference)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for t in RUN_TABLES:
        write_atomic(out / t, (ref / t).read_bytes())
    # provenance: the commit of the planner tree that produced the numbers (plus "+dirty" for local edits)
    git = ["git", "-C", str(tree)]
    try:
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        if subprocess.run(git + ["status", "--porcelain", "--", "planner", "hardware_profiles", "models"],
                          capture_output=True, text=True, check=True).stdout.strip():
            commit += "+dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    print(f"recording at commit {commit}")
    roots = (str(out), str(Path(planner.__file__).resolve().parent.parent), tempfile.gettempdir() + "/golden-")
    for group, make in GROUPS.items():
        records = []
        for case in make():
            t0 = time.perf_counter()
            result = run_case(case, out)
            _check_no_paths(case["name"], result, roots)
            print(f"  {group}/{case['name']}: {time.perf_counter() - t0:.2f} s")
            records.append({**case, "result": result})
        write_atomic(out / f"{group}.json", json.dumps(
            {"recorded_with": "benchmarks/record_golden.py", "commit": commit, "cases": records}, indent=1) + "\n")
        print(f"{group}: {len(records)} cases -> {out / (group + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
