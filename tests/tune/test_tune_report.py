"""The tune report's note when another backend runs the original network markedly faster."""
from cpbench.tune.report import FASTER_ORIGINAL, faster_original_notes


def _row(speedup, vs_speedup, vs_backend, backend="mkl"):
    return {"rank_spec": {"target_speedup": 8.0}, "backend": backend, "speedup": speedup,
            "vs_fastest_original": {"backend": vs_backend, "speedup": vs_speedup, "speedup_ci": [vs_speedup * 0.9, vs_speedup * 1.1]}}


def test_a_markedly_faster_original_elsewhere_is_said_with_the_figure_against_it():
    (line,) = faster_original_notes([_row(8.0, 4.0, "onnxruntime")])
    assert line.startswith("target 8x: onnxruntime runs the original network 2.00x faster than mkl")
    assert "4.00x [3.60, 4.40]" in line and "--backend onnxruntime" in line


def test_no_note_within_the_noise_on_the_same_backend_or_without_the_timing():
    just_under = 8.0 / (FASTER_ORIGINAL * 0.99)
    assert faster_original_notes([_row(8.0, just_under, "onnxruntime")]) == []
    assert faster_original_notes([_row(8.0, 4.0, "mkl")]) == []  # the tune's own backend is the fastest
    assert faster_original_notes([{"rank_spec": {"target_speedup": 8.0}, "backend": "mkl", "speedup": 8.0}]) == []
    assert faster_original_notes([{**_row(8.0, 4.0, "x"), "vs_fastest_original": {"error": "no backend"}}]) == []


def test_a_target_that_kept_an_earlier_targets_plan_is_not_noted_twice():
    earlier, later = _row(8.0, 4.0, "onnxruntime"), {**_row(8.0, 4.0, "onnxruntime"), "tune": {"kept_from_target": 8.0}}
    later["rank_spec"] = {"target_speedup": 12.0}
    assert len(faster_original_notes([earlier, later])) == 1
