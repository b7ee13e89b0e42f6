"""The tighten-and-retry loop on a fake timer."""
import math

import pytest

from cpbench.tune.candidates import Candidate
from cpbench.tune.loop import Attempt, Measured, hold_drop, tighten_loop
from cpbench.tune.search import Option, TargetUnreachable, search

# one layer of share 0.9 (rest 0.1); option k has layer speedup k; loss falls with the speedup
OPTIONS = {"conv": [Option(Candidate("conv", "m", k), 0.9 / k, 1.0 / (100 - k)) for k in range(1, 60)]}


def _search(budget):
    return search(OPTIONS, 0.1, budget)


class FakeTimer:
    """Measures a plan's speedup as its prediction times ``realised`` (< 1: the prediction is optimistic)."""

    def __init__(self, realised, ci_rel=0.02):
        self.realised, self.ci_rel, self.calls = realised, ci_rel, []

    def __call__(self, sel):
        s = sel.predicted_speedup * self.realised
        self.calls.append(sel.labels()["conv"])
        return Measured(s, (s * (1 - self.ci_rel), s * (1 + self.ci_rel)))


def test_met_first_round():
    out = tighten_loop(_search, FakeTimer(1.0), 4.0)
    assert out.met and out.stopped == "met" and len(out.rounds) == 1
    assert out.selection.predicted_speedup >= 4.0


def test_miss_tightens_by_the_miss_and_meets():
    timer = FakeTimer(0.8)
    out = tighten_loop(_search, timer, 4.0)
    assert out.met and len(out.rounds) >= 2
    first, second = out.rounds[0], out.rounds[1]
    assert second.budget == pytest.approx(first.budget * first.speedup / 4.0)
    assert out.measured.speedup_ci[1] >= 4.0
    assert len(set(timer.calls)) == len(timer.calls)  # no plan timed twice


def test_within_interval_is_not_a_miss_but_a_point_short_of_the_target_tries_once_more():
    # measured 3.9 with interval up to 4.06: not beyond the interval (met), but its point is short of 4x
    out = tighten_loop(_search, FakeTimer(0.975, ci_rel=0.04), 4.0)
    assert out.met and len(out.rounds) == 2 and out.rounds[0].speedup < 4.0
    assert out.measured.speedup >= 4.0  # the second plan's point reaches the target: kept
    assert out.rounds[1].budget == pytest.approx(out.rounds[0].budget * out.rounds[0].speedup / 4.0)
    # no round left: the first, met within its interval
    one = tighten_loop(_search, FakeTimer(0.975, ci_rel=0.04), 4.0, max_rounds=1)
    assert one.met and len(one.rounds) == 1 and one.measured.speedup < 4.0


def test_a_retry_whose_point_is_still_short_keeps_the_plan_of_least_loss():
    class Short(FakeTimer):  # every plan measures 2% under 4x (its interval reaches 4x)
        def __call__(self, sel):
            self.calls.append(sel.labels()["conv"])
            return Measured(3.92, (3.8, 4.05))

    out = tighten_loop(_search, Short(1.0), 4.0)
    assert out.met and len(out.rounds) == 3 and len({tuple(r.plan.items()) for r in out.rounds}) == 3
    # none reached 4x by its point: the first, the slowest and so the least loss here, is kept
    assert out.selection.labels() == out.rounds[0].plan


def test_bounded_rounds_report_best():
    out = tighten_loop(_search, FakeTimer(0.2), 4.0, max_rounds=2)
    assert not out.met and out.stopped in ("max-rounds", "unreachable") and len(out.rounds) <= 2
    assert out.measured.speedup == max(r.speedup for r in out.rounds)


def test_unreachable_after_tightening_ends_the_loop():
    out = tighten_loop(_search, FakeTimer(0.5), 6.0, max_rounds=10)
    assert not out.met and out.stopped == "unreachable"


def test_unreachable_first_search_propagates():
    with pytest.raises(TargetUnreachable):
        tighten_loop(_search, FakeTimer(1.0), 50.0)


