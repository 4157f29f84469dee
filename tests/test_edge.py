"""Edge: sub-models over phones and the CPU/GPU split inside each (planner/planners/edge.py)."""
from __future__ import annotations

import itertools

import pytest

from planner.catalog import load_cluster
from planner.core.builders import TransformerConfig, build_transformer
from planner.core.plan import Workload
from planner.planners.edge import Sublayer, phones_of, plan_edge, solve_split, split_time_s

LLAMA_3B = TransformerConfig(name="llama3.2-3b-like", source="Llama 3.2 3B config.json shape (test)", layers=28,
                             hidden=3072, heads=24, kv_heads=8, ffn_hidden=8192, vocab=128256, tied_embeddings=True)


def test_phone_pool_is_shared():
    c = load_cluster("phones-snapdragon-wifi6")
    ph = phones_of(c)
    assert len(ph) == 8
    assert ph[0].memory_bytes == 24e9  # one LPDDR pool, not CPU + GPU


@pytest.mark.parametrize("cpu,gpu,floor,sync", [(8.0, 1.0, 0.0, 0.01), (3.0, 2.0, 0.5, 0.2), (1.0, 1.0, 0.0, 5.0)])
def test_split_equals_brute_force(cpu, gpu, floor, sync):
    subs = [Sublayer("attention", 8, 3, cpu, gpu, floor, sync), Sublayer("mlp", 16, 3, 2 * cpu, 2 * gpu, floor, sync)]
    best = min(split_time_s(subs, {"attention": a, "mlp": b}) for a, b in itertools.product(range(9), range(17)))
    assert solve_split(subs).time_s == pytest.approx(best, rel=1e-9)


def test_phones_must_show():
    """A 3B Llama-style model fine-tuned on 8 phones: every phone fits, and CPU+GPU beats either alone."""
    model = build_transformer(LLAMA_3B)
    c = load_cluster("phones-snapdragon-wifi6")
    p = plan_edge(model, c, Workload(global_batch=8, seq_len=512, dtype="fp16"), phones=8)
    assert p.fits
    assert all(m <= cap for m, cap in zip(p.memory_bytes, p.capacity_bytes))
    assert sum(hi - lo for lo, hi in p.ranges) == 28
    # one phone alone could not hold the model's states (16 bytes per parameter)
    assert 16 * model.params > p.capacity_bytes[0]
    assert p.one_phone["both"] < p.one_phone["gpu"] < p.one_phone["cpu"]
    assert 0 < p.split.gpu_units["attention"] < 24


def test_phone_count_chosen():
    """Without a phone count: the fastest that fits; a model that fits one phone stays on one (no Wi-Fi)."""
    from planner.importers import load_model

    c = load_cluster("phones-snapdragon-wifi6")
    p = plan_edge(load_model("tiny-llama-20m"), c, Workload(global_batch=8, seq_len=512, dtype="fp16"))
    assert p.fits and len(p.ranges) == 1
    big = plan_edge(build_transformer(LLAMA_3B), c, Workload(global_batch=8, seq_len=512, dtype="fp16"))
    assert big.fits and len(big.ranges) >= 2
