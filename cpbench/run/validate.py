"""Every mistake in a matrix, found before any work starts.

:func:`validate_matrix` looks at every cell the way :func:`cpbench.run.cell.run_cell` (its stages, :mod:`cpbench.run.stages`) will, without
training, decomposing or timing anything: it builds each model's architecture once (untrained),
finds the layers a cell names (or ``"auto"`` picks), their kernel shapes and input sizes, and runs
the checks of :data:`CELL_CHECKS` on each cell. The first problem is raised as one
:class:`~cpbench.errors.MatrixError` line naming the cell; what is probably a mistake but may be
meant (fine-tuning asked for a model without data) comes back as warnings.

Only failures that depend on the computation itself (a solver that diverges, a backend that cannot
run the model, an ``"error:E"`` budget) are left to the cells, as error rows.

A check is a function of a :class:`CellView` that raises a :class:`~cpbench.errors.UsageError`
saying what is wrong and what is allowed; append to :data:`CELL_CHECKS` (or pass ``checks=``) to add
one, e.g. whether a ``"speedup:X"`` spec is reachable on a layer.
"""
from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CpbenchError, MatrixError, RankError, UsageError
from ..nn.layers import ConvGeometry, geometry
from .matrix import Cell, Matrix

__all__ = ["LayerView", "CellView", "CellCheck", "CELL_CHECKS", "validate_matrix", "accepted_options",
           "check_ranks", "check_options"]


@dataclass(frozen=True)
class LayerView:
    """One layer a cell decomposes, as the cell will see it."""

    name: str
    weight_shape: tuple[int, int, int, int]
    geometry: ConvGeometry
    in_hw: tuple[int, int]


@dataclass(frozen=True)
class CellView:
    """A cell with its plugins looked up and its layers resolved."""

    cell: Cell
    model_plugin: Any
    decomposer: Any
    options: dict            # the decomposer's options from the matrix
    layers: dict[str, LayerView]
    ranks: dict[str, Any]    # the rank spec of each layer


CellCheck = Callable[[CellView], None]


# -- checks -----------------------------------------------------------------------------------
def check_ranks(view: CellView) -> None:
    """Integer ranks and pairs within each layer's maximum; specs the decomposer can resolve."""
    from ..decomposition.ranks import max_rank_for, parse_rank

    dec = view.decomposer
    for name, spec in view.ranks.items():
        layer = view.layers[name]
        rs = parse_rank(spec)
        if rs.kind == "vbmf":
            if dec.name != "tucker2" and not getattr(dec, "accepts_rank_pairs", False):
                raise RankError(f'rank "vbmf" is for tucker2 only, not {dec.name!r} (layer {name!r})')
            continue
        if rs.kind == "speedup" and not hasattr(dec, "macs"):
            raise RankError(f"decomposer {dec.name!r} has no cost model for rank {rs} (layer {name!r}); "
                            "give an integer rank")
        if rs.kind == "params" and not hasattr(dec, "params"):
            raise RankError(f"decomposer {dec.name!r} has no parameter count for rank {rs} (layer {name!r}); "
                            "give an integer rank")
        if rs.kind in ("speedup", "params", "error") and not (hasattr(dec, "max_rank") or hasattr(dec, "rank_candidates")):
            raise RankError(f"decomposer {dec.name!r} has no max_rank to search for rank {rs} (layer {name!r}); "
                            "give an integer rank")
        if rs.kind != "fixed" or not hasattr(dec, "max_rank"):
            continue
        options = dict(view.options)
        if layer.geometry.groups > 1:
            options.setdefault("groups", layer.geometry.groups)
        try:
            mr = max_rank_for(dec, layer.weight_shape, layer.geometry.groups, options)
        except CpbenchError:
            raise
        except Exception:  # a max_rank that cannot take these options: the cell will say
            continue
        _within(rs.value, mr, dec.name, name)


def _within(rank, max_rank, decomposer: str, layer: str) -> None:
    if isinstance(max_rank, (tuple, list)):
        pair = tuple(rank) if isinstance(rank, (tuple, list)) else (rank, rank)
        for r, m, what in zip(pair, max_rank, ("r_out", "r_in")):
            if r > m:
                raise RankError(f"rank {_show(rank)} of {decomposer!r} for layer {layer!r} is out of range: {what} {r} > "
                                f"{m}; allowed: r_out 1..{max_rank[0]}, r_in 1..{max_rank[1]}")
        return
    if isinstance(rank, (tuple, list)):
        raise RankError(f"rank {_show(rank)} for layer {layer!r}: a pair [r_out, r_in] is for Tucker-2; "
                        f"{decomposer!r} takes an integer 1..{max_rank}")
    if rank > max_rank:
        raise RankError(f"rank {rank} of {decomposer!r} for layer {layer!r} is out of range; allowed: 1..{max_rank}")


def _show(rank) -> str:
    return f"[{rank[0]}, {rank[1]}]" if isinstance(rank, (tuple, list)) else str(rank)


# options the harness passes itself, whatever the decomposer declares
_HARNESS_OPTIONS = frozenset({"groups"})


def accepted_options(decomposer) -> frozenset[str] | None:
    """The option names a decomposer takes: its ``accepted_options`` attribute when it declares one,
    else the keyword parameters of ``decompose`` (and, for a :class:`~cpbench.decomposer.CPDecomposer`,
    of ``fit``); None when a ``**kwargs`` leaves it open."""
    declared = getattr(decomposer, "accepted_options", None)
    if declared is not None:
        return frozenset(declared) | _HARNESS_OPTIONS
    names: set[str] = set()
    for fn in _option_functions(decomposer):
        params = inspect.signature(fn).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return frozenset(names - {"self", "weight", "tensor", "rank", "seed"}) | _HARNESS_OPTIONS
    return None


