"""The ``dask`` executor on real LocalClusters (worker processes): same results as ``local``, one cell
per worker at a time, a worker killed mid-cell is retried and recorded once, per-cell timeouts."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("distributed")

import cpbench_testplugins  # noqa: E402  (tests/plugins/executors is on sys.path: pytest's rootdir-relative import)
from cpbench.errors import UsageError  # noqa: E402
from cpbench.run.matrix import parse_matrix  # noqa: E402
from cpbench.run.session import run_matrix  # noqa: E402
from cpbench.plugin.manager import get_plugins  # noqa: E402
from cpbench.run.results import read_results  # noqa: E402
from cpbench.run.cell import RunContext, clear_memo  # noqa: E402

HERE = Path(__file__).resolve().parent
CONV = {"name": "conv", "in_channels": 8, "out_channels": 8, "kernel_size": 3, "input_size": 8, "padding": 1}
# about executing cells, not timing them: timed in the cell's own process (processes = 0)
TIMING = {"budget_s": 0.2, "min_rounds": 5, "warmup": 1, "processes": 0}


def matrix(decomposers, ranks=(2, 4)):
    return parse_matrix({"run": {"per_layer_timing": False}, "timing": TIMING,
                         "matrix": {"model": [CONV], "decomposer": list(decomposers), "rank": list(ranks)}},
                        registries=get_plugins().registries)


def ctx(cache_dir):
    return RunContext(cache_dir=str(cache_dir), timing=TIMING, per_layer_timing=False)


def lines(out_dir):
    text = (Path(out_dir) / "results.jsonl").read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


pytestmark = pytest.mark.usefixtures("fresh_state")  # tests/conftest.py


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two worker processes with two threads each but one ``cpbench-slot``; the test plugin preloaded."""
    import dask
    from distributed import Client, LocalCluster

    marker = tmp_path_factory.mktemp("marker") / "crash-once"
    call_log = marker.parent / "calls.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("CPBENCH_TEST_CRASH_MARKER", str(marker))
        mp.setenv("CPBENCH_TEST_CALL_LOG", str(call_log))  # restarted workers get it too
        with dask.config.set({"distributed.scheduler.allowed-failures": 3}):
            lc = LocalCluster(n_workers=2, threads_per_worker=2, processes=True, resources={"cpbench-slot": 1},
                              preload=["cpbench_testplugins"], dashboard_address=None, silence_logs=40)
        client = Client(lc)
        client.wait_for_workers(2, timeout=120)
        client.close()
        lc.marker, lc.call_log = marker, call_log
        yield lc
        lc.close()


def test_same_results_as_local_one_cell_per_worker_at_a_time(cluster, tmp_path):
    """Same cells, same errors as ``local``; workers have 2 threads but one slot, so cells on the same
    worker never overlap in time."""
    from distributed import Client

    with Client(cluster) as c:
        c.wait_for_workers(2, timeout=120)  # a worker restarted by another test is back
    m = matrix(["cp-als", "spatial-svd"])
    local = run_matrix(m, tmp_path / "local", ctx=ctx(tmp_path / "cache-local"))
    clear_memo()
    cpbench_testplugins.install()  # the workers have it preloaded; the plugin sets must match
    dask = run_matrix(m, tmp_path / "dask", executor="dask", executor_options={"scheduler": cluster.scheduler_address},
                      ctx=ctx(tmp_path / "cache-dask"))
    assert (local.ok, dask.ok, dask.failed) == (4, 4, 0)
    a = {r["cell_key"]: r for r in lines(tmp_path / "local")}
    b = {r["cell_key"]: r for r in lines(tmp_path / "dask")}
    assert set(a) == set(b) == {c.key for c in m.cells()}
    by_worker = {}
    for key, row in b.items():
        assert row["status"] == "ok", row["error"]
        assert row["rel_error"] == pytest.approx(a[key]["rel_error"], rel=1e-9, abs=1e-12)
        assert row["decomposition_cached"] == {"conv": False}  # its own fresh cache: computed on a worker
        assert row["worker"].startswith("tcp://") and row["host"]
        assert "worker" not in a[key]
        by_worker.setdefault(row["worker"], []).append((row["started_at"], row["started_at"] + row["wall_seconds"]))
    assert len(by_worker) == 2  # both worker processes took cells
    for spans in by_worker.values():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end - 1e-3, spans


def test_plugin_set_must_match(cluster, tmp_path):
    # the client lacks the test plugin the workers have → refused before anything runs
    m = matrix(["spatial-svd"], ranks=(2,))
    with pytest.raises(UsageError, match="cpbench-testplugins"):
        run_matrix(m, tmp_path / "out", executor="dask", executor_options={"scheduler": cluster.scheduler_address},
                   ctx=ctx(tmp_path / "cache"))


def test_cell_function_must_pickle(tmp_path):
    from cpbench_builtins.executors.dask import DaskExecutor

    cells = matrix(["spatial-svd"], ranks=(2,)).cells()
    with pytest.raises(UsageError, match="does not pickle"):
        DaskExecutor().execute(cells, lambda cell, step=None: {}, lambda row: None, workers=1)
    with pytest.raises(UsageError, match="not both"):
        DaskExecutor().execute(cells, print, print, workers=1, scheduler="tcp://127.0.0.1:1")


def test_timeout_records_error_row(cluster, tmp_path):
    """A cell past ``cell_timeout_s`` is killed on its worker and recorded as an error row (that the
    run then goes on is checked for the same mechanism in tests/run/test_faults.py, local executor)."""
    cpbench_testplugins.install()
    m = matrix([{"name": "crashy-svd", "sleep_s": 600}], ranks=(2,))
    s = run_matrix(m, tmp_path / "out", executor="dask",
                   executor_options={"scheduler": cluster.scheduler_address, "cell_timeout_s": 4},
                   ctx=ctx(tmp_path / "cache"))
    (row,) = lines(tmp_path / "out")
    assert (s.ok, s.failed) == (0, 1)
    assert row["status"] == "error" and row["error"] == "timed out after 4 s"
    assert row["worker"].startswith("tcp://") and row["cell_key"] == m.cells()[0].key
    assert row["wall_seconds"] < 300  # the 600 s sleep was cut short


def test_worker_killed_mid_cell_is_retried_and_recorded_once(cluster, tmp_path):
    """The first process to decompose a crash=true cell dies (os._exit); Dask reruns the cell."""
    cpbench_testplugins.install()
    call_log = cluster.call_log
    call_log.write_text("")
    cluster.marker.write_text("armed")
    m = matrix([{"name": "crashy-svd", "crash": True}], ranks=(1, 2, 3))
    s = run_matrix(m, tmp_path / "out", executor="dask", executor_options={"scheduler": cluster.scheduler_address},
                   ctx=ctx(tmp_path / "cache"))
    assert not cluster.marker.exists()
    claimed = list(cluster.marker.parent.glob("crash-once.claimed-*"))
    assert len(claimed) == 1  # exactly one worker process died
    dead_pid = claimed[0].name.rsplit("-", 1)[1]
    rows = lines(tmp_path / "out")
    keys = [r["cell_key"] for r in rows]
    assert sorted(keys) == sorted(c.key for c in m.cells())  # every cell, each exactly once
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    calls = call_log.read_text().split()
    assert len(calls) == 4 and dead_pid in calls  # 3 cells + the one rerun after the crash
    assert s.ok == 3 and read_results(tmp_path / "out") == rows
