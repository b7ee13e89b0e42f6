"""The stages of one cell: base → compress → evaluate → fine-tune → measure (→ record, in ``record.py``).

Each stage is a function of typed values with a dataclass out, so each can be called and tested
alone (a one-layer ``conv`` model needs no training). Expensive values are shared between cells
through :class:`cpbench.run.memo.Computation`: in this process first, then the disk cache.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..decomposition.factorization import Factorization
from ..errors import UsageError
from ..measure.threads import thread_limits
from ..measure.cell_timing import MODEL, measure_pairs
from ..measure.intervals import Interval
from ..measure.workers import ProcessRun
from ..nn.flops import count_flops
from ..measure.fidelity import Fidelity, evaluation_inputs, fidelity, fidelity_fields
from ..nn.bnfold import fold_batchnorm
from ..nn.selection import Selection
from ..nn.selection import select_layers as _select_layers
from ..nn.surgery import conv_layers, decompose_layer, layer_input_shapes, replace_layers
from .cache import key_of
from .inputs import Network, build_network, open_dataset, split_model_spec
from .matrix import Cell
from .memo import Computation
from .paths import spec_dir
from .results import jsonable

if TYPE_CHECKING:
    from ..plugin.manager import Plugins
    from .cell import RunContext

__all__ = ["Base", "Compressed", "Evaluation", "FineTuned", "Flops", "Measurement", "OutputFidelity", "StepFn",
           "split_named", "select_layers", "layer_ranks", "base_model", "build_base", "compress", "evaluate",
           "fine_tune", "measure_fidelity", "count_flops_of", "measure"]

StepFn = Callable[[str], None]

# Shared between the cells of a process (sizes: a few networks, many decompositions and evaluations).
BASES: Computation[Network] = Computation("base networks", 4)
DATA: Computation[Any] = Computation("data sets", 4)
# Accuracies and fidelities are also kept on disk, keyed by the weights and the evaluation data's content:
# a cached run re-evaluated every network on the whole test split (charnet: ~9 s per decomposition
# of the default matrix, a fifth of its cached run)
ACCURACY: Computation[float] = Computation(
    "accuracies", 64, namespace="accuracy",
    encode=lambda v: ({"value": torch.tensor([v], dtype=torch.float64)}, {}),
    decode=lambda s: float(s[0]["value"][0]))
FACTORIZATIONS: Computation[tuple] = Computation(
    "factorizations", 64, namespace="factorizations",
    encode=lambda v: (v[0].factors, {"rel_error": v[0].rel_error, "info": jsonable(v[0].info), "rank": jsonable(v[1])}),
    decode=lambda hit: (Factorization(hit[0], hit[1]["rel_error"], hit[1]["info"]), hit[1]["rank"], 0.0, True))
FINETUNED: Computation[tuple] = Computation(
    "fine-tuned networks", 4, namespace="finetuned",
    encode=lambda v: (v[0].state_dict(), {"seconds": v[1], "accuracy": v[2]}))


def split_named(spec: dict) -> tuple[str, dict]:
    """``{"name": n, **params}`` -> ``(n, params)`` (a matrix's model and decomposer entries)."""
    return spec["name"], {k: v for k, v in spec.items() if k != "name"}


def _quiet(_: str) -> None:
    pass


# -- base -------------------------------------------------------------------------------------
@dataclass
class Base:
    """The network a cell starts from, and what the later stages need to know about it."""

    spec: dict                              # the matrix's model entry
    model: nn.Module
    plugin: Any                             # the model plugin
    layers: list[str]                       # the layers to replace
    convs: dict[str, nn.Conv2d]
    input_shape: tuple[int, ...]            # one sample, (C, H, W)
    example: torch.Tensor                   # one seeded sample, batch 1
    layer_shapes: dict[str, tuple[int, ...]]  # each selected layer's input shape for ``example``
    label: str | None = None                # the model plugin's label, when it has one
    dataset: Any = None                     # the data-set name or inline spec it is trained and evaluated on
    weights_from: str | None = None         # see cpbench.run.inputs.Network
    layer_info: dict[str, dict] = field(default_factory=dict)  # chosen layer -> shapes, FLOPs, FLOP share
    layers_skipped: dict[str, str] = field(default_factory=dict)  # conv left as it is -> why
    bn_folded: dict[str, str] = field(default_factory=dict)  # BatchNorm folded -> its conv

    @functools.cached_property
    def weights_key(self) -> str:
        return weights_key(self.model)


def dataset(plugins: "Plugins", spec: Any, split: str, ctx: "RunContext"):
    """A split of the data set ``spec`` names (a name or an inline spec), memoised in the process."""
    size = ctx.dataset_size.get(split)

    def load():
        with spec_dir(ctx.spec_dir):
            return open_dataset(spec, plugins).load(split, seed=0, size=size)

    return DATA.get(key_of("data", spec, ctx.spec_dir, split, size), load)


def network(model_spec: dict, ctx: "RunContext", *, plugins: "Plugins", step: StepFn = _quiet) -> Network:
    """The network a model spec names: given weights, or trained (cached by recipe) when it has a data
    set (:func:`cpbench.run.inputs.build_network`); memoised in the process."""
    def make() -> Network:
        with spec_dir(ctx.spec_dir):
            return build_network(model_spec, ctx, plugins, step=step,
                                 load_split=lambda spec, data, split: dataset(plugins, spec, split, ctx))

    return BASES.get(key_of("base", model_spec, ctx.spec_dir, ctx.dataset_size.get("train"), ctx.train), make)


def base_model(model_spec: dict, ctx: "RunContext", *, plugins: "Plugins", step: StepFn = _quiet) -> nn.Module:
    """The model a cell starts from (see :func:`network`)."""
    return network(model_spec, ctx, plugins=plugins, step=step).module


def select_layers(layers_axis: Any, model_plugin: Any, model: nn.Module, example: torch.Tensor, *,
                  decomposer: Any = None, rank: Any = None, options: dict | None = None) -> Selection:
    """The layers a cell decomposes (:func:`cpbench.nn.selection.select_layers`), "auto" being the model
    plugin's ``default_layers`` when it declares them (charnet: the paper's conv2 and conv3). Also what
    the matrix is validated against before a run (:mod:`cpbench.run.validate`)."""
    spec = layers_axis
    if spec == "auto" and getattr(model_plugin, "default_layers", None):
        spec = list(model_plugin.default_layers)
    return _select_layers(model, example, spec, decomposer=decomposer, rank=rank, options=options)


def build_base(cell: Cell, ctx: "RunContext", plugins: "Plugins", step: StepFn = _quiet) -> Base:
    """Stage 1: the (trained) base network, the layers to replace and their input shapes."""
    name, params, _ = split_model_spec(cell.model)
    plugin = plugins.models.get(name)
    net = network(cell.model, ctx, plugins=plugins, step=step)
    model = net.module
    bn_folded: dict[str, str] = {}
    if ctx.fold_bn:  # both arms start from the folded network: its baseline runs no BatchNorm either
        model, bn_folded = fold_batchnorm(model)
    x1 = torch.randn(1, *net.input_shape, generator=torch.Generator().manual_seed(cell.seed))
    _, options = split_named(cell.decomposer)
    selection = select_layers(cell.layers, plugin, model, x1, decomposer=plugins.decomposers.get(cell.decomposer["name"]),
                              rank=cell.rank, options=options)
    layers = selection.layers
    convs = conv_layers(model, layers)
    return Base(spec=cell.model, model=model, plugin=plugin, layers=layers, convs=convs, input_shape=net.input_shape,
                example=x1, layer_shapes=layer_input_shapes(model, x1, layers),
                label=plugin.label(**params) if hasattr(plugin, "label") else None,
                dataset=net.data_spec if net.data is not None else None, weights_from=net.weights_from,
                layer_info=selection.info, layers_skipped=selection.skipped, bn_folded=bn_folded)


# -- compress ---------------------------------------------------------------------------------
@dataclass
class Compressed:
    """The base network with its selected layers replaced by the decomposer's blocks."""

    model: nn.Module
    replacements: dict[str, nn.Module]
    factorizations: dict[str, Factorization]
    ranks: dict[str, Any]                   # the rank chosen per layer
    decompose_seconds: dict[str, float]     # 0 for a cached decomposition
    cached: dict[str, bool]

    @functools.cached_property
    def weights_key(self) -> str:
        return weights_key(self.model)


def layer_ranks(rank_spec: Any, layers: list[str], skipped: dict | None = None) -> dict[str, Any]:
    """The rank spec of each layer: one spec for all, or a table naming exactly the layers (and
    perhaps layers left alone, ``skipped``)."""
    if isinstance(rank_spec, dict):
        missing = [n for n in layers if n not in rank_spec]
        extra = [n for n in rank_spec if n not in layers and n not in (skipped or {})]
        if missing or extra:
            raise UsageError(f"rank table {rank_spec} must name exactly the layers {layers}")
        return dict(rank_spec)
    return {n: rank_spec for n in layers}


def compress(base: Base, decomposer: Any, cell: Cell, ctx: "RunContext", step: StepFn = _quiet) -> Compressed:
    """Stage 2: decompose each selected layer (cached, content-addressed) and replace it."""
    if not base.layers:  # refused before any decomposing, with every reason
        raise UsageError("no layer to decompose: " + "; ".join(f"{n}: {why}" for n, why in base.layers_skipped.items()))
    ranks = layer_ranks(cell.rank, base.layers, base.layers_skipped)
    _, options = split_named(cell.decomposer)
    facts, chosen, seconds, cached = {}, {}, {}, {}
    for n in base.layers:
        step(f"decomposing {n} with {decomposer.name}")
        conv, in_hw = base.convs[n], list(base.layer_shapes[n][-2:])
        key = key_of("fact", conv.weight, decomposer.name, getattr(decomposer, "version", "0"), ranks[n], options,
                     cell.seed, in_hw)

        def make(conv=conv, n=n, in_hw=in_hw):
            start = time.perf_counter()
            fact, rank = decompose_layer(conv, decomposer, ranks[n], name=n, seed=cell.seed, in_hw=tuple(in_hw),
                                         options=options)
            return fact, rank, time.perf_counter() - start, False

        facts[n], chosen[n], seconds[n], cached[n] = FACTORIZATIONS.get(key, make, caches=[ctx.cache()])
    replacements = {n: decomposer.build(base.convs[n], facts[n]) for n in base.layers}
    return Compressed(replace_layers(base.model, replacements).eval(), replacements, facts, chosen, seconds, cached)


# -- evaluate ---------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Test accuracy before fine-tuning (None without a data set)."""

    accuracy_base: float | None = None
    accuracy_decomposed: float | None = None


def accuracy(model: nn.Module, plugins: "Plugins", data: str, ctx: "RunContext", memo_key: str | None = None) -> float:
    """Test accuracy of ``model``; with ``memo_key`` memoised in the process and cached on disk under
    the weights' and the test split's content (a renamed or edited data folder is evaluated afresh)."""
    from ..nn.training import as_tensors, evaluate as _evaluate

    test = dataset(plugins, data, "test", ctx)
    if memo_key is None:
        return _evaluate(model, test)
    x, y = as_tensors(test)
    key = key_of("accuracy", weights_key(model), _content(x), _content(y))
    return ACCURACY.get(memo_key, lambda: ACCURACY.get(key, lambda: _evaluate(model, test), caches=[ctx.cache()]))


# by address, with a weak reference that must still be that tensor: a new tensor at a freed one's address is
# hashed anew (a WeakKeyDictionary cannot hold tensors: it compares keys with ==, elementwise for a tensor)
_DIGESTS: dict[int, tuple["weakref.ref[torch.Tensor]", str]] = {}


def _content(t: torch.Tensor) -> str:
    """The content hash of an evaluation tensor, computed once per tensor object in the process (the
    evaluation data is never modified in place)."""
    from .cache import tensor_digest

    hit = _DIGESTS.get(id(t))
    if hit is not None and hit[0]() is t:
        return hit[1]
    digest = tensor_digest(t)
    key = id(t)

    def forget(_ref: "weakref.ref[torch.Tensor]") -> None:
        _DIGESTS.pop(key, None)

    _DIGESTS[key] = (weakref.ref(t, forget), digest)
    return digest


def evaluate(base: Base, compressed: Compressed, ctx: "RunContext", plugins: "Plugins",
             step: StepFn = _quiet) -> Evaluation:
    """Stage 3: the base and the compressed network's test accuracy."""
    if not base.dataset:
        return Evaluation()
    step("evaluating")
    with thread_limits(ctx.train_threads):
        # every weight of the compressed net identifies it: cells that differ only in backend,
        # threads or batch share its evaluation and its fine-tuning
        return Evaluation(
            accuracy(base.model, plugins, base.dataset, ctx,
                     memo_key=key_of("acc", base.spec, ctx.spec_dir, ctx.dataset_size)),
            accuracy(compressed.model, plugins, base.dataset, ctx,
                     memo_key=key_of("acc", compressed.weights_key, ctx.dataset_size)))


# -- fine-tune --------------------------------------------------------------------------------
@dataclass
class FineTuned:
    """The network to time: the fine-tuned compressed one, or the compressed one when not fine-tuned."""

    model: nn.Module
    accuracy_finetuned: float | None = None
    finetune_seconds: float = 0.0
    accuracy_base_finetuned: float | None = None  # the control arm ([run] finetune_control)
    cached: bool | None = None                    # None: not fine-tuned


def fine_tune(base: Base, compressed: Compressed, cell: Cell, ctx: "RunContext", plugins: "Plugins",
              step: StepFn = _quiet) -> FineTuned:
    """Stage 4: fine-tune the compressed network (and, with ``finetune_control``, the base alike)."""
    data = base.dataset
    if not data or cell.finetune_epochs <= 0:
        return FineTuned(compressed.model)
    with thread_limits(ctx.train_threads):
        tkey = key_of("tuned", compressed.weights_key, cell.finetune_epochs, cell.seed, ctx.dataset_size,
                      ctx.finetune_samples)
        model, seconds, acc, hit = _finetuned(compressed.model, base, data, cell, ctx, plugins, step, tkey)
        control = None
        if ctx.finetune_control:  # the control arm: the base network, same recipe, same samples
            bkey = key_of("tuned-base", base.weights_key, cell.finetune_epochs, cell.seed, ctx.dataset_size,
                          ctx.finetune_samples)
            control = _finetuned(base.model, base, data, cell, ctx, plugins, step, bkey)[2]
    return FineTuned(model.eval(), acc, seconds, control, hit)


def _finetuned(start: nn.Module, base: Base, data: str, cell: Cell, ctx: "RunContext", plugins: "Plugins",
               step: StepFn, key: str) -> tuple[nn.Module, float, float, bool]:
    from ..nn.training import FINETUNE_RECIPE, finetune, recipe_hash

    recipe = getattr(base.plugin, "finetune_recipe", FINETUNE_RECIPE)
    recipe = recipe.replace(epochs=cell.finetune_epochs, seed=cell.seed)
    if ctx.finetune_samples or ctx.dataset_size.get("train"):
        recipe = recipe.replace(n_train=ctx.finetune_samples or ctx.dataset_size["train"])
    model = copy.deepcopy(start)

    def train() -> tuple[nn.Module, float, float, bool]:
        step(f"fine-tuning {cell.finetune_epochs} epoch(s)")
        t0 = time.perf_counter()
        finetune(model, dataset(plugins, data, "train", ctx), recipe)
        model.eval()
        seconds = time.perf_counter() - t0
        return model, seconds, accuracy(model, plugins, data, ctx), False

    def load(hit) -> tuple[nn.Module, float, float, bool]:
        model.load_state_dict(hit[0])
        return model.eval(), hit[1]["seconds"], hit[1]["accuracy"], True

    return FINETUNED.get(f"{key}-{recipe_hash(recipe)}", train, caches=[ctx.cache()], decode=load)


# -- fidelity ---------------------------------------------------------------------------------
@dataclass
class OutputFidelity:
    """Compressed against base outputs on the evaluation sample (:mod:`cpbench.measure.fidelity`)."""

    decomposed: Fidelity
    finetuned: Fidelity | None = None

    def fields(self) -> dict:
        return fidelity_fields(self.decomposed, self.finetuned)


FIDELITY: Computation[Fidelity] = Computation(
    "fidelities", 64, namespace="fidelity",
    encode=lambda f: ({"rel_error": torch.tensor([f.rel_error], dtype=torch.float64)},
                      {"top1_agreement": f.top1_agreement, "samples": f.samples}),
    decode=lambda s: Fidelity(float(s[0]["rel_error"][0]), s[1]["top1_agreement"], int(s[1]["samples"])))


def measure_fidelity(base: Base, compressed: Compressed, tuned: FineTuned, cell: Cell, ctx: "RunContext",
                     plugins: "Plugins", step: StepFn = _quiet) -> OutputFidelity:
    """Stage 4b: fidelity of the decomposed and of the fine-tuned network, on the test split (or seeded
    inputs of the model's shape without a data set)."""
    step("measuring fidelity")
    test = dataset(plugins, base.dataset, "test", ctx) if base.dataset else None
    inputs = evaluation_inputs(test, base.input_shape, seed=cell.seed)

    def of(model: nn.Module) -> Fidelity:
        # cells that differ only in backend, threads or batch compare the same two networks
        key = key_of("fidelity", base.weights_key, weights_key(model), _content(inputs))
        with thread_limits(ctx.train_threads):
            return FIDELITY.get(key, lambda: fidelity(base.model, model, inputs), caches=[ctx.cache()])

    after = of(tuned.model) if tuned.model is not compressed.model else None
    return OutputFidelity(of(compressed.model), after)


# -- measure ----------------------------------------------------------------------------------
@dataclass
class Flops:
    """FLOPs of one sample (``torch.utils.flop_counter``), of the whole networks and of each layer."""

    baseline: int
    compressed: int
    layer_theoretical_speedup: dict[str, float]
    # parameters kept (compressed over original), the one size axis on which every decomposer's ranks
    # compare: a Tucker-2 pair, a CP rank and a spatial-SVD rank mean different things
    params_kept: float | None = None
    layer_params_kept: dict[str, float] | None = None

    @property
    def theoretical_speedup(self) -> float:
        return self.baseline / max(self.compressed, 1)


def count_flops_of(base: Base, compressed: Compressed, model: nn.Module) -> Flops:
    """Stage 5a: the FLOP ratio of the networks and of each replaced layer alone."""
    layer = {}
    for n in base.layers:
        xin = torch.randn(*base.layer_shapes[n])
        layer[n] = count_flops(base.convs[n], xin) / max(count_flops(compressed.replacements[n], xin), 1)
    kept = {n: _n_params(compressed.replacements[n]) / max(_n_params(base.convs[n]), 1) for n in base.layers}
    return Flops(count_flops(base.model, base.example), count_flops(model, base.example), layer,
                 _n_params(model) / max(_n_params(base.model), 1), kept)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Measurement:
    """Baseline against compressed on the cell's backend, threads and batch, timed in fresh processes:
    the interval of each pair (the whole network, :data:`MODEL`, and each replaced layer in ``layers``),
    what every process measured, and the machine's noise meanwhile."""

    allocator: dict
    intervals: dict[str, Interval]
    runs: list[ProcessRun]
    backend_info: dict
    thread_state: dict
    noise: dict
    quiet_wait: dict | None = None
    layers: list[str] | None = None  # the layers timed alone (None without per-layer timing)


def measure(base: Base, compressed: Compressed, model: nn.Module, cell: Cell, backend: Any, ctx: "RunContext",
            step: StepFn = _quiet, *, processes: int | None = None) -> Measurement:
    """Stage 5b: time the whole networks, then (``per_layer_timing``) each replaced layer on its real input,
    in ``processes`` fresh workers (default: the context's; fewer in one timing pass, each then gets its
    share of the budget of all the context's processes)."""
    from ..kernels.forms import configure_malloc

    step(f"timing on {backend.name}")
    allocator = configure_malloc()  # once per process, before any timing: both arms alike
    remember_form_choices(ctx)
    budget, all_processes, pin = ctx.timing_settings()
    processes = all_processes if processes is None else processes
    x = torch.randn(cell.batch, *base.input_shape, generator=torch.Generator().manual_seed(cell.seed))
    with thread_limits(cell.threads) as threads_set:
        pairs = [(MODEL, base.model, model, x, budget)]
        if ctx.per_layer_timing:
            shapes = layer_input_shapes(base.model, x, base.layers)
            layer_budget = dataclasses.replace(budget, budget_s=budget.budget_s / 2)
            for n in base.layers:
                xin = torch.randn(*shapes[n], generator=torch.Generator().manual_seed(cell.seed))
                pairs.append((n, base.convs[n], compressed.replacements[n].eval(), xin, layer_budget))
        intervals, runs, extra = measure_pairs(backend, pairs, threads=cell.threads, processes=processes, pin=pin,
                                               require_quiet_s=ctx.require_quiet_s,
                                               contended_retries=ctx.timing.get("contended_retries"),
                                               share_of=all_processes)
    return Measurement(allocator, intervals, runs, extra["backend_info"], threads_set, extra["noise"],
                       extra.get("quiet_wait"), list(base.layers) if ctx.per_layer_timing else None)


_FORM_STORES: dict = {}  # the cache's form-choice file, one store per path in the process


def remember_form_choices(ctx: "RunContext") -> None:
    """Backends' form choices kept in the cache (``forms/choices.json``); none with caching off."""
    from ..kernels.forms import use_choice_store
    from ..tune.store import JsonStore

    if not ctx.use_cache:
        use_choice_store(None)
        return
    path = ctx.cache().root / "forms" / "choices.json"
    if path not in _FORM_STORES:
        _FORM_STORES[path] = JsonStore(path)
    use_choice_store(_FORM_STORES[path])


def weights_key(model: nn.Module) -> str:
    """Content key of every weight of ``model``: two cells with the same network share its work."""
    return key_of(*[v for _, v in sorted(model.state_dict().items())])
