"""The command line as a user meets it: one-line errors, exit codes, and a run end to end."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cpbench.cli import main

TINY = """
[matrix]
model = [{name = "conv", in_channels = 8, out_channels = 16, kernel_size = 3, input_size = 8, padding = 1}]
decomposer = ["cp-als", "spatial-svd"]
rank = [%s]
[timing]
budget_s = 0.2
min_rounds = 5
warmup = 1
[run]
per_layer_timing = %s
"""


def tiny_matrix(tmp_path, ranks="4", per_layer="true"):
    p = tmp_path / "m.toml"
    p.write_text(TINY % (ranks, per_layer))
    return p


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("cpbench 0.")


def test_plugins_json(capsys):
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["registered"]["decomposer"]["cp-nls"] == "cp-nls"
    assert any(p["name"] == "cp-als" and p["distribution"] == "cpbench" for p in data["plugins"])


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_decompose_kernel_files(tmp_path, capsys, suffix):
    w = torch.randn(8, 4, 3, 3)
    path = tmp_path / f"k{suffix}"
    if suffix == ".npy":
        np.save(path, w.numpy())
    elif suffix == ".pt":
        torch.save({"weight": w}, path)
    else:
        from safetensors.torch import save_file

        save_file({"weight": w}, str(path))
    assert main(["decompose", str(path), "--method", "spatial-svd", "--rank", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "spatial-svd" and out["rank"] == 3 and 0 < out["rel_error"] < 1
    assert "seconds" in out and out["info"]["converged"] is True


def test_decompose_text_output_shortens_the_step_history(tmp_path, capsys):
    path = tmp_path / "k.npy"
    np.save(path, torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)).numpy())
    assert main(["decompose", str(path), "--rank", "3", "--json"]) == 0
    history = json.loads(capsys.readouterr().out)["info"]["rel_error_history"]
    assert len(history) > 8  # the full list is in --json
    assert main(["decompose", str(path), "--rank", "3"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "rel_error_history" in x)
    assert f"({len(history)} values; --json for all)" in line and str(history[-1]) in line
    assert str(history[len(history) // 2]) not in line


@pytest.mark.parametrize("argv, text", [
    (["decompose", "missing.npy", "--rank", "3"], "kernel file not found"),
    (["decompose", "{k}", "--rank", "0", "--method", "cp-als"], "out of range"),
    (["decompose", "{k}", "--rank", "3", "--method", "cp-nsl"], "unknown decomposer 'cp-nsl'; available:"),
    (["decompose", "{k}", "--rank", "abc"], "not allowed"),
    (["run", "--matrix", "nope.toml"], "matrix file not found"),
    (["run", "--matrix", "{bad}"], "not a TOML matrix file"),
    (["run", "--matrix", "no-such-shipped"], "shipped matrix"),
    (["compare"], "required"),
])
def test_user_mistakes_are_one_line_exit_2(tmp_path, capsys, argv, text):
    k = tmp_path / "k.npy"
    np.save(k, np.random.rand(4, 4, 3, 3))
    bad = tmp_path / "bad.toml"
    bad.write_text("[matrix")
    argv = [a.format(k=k, bad=bad) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert text in err and err.count("\n") == 1 and "Traceback" not in err


def test_nan_kernel_is_a_clean_error(tmp_path, capsys):
    w = np.random.rand(4, 4, 3, 3)
    w[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "k.npy", w)
    assert main(["decompose", str(tmp_path / "k.npy"), "--rank", "2", "--method", "cp-als"]) == 2
    assert "NaN" in capsys.readouterr().err


def test_no_traceback_from_a_real_process(tmp_path):
    res = subprocess.run([sys.executable, "-m", "cpbench.cli", "decompose", str(tmp_path / "x.pt"), "--rank", "2"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "kernel file not found" in res.stderr


def test_run_records_every_cell_and_resume_skips_them(tmp_path, capsys):
    m = tiny_matrix(tmp_path)
    out = tmp_path / "out"
    assert main(["run", "--matrix", str(m), "--out", str(out)]) == 0
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [r["decomposer"] for r in rows] == ["cp-als", "spatial-svd"]
    r = rows[1]
    for key in ("status", "error", "model", "layers", "decomposer", "rank", "backend", "threads", "batch",
                "finetune_epochs", "seed", "rel_error", "theoretical_speedup", "layer_theoretical_speedup",
                "baseline_ms", "compressed_ms", "speedup", "speedup_ci", "layer_speedup", "accuracy_base",
                "accuracy_decomposed", "accuracy_finetuned", "decompose_seconds", "finetune_seconds",
                "machine", "versions"):
        assert key in r, key
    assert r["status"] == "ok" and r["rank"] == {"conv": 4} and r["layers"] == ["conv"]
    lo, hi = r["speedup_ci"]
    assert lo <= r["speedup"] <= hi
    assert r["accuracy_base"] is None  # the conv model has no data set
    assert (out / "matrix.toml").read_text() == m.read_text()
    # a second run without --resume refuses to mix results
    assert main(["run", "--matrix", str(m), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["run", "--matrix", str(m), "--out", str(out), "--resume"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_failing_cell_is_recorded_run_goes_on_exit_1(tmp_path):
    """Through the API, which does not validate up front (the CLI would stop at the rank, exit 2)."""
    from cpbench.run.matrix import load_matrix
    from cpbench.run.session import run_matrix

    m = tiny_matrix(tmp_path, ranks="100000, 2", per_layer="false")
    out = tmp_path / "out"
    assert run_matrix(load_matrix(m), out).exit_code == 1
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    bad = [r for r in rows if r["status"] == "error"]
    assert len(bad) == 2 and all("out of range" in r["error"] and "'conv'" in r["error"] for r in bad)
    assert all(r["status"] == "ok" for r in rows if r["rank_spec"] == 2)


def test_executor_flags_go_to_the_executors_that_declare_them(tmp_path, capsys):
    """--scheduler/--workers: the executor plugin says whether they are its own (cli_options), not the CLI."""
    assert main(["run", "--matrix", "smoke", "--out", str(tmp_path / "r"), "--scheduler", "tcp://x:1"]) == 2
    err = capsys.readouterr().err
    assert "--scheduler is not an option of executor 'local'; executors that take it: dask" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["plugins", "decompose"])
def test_output_into_a_closed_pipe_stops_quietly(tmp_path, command):
    """`cpbench ... | head -0`: the reader is gone before cpbench writes; no traceback, exit 1 (plain prints and
    rich's tables alike)."""
    kernel = tmp_path / "k.npy"
    np.save(kernel, np.random.default_rng(0).standard_normal((8, 4, 3, 3)))
    argv = ["plugins"] if command == "plugins" else ["decompose", str(kernel), "--rank", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "cpbench", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before cpbench has imported, let alone written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1, err
    assert "Traceback" not in err and "BrokenPipe" not in err
