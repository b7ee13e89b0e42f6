"""The plugin core: entry points, registries, validation, failures reported by name."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cpbench.errors import PluginError, UnknownNameError
from cpbench.plugin.manager import Plugins
from cpbench.plugin.registry import Registry

REPO = Path(__file__).resolve().parents[2]
BUILTINS = {"decomposer": {"cp-nls", "cp-als", "tucker2", "spatial-svd"},
            "backend": {"torch-cpu", "mkl", "channels-last", "torch-compile", "onnxruntime"},
            "model": {"conv", "charnet", "alexnet"}, "dataset": {"synthchars"}, "executor": {"local", "dask"}}


def make_dist(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """A real installed distribution (dist-info + modules) under ``root``, as pip would leave it."""
    root.mkdir(parents=True, exist_ok=True)
    for mod, code in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(code))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    eps = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[cpbench]\n{eps}")
    return root


GOOD = """
    from cpbench import hookimpl
    class Dec:
        name = "{name}"
        def decompose(self, weight, rank, *, seed=0, **o): ...
        def build(self, conv, f): ...
    @hookimpl
    def cpbench_register_decomposers(registry):
        registry.add(Dec())
"""


def test_builtins_are_registered_through_entry_points():
    p = Plugins()
    for kind, names in BUILTINS.items():
        assert names <= set(p.registries[kind].names()), kind
    info = p.info["cp-nls"]
    assert info.builtin and info.distribution == "cpbench" and info.error is None
    assert p.decomposers.plugin_of("cp-nls") == "cp-nls"


def test_third_party_entry_point_is_picked_up_and_can_be_disabled(tmp_path, monkeypatch):
    make_dist(tmp_path, "cpbench-thirdparty", {"thirdparty": "tp_plugin"}, {"tp_plugin": GOOD.format(name="tp-dec")})
    monkeypatch.syspath_prepend(str(tmp_path))
    p = Plugins()
    assert "tp-dec" in p.decomposers
    assert p.info["thirdparty"].distribution == "cpbench-thirdparty" and p.info["thirdparty"].version == "1.2.3"
    assert "cpbench-thirdparty 1.2.3" in p.versions()["thirdparty"]
    monkeypatch.setenv("CPBENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    p = Plugins()
    assert "tp-dec" not in p.decomposers and "cp-nls" in p.decomposers  # built-ins still load


def test_duplicate_name_is_refused_naming_both_plugins(tmp_path, monkeypatch):
    make_dist(tmp_path, "cpbench-dup", {"dup": "dup_plugin"}, {"dup_plugin": GOOD.format(name="cp-als")})
    monkeypatch.syspath_prepend(str(tmp_path))
    p = Plugins()
    err = p.info["dup"].error
    assert "'cp-als'" in err and "'cp-als'" in err and "'dup'" in err and "registered twice" in err
    assert p.decomposers.plugin_of("cp-als") == "cp-als"


def test_registry_duplicate_message_names_both():
    r = Registry("backend")

    class B:
        name = "x"

        def prepare(self, *a, **k): ...

    r.bound("first").add(B())
    with pytest.raises(PluginError, match="'first'.*'second'"):
        r.bound("second").add(B())


def test_misspelled_hook_is_an_error_not_silence(tmp_path, monkeypatch):
    code = GOOD.format(name="typo-dec").replace("def cpbench_register_decomposers", "def cpbench_register_decomposer")
    make_dist(tmp_path, "cpbench-typo", {"typo": "typo_plugin"}, {"typo_plugin": code})
    monkeypatch.syspath_prepend(str(tmp_path))
    p = Plugins()
    assert "unknown hook 'cpbench_register_decomposer'" in p.info["typo"].error
    assert "typo-dec" not in p.decomposers


def test_failing_import_is_reported_by_name_and_others_still_load(tmp_path, monkeypatch):
    make_dist(tmp_path, "cpbench-broken", {"broken": "broken_plugin", "fine": "fine_plugin"},
              {"broken_plugin": "raise RuntimeError('boom at import')", "fine_plugin": GOOD.format(name="fine-dec")})
    monkeypatch.syspath_prepend(str(tmp_path))
    p = Plugins()
    assert "boom at import" in p.info["broken"].error and "RuntimeError" in p.info["broken"].error
    assert "fine-dec" in p.decomposers and "cp-nls" in p.decomposers
    failed = [f.name for f in p.failures()]
    assert "broken" in failed and "fine" not in failed


def test_object_missing_contract_methods_is_refused():
    r = Registry("decomposer")

    class Half:
        name = "half"

    with pytest.raises(PluginError, match="without decompose, build"):
        r.add(Half())


def test_unknown_name_lists_available(monkeypatch):
    monkeypatch.setenv("CPBENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    p = Plugins()
    with pytest.raises(UnknownNameError) as e:
        p.decomposers.get("cp-nsl")
    assert "unknown decomposer 'cp-nsl'; available: cp-als, cp-epc, cp-nls" in str(e.value)


def test_cell_finished_and_add_commands_hooks(tmp_path, monkeypatch):
    code = """
        import argparse
        from cpbench import hookimpl
        SEEN = []
        @hookimpl
        def cpbench_cell_finished(result):
            SEEN.append(result["cell_key"])
        @hookimpl
        def cpbench_add_commands(subparsers):
            p = subparsers.add_parser("hello")
            p.set_defaults(func=lambda args: print("hello from a plugin") or 0)
    """
    make_dist(tmp_path, "cpbench-hooks", {"hooks": "hooks_plugin"}, {"hooks_plugin": code})
    monkeypatch.syspath_prepend(str(tmp_path))
    p = Plugins()
    p.hook.cpbench_cell_finished(result={"cell_key": "abc"})
    import hooks_plugin

    assert hooks_plugin.SEEN == ["abc"]
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    p.hook.cpbench_add_commands(subparsers=sub)
    args = parser.parse_args(["hello"])
    assert args.func(args) == 0


@pytest.mark.slow
def test_pip_installed_example_plugin_runs_in_a_matrix(tmp_path):
    """A real pip install of plugins/cpbench-example into a target dir, used by a subprocess."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO / "plugins" / "cpbench-example")], check=True,
                   capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-m", "cpbench.cli", "plugins", "--json"], env=env, check=True,
                         capture_output=True, text=True).stdout
    data = json.loads(out)
    assert data["registered"]["decomposer"]["channel-svd"] == "example"
    assert data["registered"]["backend"]["torch-jit"] == "example"
    ex = next(p for p in data["plugins"] if p["name"] == "example")
    assert ex["distribution"] == "cpbench-example" and ex["version"] == "0.1.0"
    matrix = tmp_path / "m.toml"
    matrix.write_text(textwrap.dedent("""
        [matrix]
        model = [{name = "conv", in_channels = 8, out_channels = 16, kernel_size = 3, input_size = 8, padding = 1}]
        decomposer = ["channel-svd"]
        rank = [4]
        backend = ["torch-jit"]
        [timing]
        budget_s = 0.2
        min_rounds = 5
        warmup = 1
        [run]
        per_layer_timing = false
    """))
    res = subprocess.run([sys.executable, "-m", "cpbench.cli", "run", "--matrix", str(matrix), "--out",
                          str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    row = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    assert row["status"] == "ok" and row["decomposer"] == "channel-svd" and row["backend"] == "torch-jit"
    assert "cpbench-example 0.1.0" in row["versions"]["plugins"]["example"]
