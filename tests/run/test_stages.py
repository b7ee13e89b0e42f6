"""The stages of a cell, each alone, on a one-layer ``conv`` model (no data set, nothing trained)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cpbench.plugin.manager import Plugins, hookimpl
from cpbench.plugin.contracts import Prepared
from cpbench.run import stages
from cpbench.run.cell import RunContext, clear_memo, run_cell
from cpbench.run.matrix import Cell
from cpbench.run.record import CellResult

CONV = {"name": "conv", "in_channels": 6, "out_channels": 8, "kernel_size": 3, "input_size": 8, "padding": 1}
TINY = {"warmup": 1, "min_rounds": 3, "max_rounds": 4, "budget_s": 0.05, "min_round_s": 0.0005}


def _cell(**kw) -> Cell:
    axes = dict(model=CONV, layers="auto", decomposer={"name": "spatial-svd"}, rank=2, backend="torch-cpu",
                threads=1, batch=2, finetune_epochs=0, seed=0)
    axes.update(kw)
    return Cell(**axes)


@pytest.fixture
def ctx(tmp_path):
    clear_memo()
    yield RunContext(cache_dir=str(tmp_path / "cache"), timing=TINY)
    clear_memo()


def test_base_resolves_layers_and_their_input_shapes(ctx, plugins):
    base = stages.build_base(_cell(), ctx, plugins)
    assert base.layers == ["conv"] and isinstance(base.convs["conv"], nn.Conv2d)
    assert base.input_shape == (6, 8, 8) and base.example.shape == (1, 6, 8, 8)
    assert base.layer_shapes == {"conv": (1, 6, 8, 8)}
    assert base.label.startswith("conv 6→8 3×3") and base.dataset is None


def test_compress_replaces_the_layer_and_the_decomposition_is_cached_on_disk(ctx, plugins):
    cell = _cell()
    base = stages.build_base(cell, ctx, plugins)
    dec = plugins.decomposers.get("spatial-svd")
    first = stages.compress(base, dec, cell, ctx)
    assert first.cached == {"conv": False} and first.ranks == {"conv": 2}
    assert first.model.conv is first.replacements["conv"] and base.model.conv is base.convs["conv"]
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        err = (first.model(x) - base.model(x)).norm() / base.model(x).norm()
    assert 0 < err < 1  # a rank-2 approximation: close, not exact
    clear_memo()  # a new process: the factorization comes from disk
    again = stages.compress(stages.build_base(cell, ctx, plugins), dec, cell, ctx)
    assert again.cached == {"conv": True} and again.decompose_seconds == {"conv": 0.0}
    assert again.factorizations["conv"].rel_error == first.factorizations["conv"].rel_error


def test_a_rank_table_must_name_exactly_the_layers():
    assert stages.layer_ranks({"conv": 3}, ["conv"]) == {"conv": 3}
    with pytest.raises(Exception, match="must name exactly the layers"):
        stages.layer_ranks({"conv2": 3}, ["conv"])


def test_without_a_data_set_nothing_is_evaluated_or_fine_tuned(ctx, plugins):
    cell = _cell(finetune_epochs=2)
    base = stages.build_base(cell, ctx, plugins)
    comp = stages.compress(base, plugins.decomposers.get("spatial-svd"), cell, ctx)
    assert stages.evaluate(base, comp, ctx, plugins) == stages.Evaluation(None, None)
    tuned = stages.fine_tune(base, comp, cell, ctx, plugins)
    assert tuned.model is comp.model and tuned.cached is None and tuned.finetune_seconds == 0.0


def test_flops_of_the_network_and_of_each_layer(ctx, plugins):
    cell = _cell()
    base = stages.build_base(cell, ctx, plugins)
    comp = stages.compress(base, plugins.decomposers.get("spatial-svd"), cell, ctx)
    flops = stages.count_flops_of(base, comp, comp.model)
    # 3×3 conv 6→8 against 3×1 (6→2) then 1×3 (2→8): 432 against 36 + 48 multiply-adds per pixel
    assert flops.baseline == 2 * 432 * 64 and flops.compressed == 2 * (36 + 48) * 64
    assert flops.theoretical_speedup == pytest.approx(432 / 84)
    assert flops.layer_theoretical_speedup == {"conv": pytest.approx(432 / 84)}


class _CountingBackend:
    """A backend that runs the model as it is and counts what the harness asked of it."""

    name = "counting"

    def __init__(self):
        self.prepared, self.closed = [], 0

    def prepare(self, model, example_input, *, threads):
        self.prepared.append((type(model).__name__, tuple(example_input.shape), threads))

        def close():
            self.closed += 1

        return Prepared(lambda x: model(x), {"n": len(self.prepared)}, close)


def test_measure_times_the_networks_then_each_layer_and_closes_every_preparation(ctx, plugins):
    cell = _cell(batch=3)
    base = stages.build_base(cell, ctx, plugins)
    comp = stages.compress(base, plugins.decomposers.get("spatial-svd"), cell, ctx)
    backend = _CountingBackend()
    m = stages.measure(base, comp, comp.model, cell, backend, ctx)
    shapes = [p[1] for p in backend.prepared]
    assert shapes == [(3, 6, 8, 8)] * 4 and backend.closed == 4  # 2 networks, then the layer and its block
    assert m.backend_info == {"baseline": {"n": 1}, "compressed": {"n": 2}}
    whole = m.intervals[stages.MODEL]
    assert all(p.rounds >= 3 for p in whole.processes) and whole.speedup > 0
    assert m.layers == ["conv"] and set(m.intervals) == {stages.MODEL, "conv"} and len(m.intervals["conv"].ci) == 2


# -- the cell: the row, its keys, and the plugins it uses ------------------------------------------
ROW_KEYS = {
    "cell_key", "model", "model_params", "layers", "decomposer", "decomposer_options", "rank_spec", "rank",
    "backend", "threads", "batch", "finetune_epochs", "seed", "axes", "status", "error", "host", "started_at",
    "wall_seconds", "versions", "machine", "model_label", "weights_from",
    "rel_error", "decompose_seconds", "layer_decompose_seconds", "decomposition_cached", "degeneracy",
    "decomposer_info", "accuracy_base", "accuracy_decomposed", "accuracy_finetuned", "finetune_seconds",
    "accuracy_base_finetuned", "baseline_flops", "compressed_flops", "theoretical_speedup",
    "layer_theoretical_speedup", "params_kept", "layer_params_kept", "allocator", "baseline_ms", "compressed_ms", "baseline_p90_ms",
    "compressed_p90_ms", "baseline_iqr_ms", "compressed_iqr_ms", "speedup", "speedup_ci", "speedup_half_width",
    "timing_flags", "timing_processes", "timing_mode", "noise", "timing_rounds", "calls_per_round", "backend_info",
    "thread_state", "layer_speedup", "layer_speedup_ci", "layer_timing_flags", "layer_process_speedups", "layer_info", "layers_skipped", "bn_folded", "fidelity",
}


def test_an_ok_row_has_every_key_and_reads_back_unchanged(ctx):
    row = run_cell(_cell(), ctx)
    assert row["status"] == "ok", row["error"]
    assert {k for k in row if not k.startswith("_")} == ROW_KEYS | {"timing_pass", "timing_passes"}
    assert row["layers"] == ["conv"] and row["rank"] == {"conv": 2} and row["accuracy_base"] is None
    assert row["weights_from"] == "init"  # no weights, no data set: the random initialisation
    assert row["finetune_seconds"] == 0.0 and row["speedup_ci"][0] <= row["speedup"] <= row["speedup_ci"][1]
    assert CellResult.from_row(row).to_row() == row
    # a 6→8 3×3 conv (432 weights + 8 biases) as rank-2 spatial SVD: 2·(6·3 + 8·3) + 8 = 92 parameters
    assert row["layer_params_kept"] == {"conv": pytest.approx(92 / 440)} and row["params_kept"] == pytest.approx(92 / 440)


def test_an_error_row_holds_the_stages_that_finished(ctx):
    row = run_cell(_cell(rank=999), ctx)  # beyond what a 6→8 3×3 kernel allows
    assert row["status"] == "error" and "rank" in row["error"]
    # the base was built; the one layer cannot take the rank, so it is left alone and nothing decomposed
    assert row["layers"] == [] and "out of range" in row["layers_skipped"]["conv"]
    assert row["model_label"].startswith("conv") and row["error"].startswith("no layer to decompose: conv:")
    assert "speedup" not in row and "rel_error" not in row and "traceback" not in row


def test_an_unexpected_exception_keeps_its_traceback(ctx, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kaput")

    monkeypatch.setattr(stages, "count_flops_of", boom)
    row = run_cell(_cell(), ctx)
    assert row["status"] == "error" and row["error"] == "RuntimeError: kaput"
    assert "kaput" in row["traceback"] and row["rel_error"]["conv"] > 0  # compress had finished


def test_run_cell_uses_the_plugins_it_is_given(ctx):
    class Identity:
        name = "identity-backend"

        def prepare(self, model, example_input, *, threads):
            return Prepared(lambda x: model(x))

    class Plugin:
        @hookimpl
        def cpbench_register_backends(self, registry):
            registry.add(Identity())

    mine = Plugins(extra={"mine": Plugin()})
    row = run_cell(_cell(backend="identity-backend"), ctx, plugins=mine)
    assert row["status"] == "ok", row["error"]
    assert row["versions"]["plugins"]["mine"] == "-"
    assert run_cell(_cell(backend="identity-backend"), ctx)["status"] == "error"  # unknown to the default set


def test_run_matrix_hands_its_plugins_to_every_cell(tmp_path):
    from cpbench.run.matrix import parse_matrix
    from cpbench.run.session import run_matrix

    class Plugin:
        @hookimpl
        def cpbench_register_backends(self, registry):
            registry.add(_CountingBackend())

    mine = Plugins(extra={"mine": Plugin()})
    m = parse_matrix({"matrix": {"model": [CONV], "decomposer": ["spatial-svd"], "rank": [2],
                                 "backend": ["counting"]}, "timing": TINY})
    summary = run_matrix(m, tmp_path / "run", plugins=mine,
                         ctx=RunContext(cache_dir=str(tmp_path / "cache"), timing=TINY))
    assert summary.ok == 1, summary.rows[0]["error"]


def test_an_accuracy_is_cached_on_disk_by_weights_and_test_data(ctx, monkeypatch):
    # a second run (a fresh process: the memo cleared) reads the accuracy back instead of evaluating;
    # other weights, or another test split, are evaluated afresh
    from cpbench.plugin.manager import get_plugins
    from cpbench.nn import training

    plugins = get_plugins()
    net = nn.Sequential(nn.Flatten(), nn.Linear(24 * 24, 36))
    first = stages.accuracy(net, plugins, "synthchars", ctx, memo_key="a")
    clear_memo()
    calls = []
    real = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda m, d, **kw: calls.append(1) or real(m, d, **kw))
    assert stages.accuracy(net, plugins, "synthchars", ctx, memo_key="b") == first and calls == []
    with torch.no_grad():
        net[1].bias.add_(1.0)
    stages.accuracy(net, plugins, "synthchars", ctx, memo_key="c")
    assert calls == [1]


def test_an_evaluation_digest_lives_only_as_long_as_its_tensor():
    # keyed by the tensor itself (weakly), never by an address a later tensor can reuse
    import gc

    t = torch.arange(6.0)
    d = stages._content(t)
    assert stages._content(t) == d and stages._DIGESTS[id(t)][0]() is t
    n = len(stages._DIGESTS)
    del t
    gc.collect()
    assert len(stages._DIGESTS) == n - 1
    assert stages._content(torch.arange(6.0) + 1) != d