def test_a_miss_refits_the_model_and_searches_at_the_targets_own_budget():
    """With ``recalibrate``, a miss corrects the model (here: the costs of every option) and the next
    search runs at 1/target again, so the next plan's prediction already holds the last miss."""
    realised = 0.8
    state = {"scale": 1.0}

    def search_(budget):  # costs as the model currently believes them
        opts = {"conv": [Option(o.candidate, o.cost * state["scale"], o.loss) for o in OPTIONS["conv"]]}
        return search(opts, 0.1, budget)

    def measure(sel):  # the truth: every layer cost is 1/realised of what the uncalibrated model says
        cost = 0.1 + (sel.cost - 0.1) / state["scale"] / realised
        s = 1 / cost
        return Measured(s, (0.99 * s, 1.01 * s))

    refits = []

    def refit(sel, m):
        raw = 0.1 + (sel.cost - 0.1) / state["scale"]
        state["scale"] = (1 / m.speedup - 0.1) / (raw - 0.1)
        refits.append(state["scale"])

    out = tighten_loop(search_, measure, 4.0, recalibrate=refit)
    assert out.met and len(out.rounds) == 2 and refits == [pytest.approx(1 / realised)]
    first, second = out.rounds
    assert first.budget == second.budget == pytest.approx(1 / 4.0)
    assert second.predicted_speedup == pytest.approx(second.speedup)  # the refitted model is right
    assert first.predicted_speedup > 1.1 * first.speedup


# -- holding --max-drop: step back to slower plans ----------------------------------------------

class FakeFineTune:
    """A plan searched at target t measures t x and loses ``slope * (t - 1)`` points after fine-tuning."""

    def __init__(self, slope, drop=True):
        self.slope, self.drop, self.calls = slope, drop, []

    def __call__(self, t):
        self.calls.append(t)
        return Attempt(t, t, self.slope * (t - 1) if self.drop else None)


def test_a_plan_within_the_drop_is_kept_without_stepping_back():
    ft = FakeFineTune(0.1)
    kept, tried = hold_drop(ft, 8.0, 1.0)
    assert kept.target == 8.0 and len(tried) == 1 and ft.calls == [8.0]


def test_a_plan_over_the_drop_steps_back_by_false_position_and_keeps_the_fastest_within():
    ft = FakeFineTune(0.5)  # holds 1 point up to 3x
    kept, tried = hold_drop(ft, 9.0, 1.0, rounds=2)
    # 9x lost 4 points, 4x the allowance: (ln s)^2 = (ln 9)^2 / 4, the log-midpoint sqrt(1 * 9)
    assert ft.calls[0] == 9.0 and ft.calls[1] == pytest.approx(3.0)
    # 3x held at exactly 1 point: the model says 3x is the answer, the step goes the least share up
    assert ft.calls[2] == pytest.approx(3 * 3 ** 0.25)
    assert kept.target == pytest.approx(3.0) and kept.holds(1.0) and len(tried) == 3


@pytest.mark.parametrize("drop, share", [(4.0, 0.5), (1.5, math.sqrt(1 / 1.5)), (1.1, 0.9), (40.0, 0.25)])
def test_the_step_back_is_near_a_plan_that_lost_little_and_far_from_one_that_lost_much(drop, share):
    from cpbench.tune.loop import step_back

    base, lost = Attempt(1.0, 1.0, 0.0), Attempt(8.0, 7.5, drop)
    assert step_back(base, lost, 1.0) == pytest.approx(7.5 ** share)  # clamped to [0.25, 0.9] of the bracket
    held = Attempt(4.0, 4.0, 0.5)
    s = step_back(held, lost, 1.0)
    assert 4.0 < s < 7.5
    x = math.sqrt(math.log(4) ** 2 + (0.5 / (drop - 0.5)) * (math.log(7.5) ** 2 - math.log(4) ** 2))
    assert math.log(s) == pytest.approx(min(max(x, math.log(4) + 0.25 * math.log(7.5 / 4)), math.log(4) + 0.9 * math.log(7.5 / 4)))
    assert step_back(base, Attempt(8.0, 7.5, None), 1.0) == pytest.approx(7.5 ** 0.5)  # no drop known: midpoint


