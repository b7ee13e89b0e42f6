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


def test_targets_against_the_fastest_original_say_both_targets_and_the_reference(tmp_path):
    """--target-against fastest: the target column names the reference and the backend's target, the report says
    which backend the targets are against (or that the tune's own backend was the fastest), and no note advises
    what the tune already did."""
    from cpbench.tune.report import _target_cells, write_tune_report

    def tuned(reference_backend, ratio):
        row = {**_row(9.6, 4.7, "onnxruntime"), "model": "charnet", "threads": 1, "batch": 1, "finetune_epochs": 3,
               "speedup_ci": [9.0, 10.2], "rank_spec": {"target_speedup": 4.0}}
        row["tune"] = {"backend_target": 4.0 / ratio, "target_against": {
            "reference": "fastest", "backend": reference_backend, "ratio": ratio, "ratio_ci": [ratio * 0.95, ratio * 1.05]}}
        return row

    elsewhere = tuned("onnxruntime", 0.5)
    assert _target_cells(elsewhere)[0] == "4x vs onnxruntime original (8.00x on mkl)"
    assert faster_original_notes([elsewhere]) == []
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    write_tune_report(tmp_path / "a", [elsewhere], [])
    report = (tmp_path / "a" / "tune-report.md").read_text()
    assert "against the original network on `onnxruntime`, which ran it 2.00x faster than `mkl`" in report
    assert "ratio 0.500 [0.475, 0.525]" in report

    here = tuned("mkl", 1.0)
    write_tune_report(tmp_path / "b", [here], [])
    assert "`mkl` ran it fastest, so they were searched there as they are" in (tmp_path / "b" / "tune-report.md").read_text()
