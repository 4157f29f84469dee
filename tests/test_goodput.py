"""Goodput under failures: Young/Daly interval, goodput falling with cluster size, the CLI flags."""
import math

import pytest

from planner.core.errors import BadInput
from planner.cost import goodput as gp


def test_daly_interval_maximises_goodput():
    delta, mtbf, restart = 120.0, 4 * 3600.0, 600.0
    tau = gp.optimal_interval_s(delta, mtbf)
    assert tau == pytest.approx(math.sqrt(2 * delta * mtbf) - delta)
    best = gp.goodput_fraction(tau, delta, restart, mtbf)
    for t in (tau / 3, tau * 3):  # a much shorter or longer interval loses goodput
        assert gp.goodput_fraction(t, delta, restart, mtbf) < best


def test_goodput_falls_with_cluster_size():
    rows = gp.scaling_table(1e5, 8, 1, 8_000_000_000, mtbf_hours=50_000, restart_s=600)
    fracs = [r.fraction for r in rows]
    assert all(a > b for a, b in zip(fracs, fracs[1:]))
    assert rows[-1].cluster_mtbf_s < rows[0].cluster_mtbf_s


def test_bad_mtbf_is_one_line():
    with pytest.raises(BadInput, match="--mtbf-hours"):
        gp.goodput(1.0, 8, 1, 10, mtbf_hours=0, restart_s=1)


def test_estimate_json_has_goodput(capsys):
    import json

    from planner.app.cli import main

    main(["estimate", "--model", "llama3-8b", "--cluster", "dgx-h100", "--mbs", "1", "--gbs", "8", "--seq", "4096",
          "--mtbf-hours", "50000", "--restart-s", "600", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert 0 < out["goodput"]["fraction"] < 1
    assert out["goodput"]["tokens_per_s"] == pytest.approx(out["tokens_per_s"] * out["goodput"]["fraction"])
