"""The multiple-choice knapsack: exact against brute force on small cases."""
import random

import pytest

from cpbench.tune.candidates import Candidate
from cpbench.tune.search import Option, TargetUnreachable, brute_force, fastest, search


def _options(rng, layers, per_layer, *, grid=None):
    out = {}
    for li in range(layers):
        name = f"l{li}"
        opts = [Option(Candidate(name, "keep", None), 0.3, 0.0)]
        for k in range(per_layer):
            cost = rng.randint(1, 30) * grid if grid else rng.uniform(0.001, 0.3)
            opts.append(Option(Candidate(name, "m", k + 1), cost, rng.uniform(0.0, 10.0)))
        out[name] = opts
    return out


def _grid_case(rng, bins: int = 400):
    """Options with costs on a grid the DP resolves exactly (``bins`` steps of the budget)."""
    opts = _options(rng, rng.randint(1, 4), rng.randint(1, 5), grid=0.001)
    return opts, 0.1, 0.1 + bins * 0.001, bins


@pytest.mark.parametrize("seed", range(30))
def test_search_matches_brute_force_on_grid_costs(seed):
    # costs on a grid the DP resolves exactly: the DP's plan must be the brute-force optimum
    opts, rest, budget, bins = _grid_case(random.Random(seed))
    try:
        want = brute_force(opts, rest, budget)
    except TargetUnreachable:
        with pytest.raises(TargetUnreachable):
            search(opts, rest, budget, bins=bins)
        return
    got = search(opts, rest, budget, bins=bins)
    assert got.loss == pytest.approx(want.loss, abs=1e-12)
    assert got.cost <= budget + 1e-12


@pytest.mark.parametrize("seed", range(30))
def test_search_on_real_costs_meets_budget_and_bound(seed):
    # arbitrary costs: always within budget, and no worse than the best plan with step·layers to spare
    rng = random.Random(100 + seed)
    layers = rng.randint(1, 4)
    opts = _options(rng, layers, rng.randint(1, 5))
    rest, budget, bins = 0.05, rng.uniform(0.2, 1.0), 1000
    try:
        got = search(opts, rest, budget, bins=bins)
    except TargetUnreachable:
        with pytest.raises(TargetUnreachable):
            brute_force(opts, rest, budget)
        return
    assert got.cost <= budget + 1e-12
    assert got.loss >= brute_force(opts, rest, budget).loss - 1e-12  # nothing beats the true optimum
    step = (budget - rest) / bins
    try:
        tight = brute_force(opts, rest, budget - layers * step)
    except TargetUnreachable:
        return
    assert got.loss <= tight.loss + 1e-12


def test_search_prefers_lower_cost_on_equal_loss():
    a = Option(Candidate("x", "m", 1), 0.2, 1.0)
    b = Option(Candidate("x", "m", 2), 0.1, 1.0)
    got = search({"x": [a, b]}, 0.0, 0.5)
    assert got.choice["x"] is b


def test_unreachable_names_the_fastest_plan():
    opts = {"x": [Option(Candidate("x", "keep", None), 0.5, 0.0), Option(Candidate("x", "m", 3), 0.25, 2.0)]}
    with pytest.raises(TargetUnreachable, match=r"reaches 1\.82x") as info:
        search(opts, 0.3, 0.5)
    assert info.value.best_speedup == pytest.approx(1 / 0.55)
    assert fastest(opts, 0.3).choice["x"].candidate.rank == 3


@pytest.mark.parametrize("seed", range(20))
def test_pruning_out_of_reach_candidates_changes_no_plan_of_that_budget_or_a_tighter_one(seed):
    # the tune drops what `infeasible` names before computing sensitivities: for the loosest budget
    # and every tighter one, brute force over what is left finds the same least loss as over all
    from cpbench.tune.search import infeasible

    rng = random.Random(seed)
    opts = _options(rng, rng.randint(1, 4), rng.randint(1, 5))
    rest, loosest = 0.1, rng.uniform(0.3, 0.9)
    far = infeasible({n: [o.cost for o in os] for n, os in opts.items()}, rest, loosest)
    left = {n: [o for i, o in enumerate(os) if i not in far.get(n, [])] for n, os in opts.items()}
    assert all(left.values())
    for budget in (loosest, loosest * 0.8, loosest * 0.6):
        try:
            want = brute_force(opts, rest, budget)
        except TargetUnreachable:
            with pytest.raises(TargetUnreachable):
                brute_force(left, rest, budget)
            continue
        assert brute_force(left, rest, budget).loss == pytest.approx(want.loss, abs=1e-12)


