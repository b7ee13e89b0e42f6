"""A run directory is owned by one run (two real processes), and an --out that cannot hold results is
one line and exit 2, before any work."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cpbench.cli import main
from cpbench.errors import RunDirectoryError
from cpbench.run.rundir import LOCK_FILE, RunLock, check_writable

MATRIX = textwrap.dedent("""
    [matrix]
    model = [{name = "conv", in_channels = 4, out_channels = 8, kernel_size = 3, input_size = 6, padding = 1}]
    decomposer = ["spatial-svd"]
    rank = [2]
    [timing]
    budget_s = 0.2
    min_rounds = 3
    warmup = 1
    [run]
    per_layer_timing = false
""")

HOLD = textwrap.dedent("""
    import sys, time
    from cpbench.run.rundir import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    if sys.argv[2] == "die":
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)   # dies holding the lock: the file stays behind
    time.sleep(120)
""")


def _hold(out: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_two_real_cpbench_runs_on_one_out_give_one_set_of_rows(tmp_path):
    """Both started together: exactly one runs, the other stops at once with exit 2 and one line naming
    the owner; no duplicated rows. (The owner's cell times for 5 s, longer than the start-up jitter.)"""
    m = tmp_path / "m.toml"
    m.write_text(MATRIX.replace("budget_s = 0.2", "budget_s = 5.0").replace("min_rounds = 3", "min_rounds = 3\ntarget_ci_rel = 0.0\nmax_rounds = 100000"))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cpbench.cli", "run", "--matrix", str(m), "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=240) + (p.returncode,) for p in procs]
    codes = sorted(rc for _, _, rc in results)
    assert codes == [0, 2], results
    winner = next(p for p, (_, _, rc) in zip(procs, results) if rc == 0)
    loser = [l for l in next(err for _, err, rc in results if rc == 2).splitlines() if l.strip()]
    assert len(loser) == 1 and f"in use by pid {winner.pid} on {socket.gethostname()}" in loser[0], loser
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_lock_left_by_a_killed_run_is_stale_and_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "die"], stdout=subprocess.PIPE, text=True)
    assert dead.stdout.readline().strip() == "locked"
    assert dead.wait() == -signal.SIGKILL
    assert (out / LOCK_FILE).exists()
    with RunLock(out) as lock:
        assert lock.stale_owner["pid"] == dead.pid
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists()


def test_lock_in_one_process_is_exclusive_and_reusable(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirectoryError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path) as again:
        assert again.stale_owner is None


def test_out_that_is_a_file_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "m.toml").write_text(MATRIX)
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["run", "--matrix", str(tmp_path / "m.toml"), "--out", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cpbench: error: --out {f} is a file, not a directory; give a directory (it is created if missing)"]


@pytest.mark.parametrize("where", ["/sys", "/sys/cpbench-out"])
def test_out_that_cannot_be_written_is_one_line_exit_2(tmp_path, capsys, where):
    """/sys refuses files and directories even to root (a chmod'ed directory would not stop root)."""
    if not os.path.isdir("/sys"):
        pytest.skip("no /sys")
    (tmp_path / "m.toml").write_text(MATRIX)
    assert main(["run", "--matrix", str(tmp_path / "m.toml"), "--out", where]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"cpbench: error: --out {where}: cannot ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_read_only_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(RunDirectoryError, match="cannot write there"):
            check_writable(ro)
    finally:
        ro.chmod(0o755)