def test_when_nothing_holds_the_least_loss_is_kept_and_the_rounds_are_bounded():
    ft = FakeFineTune(100.0)
    kept, tried = hold_drop(ft, 9.0, 1.0, rounds=3)
    assert len(tried) == 4 and not kept.holds(1.0)
    assert kept is min(tried, key=lambda a: a.drop)
    assert hold_drop(FakeFineTune(100.0), 9.0, 1.0, rounds=0)[0].target == 9.0


def test_known_plans_of_other_targets_narrow_the_bracket():
    ft = FakeFineTune(0.5)
    hold_drop(ft, 4.0, 1.0, rounds=1, known=[Attempt(2.5, 2.5, 0.75), Attempt(6.0, 6.0, 2.5)])
    assert ft.calls[0] == 4.0  # inside the known bracket, not hopeless (the model says 1.3 points): tried
    # then between the fastest held (2.5x, known) and the slowest failed (its own 4x, 1.5 points)
    from cpbench.tune.loop import step_back

    assert ft.calls[1] == pytest.approx(step_back(Attempt(2.5, 2.5, 0.75), Attempt(4.0, 4.0, 1.5), 1.0))
    assert 2.5 < ft.calls[1] < 4.0


def test_a_target_the_known_plans_show_hopeless_is_not_fine_tuned():
    """Through a plan that held (2.5x, 0.75 points) and one that lost (6x, 2.5 points), the convex drop
    reaches 3.7 points at 9x: not worth a fine-tuning; the steps start from the known bracket."""
    from cpbench.tune.loop import hopeless

    known = [Attempt(2.5, 2.5, 0.75), Attempt(6.0, 6.0, 2.5)]
    s = hopeless(known, 9.0, 1.0)
    b = (2.5 - 0.75) / (math.log(6) ** 2 - math.log(2.5) ** 2)
    assert s is not None and s.predicted_drop == pytest.approx(0.75 + b * (math.log(9) ** 2 - math.log(2.5) ** 2))
    assert s.held is known[0] and s.lost is known[1]
    ft, told = FakeFineTune(0.5), []
    kept, tried = hold_drop(ft, 9.0, 1.0, rounds=1, known=known, on_skip=told.append)
    assert 9.0 not in ft.calls and told == [s]
    assert ft.calls == [pytest.approx(2.5 * (6.0 / 2.5) ** 0.25)] and len(tried) == 1
    # the same drops with twice the allowance: 3.7 points is not hopeless at 2 allowed
    assert hopeless(known, 9.0, 2.0) is None
    # nothing held yet (no answer to fall back on), or nothing lost: never hopeless
    assert hopeless(known[1:], 9.0, 1.0) is None and hopeless(known[:1], 9.0, 1.0) is None


def test_a_hopeless_target_with_a_narrow_known_bracket_keeps_the_known_plan():
    ft = FakeFineTune(0.5)
    known = [Attempt(8.0, 8.7, 0.3), Attempt(10.0, 9.0, 2.4)]
    kept, tried = hold_drop(ft, 12.0, 1.0, rounds=2, known=known)
    assert ft.calls == [] and tried == [] and kept is known[0]


def test_a_plans_timings_are_pooled_geometrically():
    from cpbench.tune.loop import pooled_speedup

    assert pooled_speedup([7.68, 8.46]) == pytest.approx(math.sqrt(7.68 * 8.46))
    assert pooled_speedup([9.0]) == pytest.approx(9.0)
    with pytest.raises(ValueError):
        pooled_speedup([])


