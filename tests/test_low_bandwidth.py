"""DiLoCo / SparseLoCo data-parallel sync and pipeline activation compression (issue 23): the bytes by hand,
the 25 GbE must-show, both estimate paths agreeing, and the refusals."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from planner.catalog import load_cluster
from planner.core.errors import BadInput
from planner.core.plan import ParallelPlan, Workload
from planner.cost import step_terms
from planner.cost.batch import estimate_batch
from planner.cost.estimate import estimate
from planner.importers import load_model

CLUSTER_YAML = """name: dgx8-25gbe
source: "composed from the dgx-h100 node type; IEEE 802.3by 25GbE between the nodes"
provenance: derived
groups:
  - {node: dgx-h100, count: 8}
fabric: eth-25g
"""


@pytest.fixture(scope="module")
def dgx8_25gbe(tmp_path_factory):
    path = tmp_path_factory.mktemp("lowbw") / "dgx8-25gbe.yaml"
    path.write_text(CLUSTER_YAML)
    return str(path)


def test_pseudo_gradient_bytes_by_hand():
    # 1e9 parameters per device, fp32 pseudo-gradient, 8 replicas, top 3% every 50 steps: a ring all-reduce sends
    # 2 * 7/8 of the buffer per rank: 1.75 * 4e9 B = 7e9 B per sync; x 0.03 = 2.1e8 B; / 50 = 4.2e6 B per step
    assert step_terms.pseudo_gradient_bytes_per_step(1e9, 4, 8, 50, 0.03) == pytest.approx(4.2e6, rel=1e-12)
    # synchronous training: the whole gradient every step
    assert step_terms.pseudo_gradient_bytes_per_step(1e9, 4, 8, 1, 1.0) == pytest.approx(7e9, rel=1e-12)


def test_exposed_time_by_hand():
    dev = SimpleNamespace(memory_bandwidth_bytes_per_s=2e12, efficiency=SimpleNamespace(memory=0.5))
    # sync 3 s at R = 0.03 -> 0.09 s, fully exposed every 50 steps; the outer step streams 20 B and the
    # compressor 12 B per parameter: 1e9 * 32 B / 1e12 B/s = 0.032 s; (0.09 + 0.032) / 50 = 2.44 ms
    got = step_terms.low_bandwidth_exposed_s(3.0 * 0.03, 1.0, 50, 0.03, 1e9, dev)
    assert float(got) == pytest.approx(0.122 / 50, rel=1e-12)
    # the defaults hand the exposed time back unchanged, bit for bit
    assert float(step_terms.low_bandwidth_exposed_s(3.0, 1.2345678, 1, 1.0, 1e9, dev)) == 1.2345678


def test_diloco_on_25gbe_cuts_exposed_dp_20x(dgx8_25gbe):
    model, cluster = load_model("llama3-8b"), load_cluster(dgx8_25gbe)
    w = Workload(global_batch=512, seq_len=4096)
    base = estimate(model, cluster, w, ParallelPlan(tp=8, dp=8, mbs=1))
    low = estimate(model, cluster, w, ParallelPlan(tp=8, dp=8, mbs=1, local_steps=50, grad_compression=0.03))
    assert base.breakdown["dp_comm_exposed_s"] >= 20 * low.breakdown["dp_comm_exposed_s"] > 0
    assert low.tokens_per_s > base.tokens_per_s
    assert "every 50 step(s)" in low.why and "loss not modelled" in low.why
    assert "every 50" not in base.why


def test_act_compression_scales_p2p_bytes(dgx8_25gbe):
    model, cluster = load_model("llama3-8b"), load_cluster(dgx8_25gbe)
    w = Workload(global_batch=64, seq_len=4096)
    plans = [ParallelPlan(tp=8, pp=8, mbs=1, act_compression=r) for r in (1.0, 0.25)]
    full, quarter = (estimate(model, cluster, w, p) for p in plans)
    # one boundary leaves a node over 25 GbE: alpha + bytes / bw, so the bandwidth term shrinks 4x
    link = cluster.fabric
    nbytes = 1 * 4096 * model.layers[0].hidden * 2  # mbs x tokens x hidden x bf16
    items = w.global_batch  # 64 micro-batches, each crossing forward and back
    per = 2 * items * (link.latency_s + np.array([nbytes, nbytes / 4]) / link.bytes_per_s)
    assert full.breakdown["pp_comm_s"] == pytest.approx(per[0], rel=1e-9)
    assert quarter.breakdown["pp_comm_s"] == pytest.approx(per[1], rel=1e-9)
    assert "subspace compression" in quarter.why


def test_batch_agrees_with_estimate(dgx8_25gbe):
    model, cluster = load_model("llama3-8b"), load_cluster(dgx8_25gbe)
    w = Workload(global_batch=64, seq_len=2048)
    plans = [ParallelPlan(tp=8, dp=8, mbs=1, local_steps=h, grad_compression=r, overlap_grad_reduce=o)
             for h in (1, 4, 50) for r in (1.0, 0.03) for o in (False, True)]
    plans += [ParallelPlan(tp=8, pp=2, dp=4, mbs=1, act_compression=r, local_steps=h)
              for r in (1.0, 0.5, 0.1) for h in (1, 10)]
    plans += [ParallelPlan(tp=8, dp=8, mbs=1, zero=1)]
    out = estimate_batch(model, cluster, w, plans)
    for i, p in enumerate(plans):
        est = estimate(model, cluster, w, p)
        for k in ("step_time_s", "tokens_per_s", "mfu", "peak_memory_bytes"):
            assert out[k][i] == pytest.approx(getattr(est, k), rel=1e-9), (k, p)
        for k in ("dp_comm_exposed_s", "pp_comm_s"):
            assert out[k][i] == pytest.approx(est.breakdown[k], rel=1e-9, abs=1e-15), (k, p)


def test_plan_rules_refuse_bad_values():
    with pytest.raises(ValueError, match="zero 0"):
        ParallelPlan(dp=8, zero=1, local_steps=10)
    with pytest.raises(ValueError, match="zero 0"):
        ParallelPlan(dp=8, zero=3, grad_compression=0.5)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError):
            ParallelPlan(grad_compression=bad)
        with pytest.raises(ValueError):
            ParallelPlan(act_compression=bad)
    with pytest.raises(ValueError):
        ParallelPlan(local_steps=0)
    from planner.search.space import check_low_bandwidth

    with pytest.raises(BadInput, match="--grad-compression"):
        check_low_bandwidth(1, 0.0, 1.0)


def _cli(*argv):
    return subprocess.run([sys.executable, "-c", "import sys; from planner.app.cli import main; sys.exit(main())", *argv],
                          capture_output=True, text=True, timeout=120)


def test_cli_refusal_is_one_line(dgx8_25gbe):
    r = _cli("estimate", "--model", "tiny-gpt-20m", "--cluster", dgx8_25gbe, "--tp", "8", "--mbs", "1", "--gbs",
             "64", "--seq", "256", "--zero", "1", "--local-steps", "10")
    assert r.returncode == 2, r.stderr
    assert "zero 0" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
