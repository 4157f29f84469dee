"""`sweep --executor dask`: the grid's cells on a dask.distributed cluster give the serial sweep's rows, row for
row and in grid order (infeasible cells included), through the Python API on a LocalCluster of worker processes
and through the CLI on an existing scheduler (--scheduler); and the flags that cannot apply, an unreachable
scheduler and a missing Dask are one line each."""
from __future__ import annotations

import io
import sys

import pandas as pd
import pytest
from cli_helpers import one_line, run

from planner.app import sweep as sweep_mod
from planner.app.sweep import sweep
from planner.core.errors import BadInput

# 3 models x 2 sequences on one DGX node; llama3-70b fits on no plan there (an "infeasible" row each)
GRID = dict(models=["tiny-llama-20m", "tiny-gpt-20m", "llama3-70b"], clusters="dgx-h100", nodes=1,
            seqs=[512, 1024], gbs=32, refine_partition=False, progress=False)
WALL_TIME = ["search_s"]  # the only column that differs between two runs of the same cell
ARGS = ["sweep", "--model", "tiny-llama-20m,llama3-70b", "--cluster", "dgx-h100", "--nodes", "1", "--seq", "512,1024",
        "--gbs", "32", "--no-refine"]


@pytest.fixture(scope="module")
def distributed():
    return pytest.importorskip("distributed")


def test_local_cluster_rows_equal_the_serial_rows(distributed):
    serial = sweep(**GRID)
    dask = sweep(**GRID, executor="dask", workers=2)
    assert list(serial.status) == ["ok", "ok", "ok", "ok", "infeasible", "infeasible"]
    assert serial.model.tolist() == ["tiny-llama-20m"] * 2 + ["tiny-gpt-20m"] * 2 + ["llama3-70b"] * 2
    pd.testing.assert_frame_equal(serial.drop(columns=WALL_TIME), dask.drop(columns=WALL_TIME))


def test_cli_on_an_existing_scheduler(distributed, capsys):
    _, serial, _ = run(capsys, *ARGS, "--format", "csv")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        rc, out, err = run(capsys, *ARGS, "--executor", "dask", "--scheduler", cluster.scheduler_address,
                           "--format", "csv")
    assert rc == 0, err
    assert err == ""  # no progress bar when stderr is not a terminal
    a, b = (pd.read_csv(io.StringIO(text)).drop(columns=WALL_TIME) for text in (serial, out))
    assert len(a) == 4 and set(a.status) == {"ok", "infeasible"}
    pd.testing.assert_frame_equal(a, b)


def test_unreachable_scheduler_is_one_line(distributed, capsys, monkeypatch):
    monkeypatch.setattr(sweep_mod, "CONNECT_TIMEOUT_S", 0.5)
    line = one_line(*run(capsys, *ARGS, "--executor", "dask", "--scheduler", "tcp://127.0.0.1:9")[::2])
    assert "tcp://127.0.0.1:9" in line and "dask scheduler" in line


def test_flags_that_cannot_apply(capsys):
    for extra, needle in [(["--workers", "2"], "--executor dask"),
                          (["--scheduler", "tcp://h:8786"], "--executor dask"),
                          (["--executor", "dask", "--workers", "2", "--scheduler", "tcp://h:8786"], "one of them"),
                          (["--executor", "dask", "--workers", "0"], "--workers 0"),
                          (["--executor", "dask", "--workers", "two"], "--workers"),
                          (["--executor", "ray"], "--executor")]:
        assert needle in one_line(*run(capsys, *ARGS, *extra)[::2])
    with pytest.raises(BadInput, match="unknown executor"):
        sweep(**GRID, executor="threads")


def test_without_dask_installed(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` now raises ImportError
    line = one_line(*run(capsys, *ARGS, "--executor", "dask")[::2])
    assert "pip install 'parallel-planner[dask]'" in line
