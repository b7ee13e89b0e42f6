"""Running one matrix cell: build → decompose → replace → evaluate → fine-tune → time → record.

:func:`run_cell` is a plain function of a :class:`~cpbench.matrix.Cell` and a picklable
:class:`RunContext`, so any executor (in-process, Dask workers) can call it. It never raises for a
cell's own failure: it returns a row with ``status: "error"``. Expensive pieces shared between cells
(the trained base network, decompositions, fine-tuned networks) are memoised in the process and
decompositions and trained networks are cached on disk, content-addressed (:mod:`cpbench.cache`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import socket
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .cache import Cache, key_of
from ..errors import CpbenchError, UsageError
from ..decomposition.factorization import Factorization
from ..nn.flops import count_flops
from .matrix import Cell
from ..plugin.manager import get_plugins
from ..nn.surgery import conv_layers, decompose_layer, layer_input_shapes, replace_layers
from ..measure.threads import thread_limits
from ..measure.timing import TimingBudget, time_pair

__all__ = ["RunContext", "run_cell", "base_model", "clear_memo"]

StepFn = Callable[[str], None]


@dataclass(frozen=True)
class RunContext:
    """Everything a cell needs besides its axes; picklable, shipped to workers."""

    cache_dir: str | None = None
    use_cache: bool = True
    timing: dict = field(default_factory=dict)    # TimingBudget fields
    dataset_size: dict = field(default_factory=dict)  # {"train": n, "test": n} overrides
    per_layer_timing: bool = True
    finetune_samples: int | None = None  # training samples used by fine-tuning (None: the recipe's)
    # also fine-tune the uncompressed network with the same recipe: the accuracy drop is then measured
    # from the better of the two, so extra training is not credited to the compression
    finetune_control: bool = False
    train_threads: int | None = None  # threads for training/fine-tuning (None: leave as is)

    @classmethod
    def from_matrix(cls, matrix, **overrides) -> "RunContext":
        """The context a matrix file asks for ([timing] and [run] tables), plus overrides."""
        run = matrix.run
        return cls(**{"timing": dict(matrix.timing), "dataset_size": dict(run.get("dataset_size", {})),
                      "per_layer_timing": run.get("per_layer_timing", True),
                      "finetune_samples": run.get("finetune_samples"),
                      "finetune_control": run.get("finetune_control", False), **overrides})

    def budget(self) -> TimingBudget:
        return TimingBudget(**self.timing)

    def cache(self) -> Cache:
        return Cache(self.cache_dir, enabled=self.use_cache)


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


_MEMO = {"base": _LRU(4), "data": _LRU(4), "fact": _LRU(64), "tuned": _LRU(4), "acc": _LRU(64)}


def clear_memo() -> None:
    for m in _MEMO.values():
        m.clear()


# -- base model -------------------------------------------------------------------------------
def _split_named(spec: dict) -> tuple[str, dict]:
    params = {k: v for k, v in spec.items() if k != "name"}
    return spec["name"], params


def _dataset(plugins, name: str, split: str, ctx: RunContext):
    size = ctx.dataset_size.get(split)
    return _MEMO["data"].get_or((name, split, size), lambda: plugins.datasets.get(name).load(split, seed=0, size=size))


def base_model(model_spec: dict, ctx: RunContext, *, plugins=None, step: StepFn | None = None) -> nn.Module:
    """The model a cell starts from: trained (cached by recipe) when the model has a data set."""
    plugins = plugins or get_plugins()
    name, params = _split_named(model_spec)
    plugin = plugins.models.get(name)

    def make():
        from torch.random import fork_rng

        with fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                model = plugin.build(**params)
            except CpbenchError:
                raise
            except TypeError as exc:
                raise UsageError(f"model {name!r}: {exc}") from None
        model._cpbench_spec = {"name": name, "params": params}
        dataset = getattr(plugin, "dataset", None)
        if dataset:
            _train_or_load(model, plugin, dataset, params, ctx, plugins, step)
        return model.eval()

    return _MEMO["base"].get_or(key_of("base", name, params, ctx.dataset_size.get("train")), make)


def _train_or_load(model, plugin, dataset, params, ctx, plugins, step):
    from ..nn import training

    recipe = getattr(plugin, "train_recipe", training.DEFAULT_RECIPE)
    if ctx.dataset_size.get("train"):
        recipe = recipe.replace(n_train=ctx.dataset_size["train"])
    data_plugin = plugins.datasets.get(dataset)
    key = training.recipe_hash(recipe, model=plugin.name, params=params, dataset=dataset,
                               dataset_version=getattr(data_plugin, "version", None), dataset_repr=repr(data_plugin))
    cache = ctx.cache()
    hit = cache.get("models", key)
    if hit is None and getattr(plugin, "weights_root", None) is not None:
        hit = Cache(plugin.weights_root).get("models", key)  # shipped weights, hash-checked
    if hit is not None:
        model.load_state_dict(hit[0])
        return
    if step:
        step(f"training {plugin.name} (first run; cached afterwards)")
    train = _dataset(plugins, dataset, "train", ctx)
    with thread_limits(ctx.train_threads):
        history = training.train(model, train, recipe)
    cache.put("models", key, model.state_dict(),
              {"recipe": dataclasses.asdict(recipe), "seconds": history.get("seconds")})


def _accuracy(model, plugins, dataset, ctx, memo_key=None):
    from ..nn.training import evaluate

    test = _dataset(plugins, dataset, "test", ctx)
    if memo_key is None:
        return evaluate(model, test)
    return _MEMO["acc"].get_or(memo_key, lambda: evaluate(model, test))


# -- decomposition ----------------------------------------------------------------------------
def _decompose_cached(conv, decomposer, rank_spec, options, seed, name, in_hw, ctx):
    version = getattr(decomposer, "version", "0")
    key = key_of("fact", conv.weight, decomposer.name, version, rank_spec, options, seed, list(in_hw or ()))

    def make():
        cache = ctx.cache()
        hit = cache.get("factorizations", key)
        if hit is not None:
            tensors, meta = hit
            return Factorization(tensors, meta["rel_error"], meta["info"]), meta["rank"], 0.0, True
        start = time.perf_counter()
        fact, rank = decompose_layer(conv, decomposer, rank_spec, name=name, seed=seed, in_hw=in_hw, options=options)
        seconds = time.perf_counter() - start
        from .results import jsonable

        cache.put("factorizations", key, fact.factors,
                  {"rel_error": fact.rel_error, "info": jsonable(fact.info), "rank": jsonable(rank)})
        return fact, rank, seconds, False

    return _MEMO["fact"].get_or(key, make)


# -- the cell ---------------------------------------------------------------------------------
def run_cell(cell: Cell, ctx: RunContext = RunContext(), *, step: StepFn | None = None) -> dict:
    """Run one cell; always returns a result row (``status`` "ok" or "error")."""
    started = time.time()
    plugins = get_plugins()
    row: dict[str, Any] = _axes_row(cell)
    row.update(status="ok", error=None, host=socket.gethostname(), started_at=started)
    try:
        _run(cell, ctx, plugins, row, step or (lambda s: None))
    except Exception as exc:  # recorded, the run goes on
        row["status"] = "error"
        row["error"] = str(exc) if isinstance(exc, CpbenchError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, CpbenchError):
            row["traceback"] = traceback.format_exc(limit=8)
    row["wall_seconds"] = time.time() - started
    row["versions"] = _versions(plugins)
    row["machine"] = _machine()
    return row


def _axes_row(cell: Cell) -> dict:
    model_name, model_params = _split_named(cell.model)
    dec_name, dec_options = _split_named(cell.decomposer)
    return {
        "cell_key": cell.key, "model": model_name, "model_params": model_params,
        "layers": cell.layers, "decomposer": dec_name, "decomposer_options": dec_options,
        "rank_spec": cell.rank, "rank": None, "backend": cell.backend, "threads": cell.threads,
        "batch": cell.batch, "finetune_epochs": cell.finetune_epochs, "seed": cell.seed,
        "axes": cell.axes(),
    }


def _layer_ranks(cell: Cell, layers: list[str]) -> dict[str, Any]:
    if isinstance(cell.rank, dict):
        missing = [n for n in layers if n not in cell.rank]
        extra = [n for n in cell.rank if n not in layers]
        if missing or extra:
            raise UsageError(f"rank table {cell.rank} must name exactly the layers {layers}")
        return dict(cell.rank)
    return {n: cell.rank for n in layers}


def _run(cell: Cell, ctx: RunContext, plugins, row: dict, step: StepFn) -> None:
    model_name, _ = _split_named(cell.model)
    model_plugin = plugins.models.get(model_name)
    decomposer = plugins.decomposers.get(cell.decomposer["name"])
    backend = plugins.backends.get(cell.backend)
    _, options = _split_named(cell.decomposer)

    base = base_model(cell.model, ctx, plugins=plugins, step=step)
    if cell.layers == "auto":
        layers = list(getattr(model_plugin, "default_layers", None) or conv_layers(base))
    else:
        layers = list(cell.layers)
    convs = conv_layers(base, layers)
    ranks = _layer_ranks(cell, layers)
    row["layers"] = layers
    if hasattr(model_plugin, "label"):
        row["model_label"] = model_plugin.label(**_split_named(cell.model)[1])
    in_shape = tuple(model_plugin.input_shape(**_split_named(cell.model)[1]))
    x1 = torch.randn(1, *in_shape, generator=torch.Generator().manual_seed(cell.seed))
    shapes1 = layer_input_shapes(base, x1, layers)

    # decompose (cached) and replace
    facts, chosen, rel, dsec, cached = {}, {}, {}, {}, {}
    for n in layers:
        step(f"decomposing {n} with {decomposer.name}")
        fact, rank, secs, hit = _decompose_cached(convs[n], decomposer, ranks[n], options, cell.seed, n,
                                                  shapes1[n][-2:], ctx)
        facts[n], chosen[n], rel[n], dsec[n], cached[n] = fact, rank, fact.rel_error, secs, hit
    replacements = {n: decomposer.build(convs[n], facts[n]) for n in layers}
    compressed = replace_layers(base, replacements).eval()
    row.update(rank=chosen, rel_error=rel, decompose_seconds=sum(dsec.values()),
               layer_decompose_seconds=dsec, decomposition_cached=cached,
               degeneracy={n: facts[n].info.get("degeneracy") for n in layers},
               decomposer_info={n: _small_info(facts[n].info) for n in layers})

    # accuracy and fine-tuning
    dataset = getattr(model_plugin, "dataset", None)
    row.update(accuracy_base=None, accuracy_decomposed=None, accuracy_finetuned=None, finetune_seconds=0.0,
               accuracy_base_finetuned=None)
    if dataset:
        step("evaluating")
        with thread_limits(ctx.train_threads):
            row["accuracy_base"] = _accuracy(base, plugins, dataset, ctx,
                                             memo_key=key_of("acc", cell.model, ctx.dataset_size))
            # every weight of the compressed net identifies it: cells that differ only in backend,
            # threads or batch share its evaluation and its fine-tuning
            weights_key = _weights_key(compressed)
            row["accuracy_decomposed"] = _accuracy(compressed, plugins, dataset, ctx,
                                                   memo_key=key_of("acc", weights_key, ctx.dataset_size))
            if cell.finetune_epochs > 0:
                tkey = key_of("tuned", weights_key, cell.finetune_epochs, cell.seed, ctx.dataset_size,
                              ctx.finetune_samples)
                compressed, secs, acc, hit = _MEMO["tuned"].get_or(
                    tkey, lambda: _finetune(compressed, plugins, dataset, cell, ctx, step, tkey))
                row["finetune_cached"] = hit
                row["accuracy_finetuned"], row["finetune_seconds"] = acc, secs
                if ctx.finetune_control:  # the control arm: the base network, same recipe, same samples
                    bkey = key_of("tuned-base", _weights_key(base), cell.finetune_epochs, cell.seed,
                                  ctx.dataset_size, ctx.finetune_samples)
                    _, _, row["accuracy_base_finetuned"], _ = _MEMO["tuned"].get_or(
                        bkey, lambda: _finetune(base, plugins, dataset, cell, ctx, step, bkey))
    compressed.eval()

    # FLOPs (torch's counter) on one sample
    base_flops, comp_flops = count_flops(base, x1), count_flops(compressed, x1)
    row.update(baseline_flops=base_flops, compressed_flops=comp_flops,
               theoretical_speedup=base_flops / max(comp_flops, 1))
    layer_theo = {}
    for n in layers:
        xin = torch.randn(*shapes1[n])
        layer_theo[n] = count_flops(convs[n], xin) / max(count_flops(replacements[n], xin), 1)
    row["layer_theoretical_speedup"] = layer_theo

    # timing: whole network, then each replaced layer alone on its real input shape
    step(f"timing on {backend.name}")
    from ..kernels.forms import configure_malloc

    row["allocator"] = configure_malloc()  # once per process, before any timing: both arms alike
    budget = ctx.budget()
    x = torch.randn(cell.batch, *in_shape, generator=torch.Generator().manual_seed(cell.seed))
    with thread_limits(cell.threads) as threads_set:
        timing, info = _time_models(backend, base, compressed, x, cell.threads, budget)
        row.update(_timing_fields(timing), backend_info=info, thread_state=threads_set)
        if ctx.per_layer_timing:
            shapes = layer_input_shapes(base, x, layers)
            ls, lci, lnoisy = {}, {}, {}
            for n in layers:
                xin = torch.randn(*shapes[n], generator=torch.Generator().manual_seed(cell.seed))
                lt, _ = _time_models(backend, convs[n], replacements[n].eval(), xin, cell.threads,
                                     dataclasses.replace(budget, budget_s=budget.budget_s / 2))
                ls[n], lci[n], lnoisy[n] = lt.speedup, list(lt.speedup_ci), lt.noisy
            row.update(layer_speedup=ls, layer_speedup_ci=lci, layer_noisy=lnoisy)


def _weights_key(model: nn.Module) -> str:
    """Content key of every weight of ``model``: two cells with the same network share its work."""
    return key_of(*[v for _, v in sorted(model.state_dict().items())])


def _small_info(info: dict) -> dict:
    return {k: v for k, v in info.items() if k != "per_group" and isinstance(v, (int, float, str, bool, type(None)))}


def _finetune(compressed, plugins, dataset, cell, ctx, step, key):
    from ..nn.training import FINETUNE_RECIPE, finetune, recipe_hash

    model = copy.deepcopy(compressed)
    recipe = getattr(plugins.models.get(cell.model["name"]), "finetune_recipe", FINETUNE_RECIPE)
    recipe = recipe.replace(epochs=cell.finetune_epochs, seed=cell.seed)
    if ctx.finetune_samples or ctx.dataset_size.get("train"):
        recipe = recipe.replace(n_train=ctx.finetune_samples or ctx.dataset_size["train"])
    key = f"{key}-{recipe_hash(recipe)}"
    cache = ctx.cache()
    hit = cache.get("finetuned", key)
    if hit is not None:
        model.load_state_dict(hit[0])
        return model.eval(), hit[1]["seconds"], hit[1]["accuracy"], True
    step(f"fine-tuning {cell.finetune_epochs} epoch(s)")
    train = _dataset(plugins, dataset, "train", ctx)
    start = time.perf_counter()
    with thread_limits(ctx.train_threads):
        finetune(model, train, recipe)
        model.eval()
        seconds = time.perf_counter() - start
        acc = _accuracy(model, plugins, dataset, ctx)
    cache.put("finetuned", key, model.state_dict(), {"seconds": seconds, "accuracy": acc})
    return model, seconds, acc, False


def _time_models(backend, base, compressed, x, threads, budget):
    pa = backend.prepare(base, x, threads=threads)
    try:
        pb = backend.prepare(compressed, x, threads=threads)
        try:
            xa, xb = pa.convert_input(x), pb.convert_input(x)
            timing = time_pair(lambda: pa(xa), lambda: pb(xb), budget)
            info = {"baseline": pa.info, "compressed": pb.info}
        finally:
            pb.close()
    finally:
        pa.close()
    return timing, info


def _timing_fields(t) -> dict:
    return {
        "baseline_ms": t.baseline.median_ms, "compressed_ms": t.compressed.median_ms,
        "baseline_p90_ms": t.baseline.p90_ms, "compressed_p90_ms": t.compressed.p90_ms,
        "baseline_iqr_ms": t.baseline.iqr_ms, "compressed_iqr_ms": t.compressed.iqr_ms,
        "speedup": t.speedup, "speedup_ci": list(t.speedup_ci), "noisy": t.noisy,
        "timing_rounds": t.baseline.rounds, "calls_per_round": list(t.calls_per_round),
    }


def _versions(plugins) -> dict:
    import cpbench

    v = {"cpbench": cpbench.__version__, "torch": torch.__version__,
         "mkldnn": getattr(torch.backends.mkldnn, "version", lambda: None)() if hasattr(torch.backends.mkldnn, "version") else None,
         "plugins": plugins.versions()}
    with contextlib.suppress(Exception):
        import onnxruntime

        v["onnxruntime"] = onnxruntime.__version__
    return v


def _machine() -> dict:
    try:
        from ..measure.machine import machine_info

        return machine_info()
    except Exception as exc:  # machine probing must never lose a result
        return {"error": f"{type(exc).__name__}: {exc}", "host": socket.gethostname()}
