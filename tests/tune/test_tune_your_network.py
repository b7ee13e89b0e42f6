"""The tune on your own network: a Python file on your images (a data set with only train and test),
given as a model spec dict or a model spec file; a fake timer."""
import textwrap

import pytest

from cpbench.cli import main
from cpbench.run.cell import RunContext
from cpbench.testing.sampledata import write_image_folder
from cpbench.tune.pipeline import Tuner
from cpbench.tune.run import run_tune

from test_pipeline import ParamTimer, _request

NET = textwrap.dedent("""
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes=3):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x):
            x = F.relu(self.conv2(F.relu(self.conv1(x))))
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
""")


@pytest.fixture
def yours(tmp_path):
    (tmp_path / "mynet.py").write_text(NET)
    write_image_folder(tmp_path / "images", classes=3, per_class=30, size=(12, 12))
    return {"name": "python", "target": "mynet.py:Net", "params": {"num_classes": 3},
            "dataset": {"name": "imagefolder", "path": "images"}}


def test_a_python_network_on_an_image_folder_is_tuned_on_images_held_out_from_training(tmp_path, yours):
    ctx = RunContext(cache_dir=str(tmp_path / "cache"), spec_dir=str(tmp_path), train={"epochs": 1, "batch_size": 16})
    req = _request(model=yours, layers=["conv2"], targets=(1.5,))
    tuner = Tuner(req, ctx=ctx, timer=ParamTimer())
    assert tuner.sensitivity_mode == "kl"  # the spec's data set, not the plugin's (it has none)
    val = tuner.validation()
    train = tuner.network.data.load("train", seed=0)
    n = len(train.tensors[1])
    assert len(val.tensors[1]) == n // 10  # the end of the training split: the test split is never chosen on
    assert (val.tensors[0] == train.tensors[0][n - n // 10:]).all()

    run = run_tune(req, tmp_path / "out", ctx=ctx, timer=ParamTimer())
    (row,) = run.rows
    assert row["status"] == "ok" and row["tune"]["sensitivity"] == "kl"
    assert set(row["tune"]["stage_seconds"]) == {"candidates", "latency", "sensitivity"}
    assert set(row["tune"]["dropped_out_of_reach"]) <= {"conv2"}  # per layer, not the stage times
    assert row["accuracy_base"] is not None and row["accuracy_decomposed"] is not None


def _spec_file(tmp_path, body: str):
    p = tmp_path / "mynet-tune.toml"
    p.write_text(textwrap.dedent(body))
    return p


def test_the_cli_reads_a_model_spec_file_and_resolves_its_paths_from_its_folder(tmp_path, yours, monkeypatch):
    spec = _spec_file(tmp_path, """
        [model]
        name = "python"
        target = "mynet.py:Net"
        params = {num_classes = 3}
        dataset = {name = "imagefolder", path = "images"}

        [train]
        epochs = 1
        batch_size = 16
    """)
    from cpbench.cli import tune as cli_tune

    model, train, folder = cli_tune.model_from_file(str(spec))
    assert model == yours and train == {"epochs": 1, "batch_size": 16} and folder == str(tmp_path.resolve())
    monkeypatch.chdir(tmp_path.parent)  # relative paths start at the file's folder, not here
    args = cli_tune.add_tune_parser(__import__("argparse").ArgumentParser().add_subparsers()).parse_args(
        [str(spec), "--layers", "conv2"])
    assert cli_tune.request_from_args(args).model == yours


@pytest.mark.parametrize("body,match", [
    ("[model]\ntarget = 'x.py:N'\n", "needs a [model] table with a name"),
    ("[model]\nname = 'python'\n[matrix]\nx = 1\n", "unknown table(s) ['matrix']"),
    ("[model]\nname = 'python'\n[train]\nepochz = 3\n", "unknown [train] key(s) ['epochz']"),
    ("[model\n", "not a TOML model spec file"),
])
def test_a_bad_model_spec_file_is_one_line_exit_2(tmp_path, capsys, body, match):
    spec = _spec_file(tmp_path, body)
    code = main(["tune", str(spec), "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and match in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_missing_model_spec_file_is_one_line(tmp_path, capsys):
    assert main(["tune", str(tmp_path / "nope.toml")]) == 2
    assert "model spec file not found" in capsys.readouterr().err


def test_a_plan_that_lost_far_more_than_allowed_is_looked_past_by_every_later_search(tmp_path, yours, monkeypatch):
    """Two layers: the first plan fine-tuned loses 5 points (fine-tuning faked). It and every plan at least as
    coarse in both layers are excluded from later searches, so the same target searched again fine-tunes a
    plan finer in one layer, not one that loses for certain; the rows list what was excluded."""
    from types import SimpleNamespace

    from cpbench.tune.search import excluded_by

    ctx = RunContext(cache_dir=str(tmp_path / "cache"), spec_dir=str(tmp_path))
    tuner = Tuner(_request(model=yours, layers=["conv1", "conv2"], targets=(2.0,), max_drop=1.0, drop_rounds=0),
                  ctx=ctx, timer=ParamTimer())
    finished: list[dict[str, str]] = []

    def finish(prepared, target, outcome, batch=None, *, started=None, cell=None):
        finished.append(outcome.selection.labels())
        cell = tuner.target_cell(target, 1)
        row = {"speedup": outcome.measured.speedup, "accuracy_drop": 5.0 if len(finished) == 1 else 0.0,
               "cell_key": cell.key, "rank_spec": cell.rank,
               "tune": {"plan": outcome.selection.labels(), "target_speedup": target}}
        return row, SimpleNamespace(meta={"target_speedup": target})

    monkeypatch.setattr(tuner, "finish", finish)
    prepared = tuner.prepare(budgets=[1 / 2.0])
    first, _, _ = tuner.tune_target(prepared, 2.0)
    assert first["accuracy_drop"] == 5.0 and prepared.excluded == [finished[0]]
    assert first["tune"]["excluded"] == [finished[0]]
    second, _, _ = tuner.tune_target(prepared, 2.0)
    assert len(finished) == 2 and finished[1] != finished[0]
    assert excluded_by(finished[1], [finished[0]]) is None  # finer (or another method) in at least one layer
    assert second["accuracy_drop"] == 0.0 and second["speedup"] >= 2.0 * 0.9


class KeptCheaperTimer(ParamTimer):
    """A layer alone costs one unit per parameter; a network 100 plus its parameters, except that a dense
    layer beside a replaced one costs ``cheaper`` of its parameters (as the character network's conv1 does on
    mkl beside CP blocks): its share, timed in the dense baseline, overstates what keeping it costs."""

    def __init__(self, cheaper: float = 0.3):
        super().__init__()
        self.cheaper = cheaper

    def cost(self, m) -> float:
        import torch.nn as nn

        if not hasattr(m, "conv1"):  # a layer alone
            return float(sum(p.numel() for p in m.parameters()))
        layers = [m.conv1, m.conv2]
        replaced = any(not isinstance(l, nn.Conv2d) and any(True for _ in l.parameters()) for l in layers)
        total = 100.0 + sum(p.numel() for p in m.fc.parameters())
        for l in layers:
            own = sum(p.numel() for p in l.parameters())
            total += own * (self.cheaper if replaced and isinstance(l, nn.Conv2d) else 1.0)
        return total

    def __call__(self, ref, cand, x_ref, x_cand):
        from cpbench.tune.latency import Timed

        self.calls += 1
        s = self.cost(ref) / self.cost(cand)
        return Timed(s, (0.98 * s, 1.02 * s), self.cost(ref), self.cost(cand))


def test_a_layer_kept_beside_replaced_ones_is_costed_as_timed_there(tmp_path, yours):
    """The keep option's cost is the layer timed whole inside the fastest plan, so a plan that keeps a layer is
    predicted at what it measures; its share of the dense baseline would have predicted it more than 10% slow."""
    from dataclasses import replace

    from cpbench.tune.prepared import predicted_speedup
    from cpbench.tune.search import Selection

    ctx = RunContext(cache_dir=str(tmp_path / "cache"), spec_dir=str(tmp_path), train={"epochs": 1, "batch_size": 16})
    timer = KeptCheaperTimer()
    tuner = Tuner(_request(model=yours, layers=["conv1", "conv2"], targets=(1.5,)), ctx=ctx, timer=timer)
    prepared = tuner.prepare(budgets=[1 / 1.5])
    base = timer.cost(tuner.base())
    conv1 = sum(p.numel() for p in tuner.base().conv1.parameters())
    assert prepared.shares["conv1"] == pytest.approx(conv1 / base)
    assert prepared.kept["conv1"] == pytest.approx(0.3 * conv1 / base)
    keep = next(o for o in prepared.options["conv1"] if o.candidate.is_keep)
    assert keep.cost == prepared.kept["conv1"]

    for o in prepared.options["conv2"]:
        if o.candidate.is_keep:
            continue
        labels = {"conv1": "keep", "conv2": o.candidate.label}
        measured = tuner.measure(Selection({"conv1": keep, "conv2": o}, 0.0, 0.0), 1).speedup
        assert predicted_speedup(prepared, labels) == pytest.approx(measured, rel=1e-6)
        assert predicted_speedup(replace(prepared, kept={}), labels) < 0.9 * measured  # as before: its share, >10% slow
    assert predicted_speedup(prepared, {}) == pytest.approx(1.0)  # keeping both is the baseline
    row = run_tune(_request(model=yours, layers=["conv1", "conv2"], targets=(1.5,)), tmp_path / "out", ctx=ctx,
                   timer=timer).rows[0]
    assert row["tune"]["kept_in_place"]["conv1"] == pytest.approx(prepared.kept["conv1"])