def test_pruning_drops_what_cannot_fit_and_nothing_when_no_plan_fits():
    from cpbench.tune.search import infeasible

    costs = {"a": [0.5, 0.2, 0.05], "b": [0.3, 0.1]}
    # rest 0.1: cheapest plan 0.25; a=0.5 needs 0.7 and b=0.3 needs 0.45, both above 0.4
    assert infeasible(costs, 0.1, 0.4) == {"a": [0], "b": [0]}
    assert infeasible(costs, 0.1, 1.0) == {"a": [], "b": []}
    assert infeasible(costs, 0.1, 0.2) == {}  # nothing fits: the search reports what the fastest reaches


def _two_layer_case():
    # at budget 0.5 a plan fits either one heavy cut (loss 4 on a) or two mild ones (loss 2.5 + 2.5 on a and b)
    a, b = "a", "b"
    return {
        a: [Option(Candidate(a, "keep", None), 0.4, 0.0), Option(Candidate(a, "m", 1), 0.05, 4.0),
            Option(Candidate(a, "m", 2), 0.2, 2.5)],
        b: [Option(Candidate(b, "keep", None), 0.3, 0.0), Option(Candidate(b, "m", 1), 0.1, 2.5)],
    }


def test_shaped_plans_are_the_searches_under_each_loss_shape_with_real_losses():
    from cpbench.tune.search import shaped_plans

    opts = _two_layer_case()
    plans = shaped_plans(opts, 0.1, 0.5, (0.5, 1.0, 2.0))
    # p = 0.5: 2 < 1.58 + 1.58, so the one heavy cut; p = 2: 16 > 6.25 + 6.25, so the two mild ones
    assert [p for p, _ in plans] == [0.5, 2.0]  # p = 1 repeats p = 0.5's plan (4 < 5): listed once
    heavy, mild = plans[0][1], plans[1][1]
    assert heavy.labels() == {"a": "m:1", "b": "keep"} and mild.labels() == {"a": "m:2", "b": "m:1"}
    assert heavy.loss == 4.0 and mild.loss == 5.0  # the real summed losses, not the shaped ones
    for _, sel in plans:
        assert sel.cost <= 0.5 + 1e-12
    assert shaped_plans(opts, 0.1, 0.5)[0][1].labels() == search(opts, 0.1, 0.5).labels()


@pytest.mark.parametrize("joint,chosen", [({4.0: 1.0, 5.0: 3.0}, 4.0), ({4.0: 9.0, 5.0: 3.0}, 5.0)])
def test_the_tuner_takes_the_plan_of_least_joint_loss(joint, chosen):
    from types import SimpleNamespace

    from cpbench.tune.pipeline import Tuner
    from cpbench.tune.prepared import Prepared

    opts = _two_layer_case()
    prepared = Prepared(["a", "b"], 0.1, {"a": 0.4, "b": 0.3}, opts, {})
    fake = SimpleNamespace(sensitivity_mode="kl", sensitivity=SimpleNamespace(lazy=False), _joint_scorer=lambda net: joint[net], joint_log=[],
                           compressed=lambda sel: sel.loss, step=lambda s: None)
    got = Tuner.joint_search(fake, prepared, 0.5)
    assert got.loss == chosen
    (log,) = fake.joint_log
    assert [p["joint_loss"] for p in log["plans"]] == [joint[4.0], joint[5.0]]
    assert log["chosen_exponent"] == (0.5 if chosen == 4.0 else 2.0)
    fake.sensitivity_mode = "error"  # no data to score plans on: the plain search
    assert Tuner.joint_search(fake, prepared, 0.5).labels() == search(opts, 0.1, 0.5).labels()


