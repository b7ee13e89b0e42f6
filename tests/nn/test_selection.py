"""layers = "auto", names, globs and FLOP shares; unreachable ranks are per-layer outcomes."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from _nets import multihead  # noqa: E402

import cpbench  # noqa: E402
from cpbench.errors import UsageError  # noqa: E402
from cpbench.nn.selection import check_layer_spec, select_layers  # noqa: E402

X = torch.randn(1, 3, 16, 16)
CONVS_3X3 = ["layer1.conv1", "layer1.conv2", "down", "layer2.conv1", "layer2.conv2", "fuse"]


def test_auto_takes_every_conv_that_can_gain_in_module_order_and_notes_the_rest():
    s = select_layers(multihead(), X, "auto", decomposer=cpbench.get_decomposer("cp-nls"), rank="speedup:3")
    assert s.layers == CONVS_3X3
    assert set(s.skipped) == {"stem.0", "head"}  # the 3-channel stem and the 16→1 1×1 head
    assert "3→16 channels" in s.skipped["stem.0"] and "1×1" in s.skipped["head"]
    info = s.info["down"]
    assert info["kernel_size"] == [3, 3] and info["stride"] == [2, 2] and info["input_shape"] == [16, 16, 16]
    shares = [s.info[n]["flops_share"] for n in s.layers]
    assert 0 < min(shares) and sum(shares) < 1  # the stem, head and fc hold the rest


def test_auto_leaves_alone_a_layer_whose_rank_would_not_make_it_faster():
    # rank 64 on a 16→16 3×3 conv is 0.95× in theory: not worth decomposing; on 32 channels it gains
    s = select_layers(multihead(), X, "auto", decomposer=cpbench.get_decomposer("cp-als"), rank=64)
    assert "layer1.conv1" in s.skipped and "speedup 0.95 < 1.2" in s.skipped["layer1.conv1"]
    assert "layer2.conv1" in s.layers


def test_globs_select_among_the_auto_layers_and_exact_names_are_taken_as_given():
    dec = cpbench.get_decomposer("tucker2")
    s = select_layers(multihead(), X, ["layer*.conv2", "stem.0"], decomposer=dec, rank=[2, 2])
    assert s.layers == ["stem.0", "layer1.conv2", "layer2.conv2"]  # module order
    with pytest.raises(UsageError, match="matches no Conv2d"):
        select_layers(multihead(), X, ["block*"])
    with pytest.raises(UsageError, match="not a Conv2d"):
        select_layers(multihead(), X, ["fc"])


def test_min_flops_share_and_exclude():
    s = select_layers(multihead(), X, {"min_flops_share": 0.1, "exclude": ["fuse"]})
    assert s.layers == ["layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2"]
    assert "min_flops_share" in s.skipped["down"]


def test_a_rank_one_layer_cannot_reach_is_that_layer_left_alone_before_any_decomposing():
    dec = cpbench.get_decomposer("cp-nls")
    s = select_layers(multihead(), X, ["layer1.conv1", "head"], decomposer=dec, rank="speedup:3")
    assert s.layers == ["layer1.conv1"]
    assert "reaches speedup:3" in s.skipped["head"]
    s = select_layers(multihead(), X, ["layer1.conv1", "head"], decomposer=cpbench.get_decomposer("tucker2"),
                      rank=8)
    assert "out of range" in s.skipped["head"]


@pytest.mark.parametrize("bad", [[], "all", {"min_flops_share": 2}, {"layers": ["a"]}, [3]])
def test_bad_layer_specs_are_one_line_errors(bad):
    with pytest.raises(UsageError) as e:
        check_layer_spec(bad)
    assert "\n" not in str(e.value)
