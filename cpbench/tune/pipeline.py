"""``cpbench tune``: compress a whole network to a measured speedup target.

Stages, each cached so a second tune on the same machine repeats none of the expensive ones:

1. **candidates** per layer (:mod:`.candidates`): each decomposer over a rank grid from the cost
   models, plus "leave it as it is";
2. **latency table** (:mod:`.latency`): each candidate timed alone on its layer's real input on the
   backend, threads and batch asked for; each layer's share of the baseline network timed once.
   A candidate is timed with random factors of its shapes where its decomposer offers them
   (``random_factorization``: a dense kernel's speed does not depend on its values, and a CP or HOOI
   fit costs seconds to minutes), else with its real decomposition.
   A candidate slower than the layer it replaces is dropped here: "leave it" is faster and loses nothing;
3. **sensitivity** (:mod:`.sensitivity`): the KL divergence from the baseline on the validation split
   (or the accuracy lost, the fidelity, the reconstruction error) with only that layer replaced, before
   fine-tuning; computed lazily, only for the candidates a search's plan holds (:func:`.search.lazy_plans`);
4. **search** (:mod:`.search`) and **verify** (:mod:`.loop`): the plan of least predicted loss within
   the latency budget, built and timed whole against the baseline; on a miss beyond the interval the
   budget is tightened by the miss and the search runs again;
5. **fine-tune and measure** (:mod:`.finish`): the verified plan is fine-tuned, evaluated on the test
   split and timed again whole (a fresh measurement, not the one the loop stopped on), and written as a
   results row, a plan file and a table;
6. **hold the drop** (:mod:`.drops`): a fine-tuned plan that loses more than ``--max-drop`` sends the
   tuner back to slower plans, for a bounded number of fine-tunings.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import nn

from ..run.cache import key_of
from ..decomposition.decomposer import CPDecomposer
from ..errors import UsageError
from ..nn.layers import capturing_graph, geometry
from .candidates import KEEP, Candidate, layer_candidates, speedup_grid
from ..measure.cell_timing import DEFAULT_PROCESSES
from .latency import LatencyTable, Timed, backend_timer, plan_variant, savings_calibration
from .drops import FineTunedPlans
from .loop import Attempt, Measured, TuneOutcome, tighten_loop
from .plan import Plan
from .search import Option, Selection, TargetUnreachable, check_reach, fastest, infeasible, lazy_plans, shaped_plans
from .sensitivity import Sensitivities, cand_key, scorer
from .store import JsonStore
from .prepared import Prepared, layer_costs, normalised_shares, option_cost, reach, recalibrated, nearest_verified
from .request import TuneRequest, select_layers

__all__ = ["Tuner", "StepFn"]


# The loss shapes the search is run under (see :func:`search.shaped_plans`); the plans are then
# compared by their joint loss. On ResNet-20 (18 layers, 2x) the summed-KL plan took rank 1 on 8 layers
# and lost 4.8 points after fine-tuning: summed single-layer losses said nothing of the compound.
JOINT_EXPONENTS = (0.5, 1.0, 2.0)
VAL_FROM_TRAIN = 0.1  # the share of the training split sensitivities use when a data set has no val split

StepFn = Callable[[str], None]


class _Stub(nn.Module):
    """Stands in for a layer at no cost: returns a zero tensor of the layer's output shape, in the memory
    format of its input (a channels-last network stays channels-last).

    While a graph is being captured it adds 0 × one element of its input. That term keeps the layers before
    it alive: without it a backend that compiles the whole graph (ONNX Runtime, torch.compile) drops them as
    dead code — the character network's conv1 ahead of a stubbed conv2, say — and times a "rest" without
    them (or, with nothing left that reads the input, fails). Eager backends run every layer anyway, and
    there the term is not free: on the character network at batch 1 (mkl, one thread) three stubs with it
    made the rest 147–151 µs against 84–85 µs without (measured here, interleaved).
    """

    out: torch.Tensor  # a buffer (register_buffer): nn.Module's __getattr__ types it Tensor | Module

    def __init__(self, shape: tuple):
        super().__init__()
        self.register_buffer("out", torch.zeros(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.out
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out + x.reshape(-1)[:1] * 0.0 if capturing_graph() else out


class Tuner:
    """One tune of one model: :meth:`prepare` runs candidates, latency and sensitivity; :meth:`plan`
    searches and verifies one target; :meth:`finish` fine-tunes, evaluates and times the plan."""

    def __init__(self, request: TuneRequest, *, ctx=None, plugins=None, step: StepFn | None = None,
                 timer=None):
        from ..plugin.manager import get_plugins
        from ..run.cell import RunContext

        self.request = request
        self.plugins = plugins or get_plugins()
        request.check(self.plugins)
        self.ctx = ctx or RunContext()
        self.step = step or (lambda s: None)
        self.model_plugin = self.plugins.models.get(request.model["name"])
        self.backend = self.plugins.backends.get(request.backend)
        self.decomposers = [self.plugins.decomposers.get(d) for d in request.decomposers]
        from ..run.inputs import split_model_spec

        self.params = split_model_spec(request.model)[1]  # the plugin's own (not weights, dataset, ...)
        self.timer = timer or backend_timer(self.backend, request.threads, request.layer_budget)
        self.latency_table: LatencyTable | None = None  # set by prepare (per batch)
        self.joint_log: list[dict] = []  # the plans each search compared by joint loss (joint_search)
        self.calibration_log: list[dict] = []  # the verify loop's refits of the calibration (plan)
        # every whole network verified in this tune, per batch: (plan labels, measured speedup); a
        # target's search starts from the model refitted to the one nearest it (plan)
        self.verified: dict[int, list[tuple[dict[str, str], float]]] = {}
        # every plan fine-tuned in this tune, per batch (stage 6, :mod:`.drops`)
        self.fine_tuned: dict[int, FineTunedPlans] = {}
        self._joint_scorer: Callable[[nn.Module], float] | None = None
        # the verify step is the tune's measurement: timed like a cell's network, in fresh processes
        self.network_timer = timer or backend_timer(self.backend, request.threads, request.network_budget,
                                                    processes=DEFAULT_PROCESSES)
        # a kept layer's cost in the fastest plan (kept_in_place): two whole compressed networks, in this process
        self.in_place_timer = timer or backend_timer(self.backend, request.threads, request.network_budget)

    # -- stage 0: the base network, its data set and its layers ----------------------------------
    @property
    def network(self):
        """The base network as a cell builds it (:func:`cpbench.run.stages.network`): a plugin's model or
        your own (a Python file, ONNX, ResNet/VGG on your data), weights loaded or trained once (cached)."""
        from ..run import stages

        if not hasattr(self, "_network"):
            self._network = stages.network(self.request.model, self.ctx, plugins=self.plugins, step=self.step)
        return self._network

    def base(self) -> nn.Module:
        return self.network.module

    @property
    def dataset(self) -> Any:
        """The data-set name or inline spec the network is evaluated and fine-tuned on (None: none)."""
        return self.network.data_spec if self.network.data is not None else None

    @property
    def sensitivity_mode(self) -> str:
        mode = self.request.sensitivity
        mode = ("kl" if self.dataset else "fidelity") if mode == "auto" else mode
        if mode in ("accuracy", "kl") and not self.dataset:
            raise UsageError(f"model {self.request.model['name']!r} has no data set; use sensitivity fidelity or error")
        return mode

    def input_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.network.input_shape)

    def layer_shapes(self, batch: int) -> dict[str, tuple]:
        from ..nn.surgery import layer_input_shapes

        return layer_input_shapes(self.base(), torch.zeros(self.input_shape(batch)), self.layers)

    @property
    def layers(self) -> list[str]:
        if not hasattr(self, "_layers"):
            self._layers = select_layers(self.base(), self.request.layers)
        return self._layers

    def conv(self, name: str) -> nn.Conv2d:
        conv = self.base().get_submodule(name)
        assert isinstance(conv, nn.Conv2d), f"{name!r} is not a Conv2d: a tune selects only Conv2d layers (select_layers)"
        return conv

    def _stubbed(self, names: list[str], batch: int) -> nn.Module:
        """The base network with the layers ``names`` replaced by :class:`_Stub` of their output shapes."""
        from ..nn.surgery import replace_layers

        outs: dict[str, tuple] = {}

        def record(name):
            def hook(module, args, out):
                outs.setdefault(name, tuple(out.shape))  # returns None: the output is left as it is
            return hook

        hooks = [self.conv(n).register_forward_hook(record(n)) for n in names]
        try:
            with torch.no_grad():
                self.base()(torch.zeros(self.input_shape(batch)))
        finally:
            for h in hooks:
                h.remove()
        return replace_layers(self.base(), {n: _Stub(outs[n]) for n in names}).eval()

    def _arch_key(self) -> Any:
        return {"model": self.request.model}

    def _net_key(self) -> Any:
        """The key of the base network's whole-network timings in the latency table."""
        return key_of(self._arch_key(), "arch")

    # -- decompositions (cached on disk, as cells cache them) -----------------------------------
    def decomposer(self, method: str):
        return self.plugins.decomposers.get(method)

    def factorization(self, cand: Candidate, in_hw=None):
        return self.decomposed(cand).factorizations[cand.layer]

    def module(self, cand: Candidate, in_hw=None) -> nn.Module:
        """The real replacement of ``cand``'s layer (its decomposition, cached)."""
        return self.decomposed(cand).replacements[cand.layer].eval()

    def timing_module(self, cand: Candidate, in_hw) -> nn.Module:
        dec = self.decomposer(cand.method)
        conv = self.conv(cand.layer)
        if hasattr(dec, "random_factorization"):  # no fit: a CP or HOOI fit costs seconds to minutes
            opts = {"groups": conv.groups} if conv.groups > 1 else {}
            fact = dec.random_factorization(tuple(conv.weight.shape), cand.rank, seed=0, **opts)
            return dec.build(conv, fact).eval()
        return self.module(cand, in_hw)

    def _builds_cp_block(self, method: str) -> bool:
        if method == KEEP:
            return False
        dec = self.decomposer(method)
        return isinstance(dec, CPDecomposer) and type(dec).build is CPDecomposer.build

    def _structure(self, cand: Candidate) -> str | None:
        return "cp-block" if self._builds_cp_block(cand.method) else None

    # -- stages 1-3 -------------------------------------------------------------------------------
    def prepare(self, batch: int | None = None, budgets: Sequence[float] = ()) -> Prepared:
        """Candidates, latency table and sensitivities for ``batch`` (default the request's).

        ``budgets``: the latency budgets that will be searched (``1 / target`` each). Right after the
        latency table, each is checked for reach (:class:`TargetUnreachable`, naming what the fastest
        plan reaches), so an unreachable target costs no sensitivity; then candidates no plan within the
        loosest can hold are left out before their sensitivities are computed (:func:`infeasible`)."""
        req = self.request
        batch = batch or req.batch
        base = self.base()
        self.sensitivity_mode  # noqa: B018 - a bad sensitivity mode fails before anything is timed
        shapes = self.layer_shapes(batch)
        grid = speedup_grid(req.min_speedup, req.max_speedup, req.grid_points)
        table = LatencyTable.for_run(self.ctx.cache().root if self.ctx.use_cache else None,
                                     backend=req.backend, threads=req.threads, timer=self.timer)
        self.latency_table = table
        seconds: dict[str, float] = {}

        t0 = time.perf_counter()
        cands: dict[str, list[Candidate]] = {}
        for n in self.layers:
            conv = self.conv(n)
            cands[n] = layer_candidates(n, self.decomposers, tuple(conv.weight.shape), geometry(conv),
                                        shapes[n][-2:], grid)
        seconds["candidates"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        from ..kernels.forms import configure_malloc

        from ..run.stages import remember_form_choices

        configure_malloc()  # as a cell does, before any timing: both arms alike
        remember_form_choices(self.ctx)
        shares: dict[str, float] = {}
        timed: dict[str, Timed] = {}
        kept: dict[str, list[Candidate]] = {}
        dropped: dict[str, list[str]] = {}
        net_key = self._net_key()
        x_shape = self.input_shape(batch)
        self.step("timing the network without the tunable layers (the rest, timed once)")
        rest = 1.0 / table.network_ratio(net_key, "without " + ",".join(self.layers), base,
                                         lambda: self._stubbed(self.layers, batch), x_shape, self.network_timer).speedup
        for n in self.layers:
            self.step(f"timing {n}: the layer's share of the network, in place")
            ratio = table.network_ratio(net_key, f"without {n}", base, partial(self._stubbed, [n], batch),
                                        x_shape, self.network_timer)
            shares[n] = max(0.0, 1.0 - 1.0 / ratio.speedup)
            kept[n], dropped[n] = [], []
            for c in cands[n]:
                if not c.is_keep:
                    self.step(f"timing {n} {c.label} ({table.timed} timed, {len(table.store)} in the table)")
                t = table.layer_speedup(c, self.conv(n), shapes[n], partial(self.timing_module, c, shapes[n][-2:]),
                                        structure=self._structure(c))
                timed[cand_key(c)] = t
                if c.is_keep or t.speedup > 1.0:
                    kept[n].append(c)
                else:
                    dropped[n].append(c.label)
        rest, shares = normalised_shares(rest, shares)

        alone = layer_costs(shares, {}, timed, kept, 1.0)
        calibration = self._calibrate(table, net_key, rest, kept, alone, batch)
        in_place = self.kept_in_place(table, net_key, shares, timed, calibration, kept, batch)
        costs = layer_costs(shares, in_place, timed, kept, calibration["factor"])
        seconds["latency"] = time.perf_counter() - t0
        options_now = {n: [Option(c, cost, 0.0) for c, cost in zip(kept[n], costs[n])] for n in self.layers}
        top = reach(calibration, options_now, rest)
        for b in sorted(budgets):  # the tightest first: the first to fail says the most
            if 1.0 / b <= top * (1 + 1e-9):
                continue
            if "speedup_ci" not in calibration:
                check_reach(options_now, rest, b)  # raises, naming what the fastest plan is predicted to reach
            lo, hi = calibration["speedup_ci"]
            plan = ", ".join(f"{n} {label}" for n, label in calibration["plan"].items())
            raise TargetUnreachable(f"no plan reaches {1 / b:g}x: the fastest plan of these candidates ({plan}) measured "
                                    f"{calibration['speedup']:.2f}x [{lo:.2f}, {hi:.2f}] against the baseline", hi)
        out_of_reach: dict[str, list[str]] = {}
        reserve: dict[str, list[Candidate]] = {}
        loosest = max(budgets) if budgets else math.inf
        if budgets:
            far = infeasible(costs, rest, loosest)
            for n, idx in far.items():
                reserve[n] = [kept[n][i] for i in idx]
                out_of_reach[n] = [c.label for c in reserve[n]]
                costs[n] = [cost for i, cost in enumerate(costs[n]) if i not in set(idx)]
                kept[n] = [c for i, c in enumerate(kept[n]) if i not in set(idx)]
        t0 = time.perf_counter()
        options = {n: self.sensitivity.options(kept[n], costs[n]) for n in self.layers}
        seconds["sensitivity"] = time.perf_counter() - t0
        return Prepared(list(self.layers), rest, shares, options, timed, dropped=dropped, out_of_reach=out_of_reach,
                        seconds=seconds, calibration=calibration, reserve=reserve, loosest=loosest, kept=in_place)

    def admit(self, prepared: Prepared, budget: float) -> list[str]:
        """Before a search at ``budget`` looser than the one the candidates were pruned for (a drop round
        stepping back below every target): the held-back candidates a plan within ``budget`` can hold,
        scored and added to ``prepared`` in place. Returns ``"layer label"`` of each admitted."""
        if budget <= prepared.loosest or not any(prepared.reserve.values()):
            return []
        factor = prepared.calibration["factor"]
        pool = {n: [o.candidate for o in prepared.options[n]] + prepared.reserve.get(n, []) for n in prepared.layers}
        costs = layer_costs(prepared.shares, prepared.kept, prepared.timed, pool, factor)
        far = infeasible(costs, prepared.rest, budget)
        come = {n: [c for i, c in enumerate(cs) if i not in set(far.get(n, [])) and c in prepared.reserve.get(n, [])]
                for n, cs in pool.items()}
        come = {n: cs for n, cs in come.items() if cs}
        if come:
            self.step(f"admitting {sum(map(len, come.values()))} candidate(s) a search at {1 / budget:.2f}x can use")
        self.add_options(prepared, come)
        for n, cs in come.items():
            prepared.reserve[n] = [c for c in prepared.reserve[n] if c not in cs]
            prepared.out_of_reach[n] = [c.label for c in prepared.reserve[n]]
        prepared.loosest = budget
        return [f"{n} {c.label}" for n, cs in come.items() for c in cs]

    def _calibrate(self, table: LatencyTable, net_key: Any, rest: float, kept: dict[str, list[Candidate]],
                   costs: dict[str, list[float]], batch: int) -> dict[str, Any]:
        """The whole network with every layer at its fastest candidate, timed against the baseline (once,
        cached like the rest), and the factor on every layer's saving that makes its prediction its
        measurement (:func:`~cpbench.tune.latency.savings_calibration`). Layers timed alone mispredicted
        whole networks by 10-20% (measured: the character network's fastest plan 13.6x whole for 12.0x
        predicted alone, ResNet-20's 2.27x for 2.42x); one factor fitted at the fastest plan keeps the
        baseline exact. ``request.calibrate = False``: factor 1."""
        fast = {n: kept[n][min(range(len(kept[n])), key=lambda i: costs[n][i])] for n in self.layers}
        replaced = {n: c for n, c in fast.items() if not c.is_keep}
        predicted = rest + sum(min(costs[n]) for n in self.layers)
        if not replaced or not self.request.calibrate:
            return {"factor": 1.0}
        from ..nn.surgery import replace_layers

        shapes = self.layer_shapes(batch)
        label = "fastest " + ",".join(f"{n}={c.label}" for n, c in replaced.items())
        self.step("timing the whole network with every layer at its fastest candidate (the calibration)")
        t = table.network_ratio(
            net_key, label, self.base(),
            lambda: replace_layers(self.base(), {n: self.timing_module(c, shapes[n][-2:]) for n, c in replaced.items()}).eval(),
            self.input_shape(batch), self.network_timer)
        return {"factor": savings_calibration(predicted, 1.0 / t.speedup), "plan": {n: c.label for n, c in replaced.items()},
                "predicted_speedup_alone": 1.0 / predicted, "speedup": t.speedup, "speedup_ci": list(t.speedup_ci)}

    def kept_in_place(self, table: LatencyTable, net_key: Any, shares: dict[str, float], timed: dict[str, Timed],
                      calibration: dict[str, Any], pool: dict[str, list[Candidate]], batch: int) -> dict[str, float]:
        """Each layer's cost kept whole in a compressed network, a fraction of the baseline's latency: the
        fastest plan (the calibration's) timed against the same plan with that layer kept (in this process,
        ``request.network_budget``, cached like the rest); the layer then costs the fastest candidate's
        calibrated cost plus the difference, ``(t(with it kept) − t(fastest)) / t(baseline)``. The keep
        option's cost in every plan that replaces a layer (:class:`Prepared` ``kept``).

        Why: a layer's share is timed in the baseline, and a layer kept beside compressed ones need not cost
        that. On the character network (mkl, one thread, batch 1), with conv2 and conv3 as CP blocks, keeping
        conv1 cost 0.038 of the baseline's latency against its share of 0.09-0.12 (twice each,
        interleaved); the profiler gave conv1's own GEMM 54 and 62 us in the two networks, the rest is the
        dense network's memory traffic around it. Plans that kept conv1 measured 25-45% faster than
        predicted. Empty without a calibration plan or with one layer (that plan with it kept is the baseline)."""
        plan = calibration.get("plan")
        if not plan or len(self.layers) < 2 or "speedup" not in calibration:
            return {}
        from ..nn.surgery import replace_layers

        by_label = {n: {c.label: c for c in pool[n]} for n in plan}
        cands = {n: by_label[n][label] for n, label in plan.items()}
        shapes = self.layer_shapes(batch)

        def build(keep: str | None = None) -> nn.Module:
            return replace_layers(self.base(), {n: self.timing_module(c, shapes[n][-2:])
                                                for n, c in cands.items() if n != keep}).eval()

        fastest_net = build()
        label = "fastest " + ",".join(f"{n}={c.label}" for n, c in cands.items())
        out: dict[str, float] = {}
        for n, c in cands.items():
            self.step(f"timing {n} kept whole in the fastest plan")
            t = table.network_ratio(net_key, f"{label} with {n} kept", fastest_net, partial(build, n),
                                    self.input_shape(batch), self.in_place_timer)
            fast_cost = option_cost(shares[n], timed[cand_key(c)], calibration["factor"])
            out[n] = max(0.0, fast_cost + (1.0 / t.speedup - 1.0) / calibration["speedup"])
        return out

    @property
    def sensitivity(self) -> Sensitivities:
        """This tune's sensitivities (:mod:`.sensitivity`): cached under ``<cache>/sensitivity/``, and in
        this tuner; the scorer is built (one evaluation of the base network) when the first is computed."""
        if not hasattr(self, "_sensitivity"):
            from ..nn.surgery import replace_layers
            from ..run.stages import weights_key

            mode = self.sensitivity_mode
            score: list[Callable[[nn.Module], float]] = []

            def measure(c: Candidate) -> float:
                if mode == "error":
                    return 100.0 * self.factorization(c).rel_error
                if not score:
                    score.append(self._scorer(mode))
                return score[0](replace_layers(self.base(), {c.layer: self.module(c)}).eval())

            store = JsonStore(self.ctx.cache().root / "sensitivity" / "sensitivity.json" if self.ctx.use_cache else None)
            self._sensitivity = Sensitivities(
                mode, measure=measure, version=lambda m: getattr(self.decomposer(m), "version", "0"), store=store,
                context=key_of(mode, weights_key(self.base()), self.request.val_samples, self.request.seed), step=self.step)
        return self._sensitivity

    def _scorer(self, mode: str) -> Callable[[nn.Module], float]:
        """``loss(model)`` in points against the base network (:func:`.sensitivity.scorer`)."""
        return scorer(mode, self.base(), self.validation, self.input_shape(1)[1:], self.request.seed)

    def validation(self):
        """The split sensitivities are measured on: the data set's ``val`` split; for one with only
        train and test (your own image folder, IDX, NPZ), the last ``VAL_FROM_TRAIN`` of the training
        split in its fixed order (never the test split: it measures the chosen plan, and choosing on it
        would flatter the result). ``val_samples`` caps either."""
        from ..run import stages

        size = self.request.val_samples
        try:
            return stages.dataset(self.plugins, self.dataset, "val", replace(self.ctx, dataset_size={"val": size}))
        except UsageError as e:
            if "split" not in str(e):
                raise
        x, y = stages.dataset(self.plugins, self.dataset, "train", self.ctx).tensors
        n = len(y)
        k = min(size or max(1, int(n * VAL_FROM_TRAIN)), n)
        return torch.utils.data.TensorDataset(x[n - k:], y[n - k:])

    # -- stage 4: search and verify one target ---------------------------------------------------
    def compressed(self, selection: Selection) -> nn.Module:
        from ..nn.surgery import replace_layers

        shapes1 = self.layer_shapes(1)
        repl = {n: self.module(o.candidate, shapes1[n][-2:]) for n, o in selection.choice.items()
                if not o.candidate.is_keep}
        return replace_layers(self.base(), repl).eval()

    def measure(self, selection: Selection, batch: int) -> Measured:
        """A verify round's timing of the whole network with ``selection``, kept in the latency table like
        every timing the search rests on, so a repeated tune on this machine walks the same rounds to the
        same plans and fine-tunes nothing again. Re-timed, a repeat on a noisy host (intervals ±10%) chose
        other plans in its verify rounds and fine-tuned each anew (3 fine-tunes of about 3 minutes). The
        tuned plan's row is always timed afresh (:meth:`finish`)."""
        labels = selection.labels()
        self.step(f"timing the whole network: {', '.join(f'{n} {l}' for n, l in labels.items())}")
        assert self.latency_table is not None, "prepare() makes the latency table a search's plans are verified with"
        variant = plan_variant(labels)
        t = self.latency_table.network_ratio(self._net_key(), variant, self.base(), lambda: self.compressed(selection),
                                             self.input_shape(batch), self.network_timer)
        lo, hi = t.speedup_ci
        return Measured(t.speedup, (lo, hi), t)

    def joint_search(self, prepared: Prepared, budget: float) -> Selection:
        """The search's plans under the loss shapes of :data:`JOINT_EXPONENTS`, each scored with all its
        layers replaced at once (the sensitivity's measure on the same split), the least loss chosen.
        With ``sensitivity = "error"`` (no data to score on) the plain search. Each call is logged in
        :attr:`joint_log` (the row's ``tune.joint``)."""
        mode = self.sensitivity_mode
        exponents = (1.0,) if mode == "error" else JOINT_EXPONENTS

        all_kept = prepared.all_kept_cost if prepared.kept else None

        def plans_of(exclude: list[dict[str, str]]) -> list[tuple[float, Selection]]:
            if self.sensitivity.lazy:
                self.sensitivity.refresh(prepared.options)
                return lazy_plans(prepared.options, prepared.rest, budget, self.sensitivity.resolve, exponents,
                                  exclude=exclude, all_kept=all_kept)
            return shaped_plans(prepared.options, prepared.rest, budget, exponents, exclude=exclude, all_kept=all_kept)

        try:
            plans = plans_of(prepared.excluded)
        except TargetUnreachable:
            if not prepared.excluded:
                raise
            # every plan of this budget compresses each layer at least as much as a plan that lost: the search
            # as without exclusions (drops.tune_target then counts its plan lost without fine-tuning it)
            plans = plans_of([])
        if len(plans) == 1:
            return plans[0][1]
        if self._joint_scorer is None:
            self._joint_scorer = self._scorer(mode)
        scored = []
        for p, sel in plans:
            self.step(f"scoring the plan of loss exponent {p:g} with every layer replaced ({mode})")
            scored.append((self._joint_scorer(self.compressed(sel)), p, sel))
        best = min(scored, key=lambda t: t[0])
        self.joint_log.append({"budget": budget, "chosen_exponent": best[1],
                               "plans": [{"exponent": p, "summed_loss": sel.loss, "joint_loss": j,
                                          "predicted_speedup": sel.predicted_speedup} for j, p, sel in scored]})
        return best[2]

    def plan(self, prepared: Prepared, target: float, batch: int | None = None, *,
             max_rounds: int | None = None) -> TuneOutcome:
        """Search and verify ``target`` (:func:`~cpbench.tune.loop.tighten_loop`, at most ``max_rounds``
        verify rounds, default ``request.max_rounds``). On a miss, or an
        overshoot, the savings' calibration is refitted to the plan just measured (:func:`recalibrated`)
        and the search runs again at the target's budget; each refit is logged in :attr:`calibration_log`
        (the row's ``tune.calibration.rounds``). Once a whole network has been verified in this tune (an
        earlier target, an earlier drop round), the first search already uses the model refitted to the
        verified plan nearest the target in speed (:func:`nearest_verified`): the fastest plan the
        calibration times is far from most targets, and one factor fitted there mispredicted the
        character network's 8x and 10x plans by 18-19%."""
        batch = batch or self.request.batch
        self.admit(prepared, 1.0 / target)
        self.joint_log = []
        self.calibration_log = []
        verified = self.verified.setdefault(batch, [])
        current = [prepared]
        near = nearest_verified(verified, target) if self.request.calibrate else None

        def refit_to(labels: dict[str, str], speedup: float, **note: str) -> None:
            current[0] = recalibrated(prepared, labels, speedup)
            self.calibration_log.append({"plan": dict(labels), "speedup": speedup,
                                         "factor": current[0].calibration["factor"], **note})

        if near is not None:
            near_labels, near_speedup = near
            refit_to(near_labels, near_speedup, **{"from": "an earlier verified plan"})

        def refit(sel: Selection, m: Measured) -> None:
            refit_to(sel.labels(), m.speedup)

        def measure(sel: Selection) -> Measured:
            m = self.measure(sel, batch)
            verified.append((sel.labels(), m.speedup))
            return m

        def search(budget: float) -> Selection:
            try:
                return self.joint_search(current[0], budget)
            except TargetUnreachable:
                # within the fastest plan's measured interval (the tune's reach) but beyond its point: the
                # fastest plan is searched and measured, and the measurement decides
                p = current[0]
                fastest_cost = fastest(p.options, p.rest).cost
                if budget >= fastest_cost or 1.0 / budget > reach(prepared.calibration, prepared.options, prepared.rest):
                    raise
                return self.joint_search(p, fastest_cost * (1 + 1e-9))

        return tighten_loop(search, measure, target,
                            max_rounds=max_rounds or self.request.max_rounds,
                            recalibrate=refit if self.request.calibrate else None)

    def tune_target(self, prepared: Prepared, target: float, *, started: float | None = None, cell=None,
                    batch: int | None = None, label: str | None = None) -> tuple[dict, Plan, list[Attempt]]:
        """Stage 6, hold ``--max-drop``: :func:`.drops.tune_target`."""
        from .drops import tune_target

        return tune_target(self, prepared, target, started=started, cell=cell, batch=batch, label=label)

    def add_options(self, prepared: Prepared, cands: dict[str, list[Candidate]]) -> None:
        """Timed candidates added to ``prepared``'s options, costed at its calibration and scored as the
        grid's are (:meth:`.sensitivity.Sensitivities.options`)."""
        factor = prepared.calibration["factor"]
        costs = layer_costs(prepared.shares, prepared.kept, prepared.timed, cands, factor)
        for n, cs in cands.items():
            prepared.options[n] += self.sensitivity.options(cs, costs[n])

    # -- stage 5: fine-tune, evaluate, time; the row and the plan ---------------------------------
    def target_cell(self, target: float, batch: int):
        """The cell a tuned row of ``target`` stands for (when the tune does not run for a matrix's)."""
        from ..run.matrix import Cell

        req = self.request
        return Cell(model=dict(req.model), layers=list(self.layers), decomposer={"name": "tuned"},
                    rank={"target_speedup": target}, backend=req.backend, threads=req.threads, batch=batch,
                    finetune_epochs=req.finetune_epochs, seed=req.seed)

    def finish(self, prepared: Prepared, target: float, outcome: TuneOutcome, batch: int | None = None,
               *, started: float | None = None, cell=None) -> tuple[dict, Plan]:
        """Stage 5, fine-tune, evaluate and time the verified plan: :func:`.finish.finish`."""
        from .finish import finish

        return finish(self, prepared, target, outcome, batch, started=started, cell=cell)

    def decomposed(self, cand: Candidate):
        """``cand``'s layer decomposed by the cell's compress stage (the same cache as cells)."""
        from ..nn.surgery import layer_input_shapes
        from ..run import stages
        from ..run.matrix import Cell

        base_net = self.base()
        x1 = torch.zeros(self.input_shape(1))
        one = stages.Base(spec=dict(self.request.model), model=base_net, plugin=self.model_plugin, layers=[cand.layer],
                          convs={cand.layer: self.conv(cand.layer)}, input_shape=self.input_shape(1)[1:], example=x1,
                          layer_shapes=layer_input_shapes(base_net, x1, [cand.layer]), dataset=self.dataset)
        cell = Cell(model=dict(self.request.model), layers=[cand.layer], decomposer={"name": cand.method},
                    rank=cand.rank, backend=self.request.backend, threads=self.request.threads, batch=1,
                    finetune_epochs=0, seed=self.request.seed)
        return stages.compress(one, self.decomposer(cand.method), cell, self.ctx)