@pytest.mark.parametrize("seed", range(20))
def test_lazy_plans_are_the_plans_of_the_exact_losses_resolving_only_what_a_search_chose(seed):
    """Losses left unknown at their lower bound 0, computed only when a search's plan holds them: the
    plans are those of every loss known, and every resolved option was in some search's plan."""
    from cpbench.tune.search import lazy_plans, shaped_plans

    rng = random.Random(300 + seed)
    bins = 400
    rest, budget = 0.1, 0.1 + bins * 0.001
    exact = _options(rng, rng.randint(1, 4), rng.randint(1, 5), grid=0.001)
    lazy = {n: [o if o.candidate.method == "keep" else Option(o.candidate, o.cost, 0.0, known=False) for o in opts]
            for n, opts in exact.items()}
    truth = {o.candidate: o for opts in exact.values() for o in opts}
    resolved = []

    def resolve(pending):
        resolved.extend(o.candidate for opts in pending.values() for o in opts)
        return {n: [truth[o.candidate] for o in opts] for n, opts in pending.items()}

    try:
        want = shaped_plans(exact, rest, budget, (0.5, 1.0, 2.0), bins=bins)
    except TargetUnreachable:
        with pytest.raises(TargetUnreachable):
            lazy_plans(lazy, rest, budget, resolve, (0.5, 1.0, 2.0), bins=bins)
        return
    got = lazy_plans(lazy, rest, budget, resolve, (0.5, 1.0, 2.0), bins=bins)
    assert [sel.loss for _, sel in got] == pytest.approx([sel.loss for _, sel in want], abs=1e-12)
    assert all(o.known for _, sel in got for o in sel.choice.values())
    assert len(resolved) == len(set(resolved))  # each computed once, written back into the options
    assert all(truth[c] in lazy[c.layer] for c in resolved)


def test_lazy_plans_leave_a_candidate_no_plan_can_afford_well_unresolved():
    """A slow option of a layer that would force the other layer to its costly-in-loss fast option is
    never computed once the fast options' losses are known to be large."""
    from cpbench.tune.search import lazy_plans

    def c(layer, rank):
        return Candidate(layer, "m", rank)

    exact = {"a": [Option(c("a", 1), 0.10, 50.0), Option(c("a", 9), 0.40, 1.0), Option(c("a", 30), 0.85, 0.5)],
             "b": [Option(c("b", 1), 0.10, 40.0), Option(c("b", 9), 0.40, 1.0)]}
    truth = {o.candidate: o for opts in exact.values() for o in opts}
    # a:30 and b:1 fit the budget together; once both fast options are known, a:30 is never worth it
    lazy = {n: [o if o.candidate.rank == 1 else Option(o.candidate, o.cost, 0.0, known=False) for o in opts]
            for n, opts in exact.items()}
    resolved = []

    def resolve(pending):
        resolved.extend(o.candidate for opts in pending.values() for o in opts)
        return {n: [truth[o.candidate] for o in opts] for n, opts in pending.items()}

    (_, sel), = lazy_plans(lazy, 0.0, 0.95, resolve)
    assert sel.labels() == {"a": "m:9", "b": "m:9"} and c("a", 30) not in resolved


def test_a_budget_at_the_fastest_plans_cost_returns_it_though_the_bins_round_it_out():
    """Costs are rounded up to whole bins per layer: three layers at 1/3 each, searched at exactly their sum,
    round to more bins than the budget holds. The fastest plan fits and is the answer (a tune searches
    there when a target is within the fastest plan's measured interval); on a fresh venv this raised
    IndexError."""
    opts = {f"l{i}": [Option(Candidate(f"l{i}", "keep", None), 0.5, 0.0),
                      Option(Candidate(f"l{i}", "m", 1), 1 / 3, 1.0)] for i in range(3)}
    fast = fastest(opts, 0.0)
    sel = search(opts, 0.0, fast.cost * (1 + 1e-9))
    assert sel.labels() == fast.labels() and sel.cost <= fast.cost * (1 + 1e-9)
    with pytest.raises(TargetUnreachable):
        search(opts, 0.0, fast.cost * (1 - 1e-6))


