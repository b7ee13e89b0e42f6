"""A tune's sensitivities: stored and remembered, computed only when asked, keyed by the solver's version."""
from cpbench.tune.candidates import Candidate
from cpbench.tune.search import Option
from cpbench.tune.sensitivity import Sensitivities, cand_key
from cpbench.tune.store import JsonStore


def _sens(tmp_path, calls, version="1", mode="kl"):
    def measure(c):
        calls.append(c.label)
        return float(c.rank)
    return Sensitivities(mode, measure=measure, version=lambda m: version, context="ctx",
                         store=JsonStore(tmp_path / "s.json"))


def test_values_are_computed_once_stored_and_keyed_by_the_solver_version(tmp_path):
    calls = []
    keep, a, b = Candidate("l", "keep", None), Candidate("l", "m", 3), Candidate("l", "m", 5)
    s = _sens(tmp_path, calls)
    assert s.values([keep, a], compute=False) == {cand_key(keep): 0.0}  # nothing known yet: left out
    assert s.values([keep, a, b]) == {cand_key(keep): 0.0, cand_key(a): 3.0, cand_key(b): 5.0}
    assert s.values([a, b]) == {cand_key(a): 3.0, cand_key(b): 5.0} and calls == ["m:3", "m:5"]
    again = _sens(tmp_path, calls)  # another tune: read from the store
    assert again.values([a], compute=False) == {cand_key(a): 3.0} and calls == ["m:3", "m:5"]
    newer = _sens(tmp_path, calls, version="2")  # a changed solver is scored anew
    assert newer.values([a], compute=False) == {} and newer.values([a]) == {cand_key(a): 3.0}
    assert calls == ["m:3", "m:5", "m:3"]


def test_options_are_left_unknown_until_resolved_except_for_accuracy(tmp_path):
    calls = []
    a, b = Candidate("l", "m", 3), Candidate("l", "m", 5)
    s = _sens(tmp_path, calls)
    opts = {"l": s.options([a, b], [0.2, 0.3])}
    assert [(o.loss, o.known) for o in opts["l"]] == [(0.0, False), (0.0, False)] and calls == []
    out = s.resolve({"l": [opts["l"][1]]})
    assert out == {"l": [Option(b, 0.3, 5.0, known=True)]} and calls == ["m:5"]
    s.refresh(opts)  # what another search resolved, made known in this copy of the options
    assert [(o.loss, o.known) for o in opts["l"]] == [(0.0, False), (5.0, True)]
    assert s.record(opts) == {"lazy": True, "known": 1, "candidates": 2}
    (tmp_path / "e").mkdir()
    eager = _sens(tmp_path / "e", [], mode="accuracy")  # an accuracy loss can be negative: 0 bounds nothing
    assert not eager.lazy and all(o.known for o in eager.options([a, b], [0.2, 0.3]))
