"""cpbench report: plot data equal the rows, the HTML/Markdown/CSV outputs, bad inputs."""
from __future__ import annotations

import base64
import csv
import importlib.util
import re
from pathlib import Path

import pytest

from cpbench.report import plots as P
from cpbench.errors import UsageError
from cpbench.report import pareto_plots, write_report
from cpbench.report.html import report_columns
from cpbench.report.tables import row_summary, summary_columns

_spec = importlib.util.spec_from_file_location("_report_rows", Path(__file__).with_name("_report_rows.py"))
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def rows():
    return R.synthetic_rows()


@pytest.fixture
def run_dir(tmp_path, rows):
    return R.write_run(tmp_path / "run", rows)


# -- plot data --------------------------------------------------------------------------------
def test_pareto_points_equal_rows(rows):
    pts = P.pareto_points(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(pts) == len(ok) == 4
    for p, r in zip(pts, ok):
        assert p.decomposer == r["decomposer"]
        assert p.speedup == r["speedup"]
        assert (p.speedup_lo, p.speedup_hi) == tuple(r["speedup_ci"])
        assert p.drop == pytest.approx(100 * (r["accuracy_base"] - r["accuracy_finetuned"]))
        assert p.drop == pytest.approx(row_summary(r)["acc_drop"], abs=0.01)  # same number as the table
        assert p.flagged == r["noisy"] and p.model_name == "charnet"
    assert [p.rank for p in pts] == ["8", "16", "8x4", "16x8"]


def test_drop_from_the_control_arm_when_it_is_better(rows):
    # [run] finetune_control: the base fine-tuned by the same recipe; the drop counts from the better one
    better = dict(rows[0], accuracy_base_finetuned=rows[0]["accuracy_base"] + 0.02)
    worse = dict(rows[0], accuracy_base_finetuned=rows[0]["accuracy_base"] - 0.02)
    (pb,), (pw,) = P.pareto_points([better]), P.pareto_points([worse])
    assert pb.drop == pytest.approx(100 * (better["accuracy_base_finetuned"] - better["accuracy_finetuned"]))
    assert pw.drop == pytest.approx(100 * (worse["accuracy_base"] - worse["accuracy_finetuned"]))
    assert row_summary(better)["acc_drop"] == pytest.approx(pb.drop, abs=0.01)
    assert row_summary(better)["acc_base_finetuned"] == f"{100 * better['accuracy_base_finetuned']:.1f}"


def test_pareto_drop_uses_decomposed_without_finetuning(rows):
    r = dict(rows[0], accuracy_finetuned=None, finetune_epochs=0)
    (p,) = P.pareto_points([r])
    assert p.drop == pytest.approx(100 * (0.95 - 0.60))


def test_pareto_front_max_speedup_min_drop(rows):
    pts = P.pareto_points(rows)
    # drops 2,3,4,5 points with speedups 1.5,2.25,3,3.75: each buys more speedup → all on the front
    assert P.pareto_front(pts) == sorted(pts, key=lambda p: p.drop)
    mk = lambda drop, sp: P.ParetoPoint("m", "d", "1", "b", 1, 1, 0, drop, sp, sp, sp, False, None)  # noqa: E731
    a, b, c, d, e = mk(1, 2), mk(2, 1.5), mk(2, 4), mk(3, 4), mk(0.5, 1)
    assert P.pareto_front([a, b, c, d, e]) == [e, a, c]  # b and d dominated by c
    assert P.pareto_front([]) == []


def test_efficiency_points_equal_rows(rows):
    pts = P.efficiency_points(rows)
    expected = set()
    for r in rows:
        if r["status"] != "ok":
            continue
        for layer in ("conv2", "conv3"):
            expected.add((r["decomposer"], layer, r["backend"], r["layer_theoretical_speedup"][layer],
                          r["layer_speedup"][layer], *r["layer_speedup_ci"][layer], r["noisy"]))
    got = {(p.decomposer, p.layer, p.backend, p.theoretical, p.measured, p.measured_lo, p.measured_hi, p.flagged)
           for p in pts}
    assert got == expected and len(pts) == 8
    assert sum(p.flagged for p in pts) == 2  # the noisy cell's two layers


def test_efficiency_uses_layer_noisy_when_present(rows):
    r = dict(rows[0], noisy=False, layer_noisy={"conv2": True, "conv3": False})
    assert {p.layer: p.flagged for p in P.efficiency_points([r])} == {"conv2": True, "conv3": False}


def test_error_rank_points_equal_rows_and_dedupe(rows):
    # a second backend reuses the same decomposition (same rel_error): no extra point
    dup = dict(rows[0], backend="mkl", cell_key="dup")
    pts = P.error_rank_points(rows + [dup])
    assert len(pts) == 8
    got = {(p.decomposer, p.layer, p.rank, p.rank_x, p.rel_error) for p in pts}
    expected = set()
    for r in rows[:4]:
        for layer in ("conv2", "conv3"):
            rk = r["rank"][layer]
            x = rk[0] * rk[1] if isinstance(rk, list) else rk
            label = f"{rk[0]}x{rk[1]}" if isinstance(rk, list) else str(rk)
            expected.add((r["decomposer"], layer, label, x, r["rel_error"][layer]))
    assert got == expected
    assert {p.rank_x for p in pts if p.decomposer == "tucker2"} == {32.0, 128.0}  # pair → product


def test_accuracy_rank_points_equal_rows(rows):
    pts = P.accuracy_rank_points(rows)
    assert len(pts) == 4
    by = {(p.decomposer, p.rank_x): p for p in pts}
    for r in rows[:4]:
        rk = r["rank"]["conv2"]
        x = rk[0] * rk[1] if isinstance(rk, list) else rk
        p = by[(r["decomposer"], x)]
        assert p.accuracy_base == pytest.approx(100 * r["accuracy_base"])
        assert p.accuracy_decomposed == pytest.approx(100 * r["accuracy_decomposed"])
        assert p.accuracy_finetuned == pytest.approx(100 * r["accuracy_finetuned"])


def test_rank_table_row_plotted_at_mean_rank(rows):
    r = dict(rows[0], rank={"conv2": 8, "conv3": 16})
    (p,) = P.accuracy_rank_points([r])
    assert p.rank_x == 12 and p.rank == "conv2:8 conv3:16"


def _marker_xy(fig):
    """(x, y) of every data marker drawn (no line style; error-bar caps excluded), over all axes."""
    out = set()
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_marker() not in (None, "", "None", "_", "|") and line.get_linestyle() in ("None", "none", ""):
                out |= {(round(float(x), 9), round(float(y), 9)) for x, y in zip(line.get_xdata(), line.get_ydata())}
    return out


def test_drawn_markers_are_the_points(rows):
    pts = P.pareto_points(rows)
    fig = P.draw_pareto(pts, references=P.reference_points("charnet"))
    expected = {(round(p.drop, 9), round(p.speedup, 9)) for p in pts} | {(1.0, 8.5)}  # + the paper's star
    assert _marker_xy(fig) == expected
    assert any("Lebedev" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    eff = P.efficiency_points(rows)
    assert _marker_xy(P.draw_efficiency(eff)) == {(round(p.theoretical, 9), round(p.measured, 9)) for p in eff}


# -- the written report -----------------------------------------------------------------------
def test_report_html_md_pngs(run_dir, rows):
    written = write_report(run_dir)
    out = run_dir / "report"
    names = sorted(p.name for p in written)
    assert names == sorted(["report.html", "report.md", "pareto.png", "efficiency.png", "error_rank.png",
                            "accuracy_rank.png"])
    assert all(p.parent == out and p.is_file() for p in written)
    html = (out / "report.html").read_text(encoding="utf-8")
    # the summary table: what a reader needs first, left; columns empty in every row left out
    table = re.search(r'<table class="sortable" id="summary">(.*?)</table>', html, re.S).group(1)
    headers = re.findall(r'<th data-col="(.*?)">', table)
    assert headers == report_columns(rows)
    assert headers[:7] == ["model", "decomposer", "rank", "backend", "batch", "acc_drop", "speedup"]
    assert "acc_base_finetuned" not in headers and "acc_base_finetuned" in summary_columns()  # empty here
    assert headers[-2:] == ["status", "error"]
    assert len(re.findall(r"<tr class=", table)) == len(rows)
    assert table.count('<tr class="error">') == 1 and table.count('<tr class="flagged">') == 1
    # four plots embedded as data URIs, byte-identical to the PNG files
    imgs = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) == 4
    pngs = {p.read_bytes() for p in out.glob("*.png")}
    assert {base64.b64decode(s) for s in imgs} == pngs and all(b.startswith(PNG_MAGIC) for b in pngs)
    assert not re.search(r'(src|href)="(https?:)?//', html)  # self-contained
    assert "<script>" in html and "cpbenchSort" in html
    # failures (escaped), machine, versions, matrix
    assert "rank 999 is out of range &lt;for conv2&gt;" in html and "Traceback" in html
    assert "Failures (1)" in html and "Test CPU &lt;x86&gt;" in html and "cpbench_builtins" in html
    assert "decomposer = [&quot;cp-nls&quot;, &quot;tucker2&quot;]" in html
    assert "Lebedev et al. 2015" in html  # charnet: the paper's point is mentioned
    md = (out / "report.md").read_text(encoding="utf-8")
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(refs) == sorted(p.name for p in out.glob("*.png"))
    assert md.count("| ok |") == 4 and "```toml" in md and "rank 999" in md
    # the verdict heads both, before the summary table, then the headline plot
    for text in (html, md):
        assert text.index("Verdict") < text.index("Summary")
        assert "5 cells: 4 ok, 1 failed, 1 flagged (noisy)" in text
    assert "cp-nls   none within 1 pt; closest: drop 2.00 pt at 1.50× [1.40–1.70] (rank 8)" in md
    assert "none within 1 pt; closest: 1.50× [1.40, 1.70]</td><td class=\"num\">2.00</td>" in html
    assert html.index("Verdict") < html.index("<img") < html.index('id="summary"')


def test_csv_round_trip(run_dir, rows):
    written = write_report(run_dir, formats=["csv"])
    assert written == [run_dir / "report" / "results.csv"]
    assert not (run_dir / "report" / "report.html").exists()
    with open(written[0], newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == summary_columns()
        got = list(reader)
    assert len(got) == len(rows)
    for g, r in zip(got, rows):
        s = row_summary(r)
        assert g == {c: "" if s[c] is None else str(s[c]) for c in summary_columns()}
        if s["speedup"] is not None:
            assert float(g["speedup"]) == s["speedup"]  # full precision survives


def test_report_without_accuracy_skips_pareto(tmp_path):
    rows = [R.ok_row("cp-als", 8, 0, model="conv", with_accuracy=False),
            R.ok_row("spatial-svd", 8, 1, model="conv", with_accuracy=False)]
    run = R.write_run(tmp_path / "run", rows, matrix=None)
    written = write_report(run, formats="html")
    html = written[0].read_text(encoding="utf-8")
    assert len(re.findall(r"<img ", html)) == 2  # efficiency + error against rank
    assert "skipped: no cell has an accuracy" in html and "No matrix.toml" in html
    assert "Lebedev et al. 2015 (8.5" not in html
    assert re.findall(r'<img alt="([^"]+)"', html) == ["Efficiency per layer", "Error against rank"]
    assert sorted(p.name for p in (run / "report").iterdir()) == ["report.html"]


def test_only_failed_cells_still_reports(tmp_path):
    run = R.write_run(tmp_path / "run", [R.failed_row()])
    written = write_report(run)
    assert [p.name for p in written] == ["report.md", "report.html"]
    html = (run / "report" / "report.html").read_text(encoding="utf-8")
    assert "<img " not in html and html.count("skipped: no cell finished successfully") == 4
    assert "Failures (1)" in html and "rank 999 is out of range" in html


def test_pareto_one_figure_per_model(tmp_path, rows):
    other = [dict(r, model="charnet", model_params={"width": 2}, cell_key=r["cell_key"] + "w")
             for r in rows[:2]]
    other += [dict(r, model="alexnet", model_label="alex-small", cell_key=r["cell_key"] + "a") for r in rows[:2]]
    plots = pareto_plots(rows + other)
    assert [p.name for p in plots] == ["pareto-alex-small", "pareto-charnet", "pareto-charnet_width_2"]
    assert ["Lebedev" in p.caption for p in plots] == [False, True, True]  # the paper's point: charnet only
    assert all(p.png.startswith(PNG_MAGIC) for p in plots)
    assert pareto_plots([R.failed_row()])[0].note.startswith("skipped: no cell finished")


def test_later_row_for_same_cell_wins(tmp_path, rows):
    redo = dict(rows[-1], status="ok", error=None)  # failed cell re-run... as an ok row without timing
    run = R.write_run(tmp_path / "run", rows + [redo])
    write_report(run, formats=["csv"])
    text = (run / "report" / "results.csv").read_text(encoding="utf-8")
    assert "rank 999 is out of range" not in text and len(text.strip().splitlines()) == 1 + len(rows)


# -- bad input --------------------------------------------------------------------------------
def test_missing_dir(tmp_path):
    with pytest.raises(UsageError, match="run directory not found") as e:
        write_report(tmp_path / "nope")
    assert "\n" not in str(e.value)


def test_empty_results(tmp_path):
    run = R.write_run(tmp_path / "run", [])
    with pytest.raises(UsageError, match="has no rows") as e:
        write_report(run)
    assert "\n" not in str(e.value)
    assert not (run / "report").exists()


def test_no_results_file_and_bad_format(tmp_path, run_dir):
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UsageError, match="no results file"):
        write_report(tmp_path / "emptydir")
    with pytest.raises(UsageError, match="unknown report format 'pdf'"):
        write_report(run_dir, formats=["pdf"])


def test_cli_report(tmp_path, run_dir, capsys):
    from cpbench.cli import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run directory not found" in err
    assert main(["report", str(run_dir), "--format", "csv", "--format", "csv"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run_dir / "report" / "results.csv")]


def test_each_machine_once_with_what_varied(tmp_path, rows):
    ok = [dict(r, machine={**r["machine"], "load_average": [1.0 + i, 2.0, 3.0]}) for i, r in enumerate(rows[:4])]
    run = R.write_run(tmp_path / "run", ok)
    html = write_report(run, formats="html")[0].read_text(encoding="utf-8")
    assert html.count("<h3>machine on testhost</h3>") == 1
    assert "varies over the cells: 1–4, 2–2, 3–3" in html


def test_duplicated_ok_rows_are_reported_not_hidden(tmp_path, rows, capsys):
    run = R.write_run(tmp_path / "run", rows + [dict(rows[0], speedup=9.0, speedup_ci=[8.5, 9.5])])
    write_report(run, formats=["html", "md"])
    err = capsys.readouterr().err
    assert "1 cell(s) have more than one ok row (1 extra" in err and "two runs wrote into one results file" in err
    for name in ("report.html", "report.md"):
        assert "more than one ok row" in (run / "report" / name).read_text(encoding="utf-8")
    from cpbench.report.compare import compare_runs

    other = R.write_run(tmp_path / "other", rows)
    assert any("run B: " in d and "more than one ok row" in d for d in compare_runs(other, run).duplicates)
    assert compare_runs(other, other).duplicates == []