def _against_brute_force(opts, rest, budget, bins, unreachable: str, **kw):
    """The search's plan, checked to be the brute-force optimum within the budget; None where brute force finds
    no plan, and the search must say so (``unreachable`` in its message)."""
    try:
        want = brute_force(opts, rest, budget, **kw)
    except TargetUnreachable:
        with pytest.raises(TargetUnreachable, match=unreachable):
            search(opts, rest, budget, bins=bins, **kw)
        return None
    got = search(opts, rest, budget, bins=bins, **kw)
    assert got.loss == pytest.approx(want.loss, abs=1e-12) and got.cost <= budget + 1e-12
    return got


@pytest.mark.parametrize("seed", range(30))
def test_search_outside_excluded_plans_matches_brute_force(seed):
    """Plans at least as coarse in every layer as an excluded one are ruled out; the branching search finds the
    optimum of the rest exactly (grid costs), or says that nothing is left."""
    from cpbench.tune.search import excluded_by

    rng = random.Random(500 + seed)
    opts, rest, budget, bins = _grid_case(rng)
    try:
        free = brute_force(opts, rest, budget)
    except TargetUnreachable:
        return
    # exclude the unconstrained optimum and, half the time, a random other plan
    exclude = [free.labels()]
    if seed % 2:
        exclude.append({n: rng.choice(o).candidate.label for n, o in opts.items()})
    got = _against_brute_force(opts, rest, budget, bins, "excluded", exclude=exclude)
    if got is None:
        return
    assert excluded_by(got.labels(), exclude) is None
    assert got.loss >= free.loss - 1e-12


def test_excluded_by_orders_ranks_of_one_method_only():
    from cpbench.tune.search import excluded_by

    lost = {"a": "m:4", "b": "m:8"}
    assert excluded_by({"a": "m:4", "b": "m:8"}, [lost]) == lost  # the plan itself
    assert excluded_by({"a": "m:2", "b": "m:8"}, [lost]) == lost  # coarser in one layer, equal in the other
    assert excluded_by({"a": "m:5", "b": "m:2"}, [lost]) is None  # finer in one layer
    assert excluded_by({"a": "keep", "b": "m:1"}, [lost]) is None  # a layer kept is finer than any rank
    assert excluded_by({"a": "n:1", "b": "m:1"}, [lost]) is None  # another method is not ordered against m
    assert excluded_by({"a": "m:4"}, [lost]) is None  # a layer not named is kept


@pytest.mark.parametrize("seed", range(30))
def test_a_plan_keeping_every_layer_costs_the_baseline_whatever_the_keep_options_cost(seed):
    """With the keep options costed as layers kept in a compressed network (cheaper than their shares), the
    plan that keeps every layer is the baseline: at ``all_kept``, never inside a budget that is not. The
    search finds the optimum exactly against brute force (grid costs), or says that nothing fits."""
    rng = random.Random(900 + seed)
    opts, rest, budget, bins = _grid_case(rng)
    opts = {n: [Option(o.candidate, rng.randint(0, 20) * 0.001, 0.0) if o.candidate.is_keep else o for o in os]
            for n, os in opts.items()}
    additive = rest + sum(o.cost for os in opts.values() for o in os if o.candidate.is_keep)
    assert additive <= budget  # the keep options alone fit: the case the guard is for
    all_kept = budget + 0.05 if seed % 3 else budget - 0.001 * rng.randint(0, 5)
    got = _against_brute_force(opts, rest, budget, bins, "replacing a layer", all_kept=all_kept)
    if got is None:
        return
    keeps_all = all(o.candidate.is_keep for o in got.choice.values())
    assert keeps_all == (all_kept <= budget)  # zero loss wins where it fits, and only there
    if keeps_all:
        assert got.cost == all_kept
    # without the guard the search keeps every layer, predicted inside the budget
    assert all(o.candidate.is_keep for o in search(opts, rest, budget, bins=bins).choice.values())