def test_the_bracket_is_the_measured_speedups_not_the_searched_targets():
    """A plan searched at t measures 1.1 t: what held (or lost) is the measured speed, so the next step
    searches between the measured ends (on the character network a plan searched at 9.7x measured 10.1x
    and held; one searched at 10x measured 11.3x and lost)."""
    calls = []

    def ft(t):
        calls.append(t)
        s = 1.1 * t
        return Attempt(t, s, 0.3 * (s - 1))  # holds 1 point up to 4.3x measured

    from cpbench.tune.loop import step_back

    kept, tried = hold_drop(ft, 9.0, 1.0, rounds=2, known=[Attempt(2.0, 2.2, 0.6)])
    assert calls[1] == pytest.approx(step_back(Attempt(2.0, 2.2, 0.6), tried[0], 1.0))  # [2.2 measured, 9.9 measured]
    assert tried[0].speedup == pytest.approx(9.9)
    held = max([Attempt(2.0, 2.2, 0.6)] + [a for a in tried[:2] if a.holds(1.0)], key=lambda a: a.speedup)
    lost = min((a for a in tried[:2] if not a.holds(1.0)), key=lambda a: a.speedup)
    assert calls[2] == pytest.approx(step_back(held, lost, 1.0))
    assert kept.holds(1.0) and kept.speedup == max(a.speedup for a in tried if a.holds(1.0))


def test_without_an_accuracy_to_hold_the_first_plan_is_kept():
    ft = FakeFineTune(1.0, drop=False)
    kept, tried = hold_drop(ft, 9.0, 0.0)
    assert kept.target == 9.0 and len(tried) == 1


def test_a_bracket_narrower_than_eight_percent_stops_the_steps():
    ft = FakeFineTune(0.5)
    kept, tried = hold_drop(ft, 9.0, 1.0, rounds=5, known=[Attempt(8.8, 8.8, 0.5)])
    assert len(tried) == 1  # nothing between 8.8x and 9x is worth a fine-tuning
    assert kept.target == 8.8 and kept.holds(1.0)  # the known plan that held, not the 9x one that lost
    # the fresh tune of 2026-12-07: 9.22x held, 9.77x lost (5.9% apart); a hopeless 12x target fine-tunes nothing
    ft = FakeFineTune(0.5)
    known = [Attempt(9.2, 9.22, 0.92), Attempt(10.0, 9.77, 2.44)]
    kept, tried = hold_drop(ft, 12.0, 1.0, rounds=2, known=known)
    assert ft.calls == [] and tried == [] and kept is known[0]
    # 9% apart: still worth a step
    kept, tried = hold_drop(ft, 12.0, 1.0, rounds=2, known=[Attempt(9.2, 9.0, 0.92), Attempt(10.0, 9.81, 2.44)])
    assert len(ft.calls) >= 1


# -- an overshoot: the model was pessimistic, the plan faster than the target asked ------------

def _calibrated_search(state):
    def search_(budget):  # costs as the model currently believes them
        opts = {"conv": [Option(o.candidate, o.cost * state["scale"], o.loss) for o in OPTIONS["conv"]]}
        return search(opts, 0.1, budget)
    return search_


def _refit(state, refits):
    def refit(sel, m):
        raw = 0.1 + (sel.cost - 0.1) / state["scale"]
        state["scale"] = (1 / m.speedup - 0.1) / (raw - 0.1)
        refits.append(state["scale"])
    return refit


def _truth(state, realised, ci=0.01):
    def measure(sel):  # every layer cost is 1/realised of what the uncalibrated model says
        s = 1 / (0.1 + (sel.cost - 0.1) / state["scale"] / realised)
        return Measured(s, ((1 - ci) * s, (1 + ci) * s))
    return measure


def test_an_overshoot_refits_the_model_and_keeps_the_slower_plan_of_less_loss():
    state, refits = {"scale": 1.0}, []
    out = tighten_loop(_calibrated_search(state), _truth(state, 1.4), 4.0, recalibrate=_refit(state, refits))
    assert out.met and len(out.rounds) == 2 and refits == [pytest.approx(1 / 1.4)]
    first, second = out.rounds
    assert first.speedup > 1.1 * 4.0  # overshot: the pessimistic model's plan measured well above 4x
    assert 4.0 * 0.99 <= second.speedup < first.speedup
    assert second.predicted_speedup == pytest.approx(second.speedup)  # the refitted model is right
    assert out.selection.labels() == second.plan and out.selection.loss < search(OPTIONS, 0.1, 0.25).loss