def _option_functions(decomposer) -> list:
    from ..decomposition.decomposer import CPDecomposer

    fns = [decomposer.decompose]
    if isinstance(decomposer, CPDecomposer):
        fns.append(decomposer.fit)  # decompose passes its **options on to fit
    return fns


def check_options(view: CellView) -> None:
    """Option names the decomposer does not take."""
    allowed = accepted_options(view.decomposer)
    if allowed is None:
        return
    unknown = sorted(set(view.options) - allowed)
    if unknown:
        raise UsageError(f"decomposer {view.decomposer.name!r} has no option(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(allowed - _HARNESS_OPTIONS)) or 'none'}")


def _probe_options(decomposer, options: dict) -> None:
    """Option values: decompose a tiny kernel with them; a UsageError is the decomposer refusing a value
    (anything else is left to the cells, which see real kernels)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 2, 2, generator=gen)
    try:
        decomposer.decompose(weight, 1, seed=0, **options)
    except UsageError as exc:
        raise UsageError(f"decomposer {decomposer.name!r} with options {options}: {exc}") from None
    except Exception:
        pass


CELL_CHECKS: list[CellCheck] = [check_options, check_ranks]


# -- the matrix -------------------------------------------------------------------------------
@dataclass
class _ModelInfo:
    plugin: Any
    layers_of: Callable[..., tuple[list[str], dict[str, str]]]
    views: dict[str, LayerView]
    has_data: bool


def _model_info(spec: dict, plugins, ctx) -> _ModelInfo:
    from ..nn.surgery import conv_layers, layer_input_shapes
    from .inputs import build_network
    from .paths import spec_dir
    from .stages import select_layers

    name = spec["name"]
    with spec_dir(ctx.spec_dir):
        net = build_network(spec, ctx, plugins, train=False)  # the architecture: no training
    model, plugin = net.module, plugins.models.get(name)
    convs = conv_layers(model)
    x = torch.zeros(1, *tuple(net.input_shape))
    shapes = layer_input_shapes(model, x, list(convs))
    views = {n: LayerView(n, tuple(c.weight.shape), geometry(c), tuple(shapes[n][-2:]))
             for n, c in convs.items() if n in shapes}

    selections: dict[str, Any] = {}

    def layers_of(cell: Cell, decomposer, options: dict):
        key = json.dumps([cell.layers, cell.decomposer, cell.rank], sort_keys=True, default=str)
        if key not in selections:  # a layer the rank cannot reach is left out, as the cell will leave it
            selections[key] = select_layers(cell.layers, plugin, model, x, decomposer=decomposer, rank=cell.rank,
                                            options=options)
        sel = selections[key]
        names = sel.layers
        if not names:
            raise UsageError("no layer to decompose: " + "; ".join(f"{n}: {why}" for n, why in sel.skipped.items()))
        conv_layers(model, names)  # one line for a missing or non-conv name
        unused = [n for n in names if n not in views]
        if unused:
            raise UsageError(f"layer(s) {', '.join(unused)} of model {name!r} do not run on its input")
        return names, sel.skipped

    return _ModelInfo(plugin, layers_of, views, net.data_spec is not None)


def _describe(cell: Cell) -> str:
    dec = cell.decomposer["name"]
    return (f"cell (model {cell.model['name']}, decomposer {dec}, rank {cell.rank}, backend {cell.backend}, "
            f"batch {cell.batch})")


def validate_matrix(matrix: Matrix, *, plugins=None, ctx=None, checks: Sequence[CellCheck] | None = None) -> list[str]:
    """Check every cell of ``matrix`` before any work; raise the first problem as one
    :class:`MatrixError` line; return warnings (one line each). ``ctx``: the run's
    :class:`~cpbench.run.cell.RunContext` (default: the matrix's own)."""
    from ..plugin.manager import get_plugins
    from .stages import layer_ranks

    from .cell import RunContext

    plugins = plugins or get_plugins()
    ctx = ctx or RunContext.from_matrix(matrix)
    checks = CELL_CHECKS if checks is None else checks
    source = matrix.source
    models: dict[str, _ModelInfo] = {}
    probed: set[str] = set()
    warnings: list[str] = []
    import json

    for cell in matrix.cells():
        try:
            mkey = json.dumps(cell.model, sort_keys=True)
            if mkey not in models:
                models[mkey] = _model_info(cell.model, plugins, ctx)
            info = models[mkey]
            decomposer = plugins.decomposers.get(cell.decomposer["name"])
            options = {k: v for k, v in cell.decomposer.items() if k != "name"}
            names, skipped = info.layers_of(cell, decomposer, options)
            view = CellView(cell, info.plugin, decomposer, options, {n: info.views[n] for n in names},
                            layer_ranks(cell.rank, names, skipped))
            for check in checks:
                check(view)
            okey = json.dumps(cell.decomposer, sort_keys=True, default=str)
            if options and okey not in probed:
                probed.add(okey)
                _probe_options(decomposer, options)
        except CpbenchError as exc:
            raise MatrixError(f"{source}: {_describe(cell)}: {exc}") from None
        if cell.finetune_epochs > 0 and not info.has_data:
            w = (f"finetune_epochs = {cell.finetune_epochs} asked for model {cell.model['name']!r}, which has no "
                 "data set: its cells are neither fine-tuned nor scored for accuracy")
            if w not in warnings:
                warnings.append(w)
    return warnings
