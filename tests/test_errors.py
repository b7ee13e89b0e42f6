"""The exception tree: classes decide what a caller gets (no message matching), exit codes per class."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cpbench import errors
from cpbench.cli import main
from cpbench.errors import (BackendError, CacheError, CpbenchError, PluginError, RankError, SolverInputError,
                            SolverMemoryError, UnknownNameError, UsageError, WeightError, with_context)


def test_every_error_is_documented_at_the_top_of_the_module_with_its_exit_code():
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, CpbenchError)
            line = next(line for line in errors.__doc__.splitlines() if f" {name} " in f"{line} ")
            assert str(obj.exit_code) in line, (name, line)


def test_exit_codes_by_class():
    assert {c.exit_code for c in (UsageError, UnknownNameError, RankError, SolverInputError, WeightError)} == {2}
    assert PluginError.exit_code == 3 and BackendError.exit_code == CacheError.exit_code == 1


def test_solver_errors_are_in_the_tree():
    from cpbench.decomposition.solvers import SolverInputError as FromSolvers, cp_als

    assert FromSolvers is SolverInputError and issubclass(SolverMemoryError, RankError)
    with pytest.raises(SolverMemoryError):
        cp_als(torch.randn(8, 8, 3, 3), 4, memory_budget_bytes=10)


def test_with_context_keeps_class_and_attributes_whatever_the_constructor():
    exc = UnknownNameError("decomposer", "nope", ["a", "b"])
    again = with_context(exc, "layer 'conv2'")
    assert type(again) is UnknownNameError and again.available == ["a", "b"] and again.name == "nope"
    assert str(again) == "layer 'conv2': unknown decomposer 'nope'; available: a, b"
    assert again.contexts == ("layer 'conv2'",)


def test_a_solvers_memory_refusal_is_a_rank_error_naming_layer_and_decomposer():
    from cpbench.decomposition import CPDecomposer
    from cpbench.nn.surgery import decompose_layer

    class Hungry(CPDecomposer):
        name = "hungry"

        def fit(self, tensor, rank, *, seed=0):
            raise SolverMemoryError("rank 4 needs ~9 GiB of working memory")

    with pytest.raises(RankError) as e:
        decompose_layer(nn.Conv2d(8, 8, 3), Hungry(), 4, name="c")
    assert str(e.value) == "layer 'c': hungry: rank 4 needs ~9 GiB of working memory"  # each context once
    assert type(e.value) is SolverMemoryError


def test_an_option_fit_does_not_take_is_a_usage_error_before_anything_runs():
    from cpbench.decomposition import CPDecomposer

    class Strict(CPDecomposer):
        name = "strict"

        def fit(self, tensor, rank, *, seed=0, tol=1e-6):
            raise AssertionError("fit must not run with an option it does not take")

    with pytest.raises(UsageError, match="strict: .*no_such_option"):
        Strict().decompose(nn.Conv2d(8, 8, 3).weight, 4, no_such_option=1)


def test_the_cli_exits_with_the_class_code(monkeypatch, capsys):
    import cpbench.cli.commands as cli

    def broken_plugins(args):
        raise PluginError("plugin 'x' is broken")

    monkeypatch.setattr(cli, "cmd_plugins", broken_plugins)
    assert main(["plugins"]) == 3
    assert capsys.readouterr().err.strip() == "cpbench: error: plugin 'x' is broken"
    assert main(["decompose", "no-such-file.npy", "--rank", "2"]) == 2