def test_without_a_refit_or_within_the_margin_an_overshoot_is_kept():
    assert len(tighten_loop(_search, FakeTimer(1.4), 4.0).rounds) == 1  # nothing to correct the model with
    state = {"scale": 1.0}
    out = tighten_loop(_calibrated_search(state), _truth(state, 1.05), 4.0, recalibrate=_refit(state, []))
    assert len(out.rounds) == 1 and out.met  # 5% fast: inside the margin a prediction is held to


def test_a_loosened_plan_that_misses_falls_back_to_the_plan_that_met():
    """The truth is not what the refit assumes (the slower plan is slower still): the loop measures it,
    finds the miss, and keeps the measured plan that met the target rather than report a miss."""
    state, calls = {"scale": 1.0}, []

    def measure(sel):
        k = sel.labels()["conv"]
        calls.append(k)
        s = 6.0 if len(calls) == 1 else 3.0  # the first plan overshoots, every later one misses
        return Measured(s, (0.99 * s, 1.01 * s))

    out = tighten_loop(_calibrated_search(state), measure, 4.0, recalibrate=_refit(state, []), max_rounds=3)
    assert out.met and out.stopped == "met" and out.measured.speedup == 6.0
    assert out.selection.labels()["conv"] == calls[0] and len(out.rounds) >= 2
    assert len(set(calls)) == len(calls)  # no plan timed twice


def test_an_overshoot_is_more_than_ten_percent_with_the_whole_interval_above():
    from cpbench.tune.loop import overshoots
    assert overshoots(Measured(10.0, (8.7, 12.1)), 8.0)
    assert not overshoots(Measured(8.7, (8.1, 9.4)), 8.0)  # within 10% of the target
    assert not overshoots(Measured(10.0, (7.9, 12.1)), 8.0)  # the interval reaches below it


def test_a_step_that_finds_a_plan_already_tried_ends_the_rounds():
    """The search's grid is finite: a step back can land on a plan this target already fine-tuned, and
    the bracket it leaves is the same, so stepping again would find it again."""
    plans = {"fast": object(), "slow": object()}
    calls = []

    def ft(t):
        calls.append(t)
        name = "fast" if t >= 8.0 else "slow"
        return Attempt(t, 9.0 if name == "fast" else 7.0, 2.0 if name == "fast" else 0.5, plans[name])

    kept, tried = hold_drop(ft, 9.0, 1.0, rounds=5)
    assert [a.payload for a in tried] == [plans["fast"], plans["slow"]] and len(calls) == 3
    assert kept.payload is plans["slow"]


def test_steps_not_fine_tuned_do_not_count_against_the_rounds_and_are_bounded():
    """A step whose drop is predicted (a plan coarser than one that lost: Attempt.fine_tuned False) costs a
    verify timing, not a fine-tuning: the rounds count only the steps fine-tuned, and at most
    _MAX_FREE_STEPS free ones are taken."""
    from cpbench.tune.loop import _MAX_FREE_STEPS

    def attempt(t):  # 9x lost 1.2 points; plans between 5x and 8.5x are coarser than a lost one: 2 points, predicted
        if 5.0 < t < 8.5:
            return Attempt(t, t, 2.0, object(), fine_tuned=False)
        return Attempt(t, t, 1.2 if t >= 8.5 else 0.25 * (t - 1), object())

    kept, tried = hold_drop(attempt, 9.0, 1.0, rounds=1)
    assert [a.fine_tuned for a in tried] == [True, False, True]  # the free step did not end the one round
    assert 5.0 < tried[1].target < 8.5 and kept is tried[2] and kept.holds(1.0)
    _, tried = hold_drop(lambda t: Attempt(t, t, 5.0, object(), fine_tuned=False), 9.0, 1.0, rounds=1)
    assert len(tried) == 1 + _MAX_FREE_STEPS  # nothing fine-tuned: the free steps are bounded
