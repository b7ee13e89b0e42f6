"""Layer surgery is exact: any Conv2d geometry, at a rank where the factors are exact."""
import pytest
import torch
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st
from torch import nn

from cpbench.nn.layers import CPBlock, geometry, split_groups


def exact_cp_factors(weight, groups):
    """An exact CP of each group's kernel at R = S/G·kh·kw (indicator factors; out holds the kernel)."""
    k = split_groups(weight, groups)  # (G, tg, sg, kh, kw)
    G, tg, sg, kh, kw = k.shape
    R = sg * kh * kw
    eye = torch.eye(R, dtype=weight.dtype).reshape(sg, kh, kw, R)
    in_ = eye.sum((1, 2))          # (sg, R) indicator of s
    h = eye.sum((0, 2))            # (kh, R)
    w = eye.sum((0, 1))            # (kw, R)
    out = k.reshape(G, tg, R)
    return out, in_.expand(G, -1, -1), h.expand(G, -1, -1), w.expand(G, -1, -1)


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    same = draw(st.booleans())
    if same:
        stride, padding = (1, 1), draw(st.sampled_from(["same", "valid"]))
    else:
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    bias = draw(st.booleans())
    h = draw(st.integers(max(kh * dil[0], 5), 10))
    w = draw(st.integers(max(kw * dil[1], 5), 10))
    if mode != "zeros" and not isinstance(padding, str):
        padding = (min(padding[0], h - 1), min(padding[1], w - 1))
    return dict(in_channels=cin, out_channels=cout, kernel_size=(kh, kw), stride=stride, padding=padding,
                dilation=dil, groups=groups, bias=bias, padding_mode=mode), (h, w)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs(), st.sampled_from(["cp4", "cp3", "fused"]))
def test_cp_block_reproduces_any_conv_at_exact_rank(cfg, form):
    kwargs, (h, w) = cfg
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs).double()
    x = torch.randn(2, kwargs["in_channels"], h, w, dtype=torch.float64)
    out, in_, kh_f, kw_f = exact_cp_factors(conv.weight.detach(), conv.groups)
    geo = geometry(conv)
    if form == "cp3":
        hw = (kh_f[:, :, None, :] * kw_f[:, None, :, :]).reshape(conv.groups, -1, out.shape[-1])
        block = CPBlock(geo, out, in_, hw=hw, bias=conv.bias)
    else:
        block = CPBlock(geo, out, in_, h=kh_f, w=kw_f, bias=conv.bias)
        if form == "fused":
            block = block.fused()
    assert rel(block(x), conv(x)) < 1e-5


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs(), st.sampled_from(["tucker2", "spatial-svd"]))
def test_full_rank_tucker2_and_svd_reproduce_any_conv(cfg, method):
    import cpbench

    kwargs, (h, w) = cfg
    torch.manual_seed(1)
    conv = nn.Conv2d(**kwargs).double()
    x = torch.randn(2, kwargs["in_channels"], h, w, dtype=torch.float64)
    dec = cpbench.get_decomposer(method)
    full = dec.max_rank(tuple(conv.weight.shape), conv.groups)
    fact = dec.decompose(conv.weight, list(full) if isinstance(full, tuple) else full, groups=conv.groups)
    assert fact.rel_error < 1e-10
    assert rel(dec.build(conv, fact)(x), conv(x)) < 1e-5


def test_block_diagonal_mode_builds_an_ungrouped_block_that_matches():
    import cpbench

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    dec = cpbench.get_decomposer("spatial-svd")
    fact = dec.decompose(conv.weight, 12, groups=2, group_mode="block-diagonal")
    block = dec.build(conv, fact)
    assert all(m.groups == 1 for m in block)
    assert rel(block(x), conv(x)) < 1e-8


def test_geometry_keeps_each_axis_apart():
    conv = nn.Conv2d(2, 3, (3, 5), stride=(1, 2), padding=(0, 2), dilation=(2, 1))
    g = geometry(conv)
    assert g.vertical()["stride"] == (1, 1) and g.horizontal()["stride"] == (1, 2)
    assert g.vertical()["padding"] == (0, 0) and g.horizontal()["padding"] == (0, 2)
    assert g.vertical()["dilation"] == (2, 1) and g.horizontal()["dilation"] == (1, 1)


def test_bias_free_conv_gives_bias_free_block():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    out, in_, h, w = exact_cp_factors(conv.weight.detach(), 1)
    block = CPBlock(geometry(conv), out, in_, h=h, w=w, bias=None)
    assert all(m.bias is None for m in block)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_geometry_arithmetic_is_pytorchs(cfg_hw):
    # The one place conv arithmetic lives (ConvGeometry.axis_padding / out_hw): the output size of the
    # real conv, and zero padding that, applied by F.pad, gives the same result as the conv's own.
    cfg, (h, w) = cfg_hw
    cfg = {**cfg, "padding_mode": "zeros"}
    conv = nn.Conv2d(**cfg)
    geo = geometry(conv)
    x = torch.randn(1, cfg["in_channels"], h, w)
    with torch.no_grad():
        y = conv(x)
        assert geo.out_hw((h, w)) == tuple(y.shape[-2:])
        (pt, pb), (pl, pr) = geo.axis_padding(0), geo.axis_padding(1)
        padded = nn.functional.conv2d(nn.functional.pad(x, (pl, pr, pt, pb)), conv.weight, conv.bias,
                                      stride=conv.stride, dilation=conv.dilation, groups=conv.groups)
        torch.testing.assert_close(padded, y)
    sym = geo.symmetric_padding()
    assert sym is None or sym == (pt, pl) and (pt, pl) == (pb, pr)


SURGERY_GEOMETRIES = [
    dict(stride=2, padding=1),
    dict(dilation=2, padding=2),
    dict(padding=(1, 2), padding_mode="reflect"),
    dict(padding="same", padding_mode="circular"),
    dict(groups=2, padding=1),
    dict(kernel_size=(1, 3), stride=(2, 1), padding=(0, 1), padding_mode="replicate"),
]


@pytest.mark.parametrize("method", ["cp-nls", "cp-epc"])
@pytest.mark.parametrize("extra", SURGERY_GEOMETRIES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_cp_decomposers_at_defaults_are_exact_on_an_exactly_low_rank_kernel(method, extra):
    """A kernel of exact CP rank 3 per group, decomposed at rank 3 with the decomposer's defaults:
    the replaced layer reproduces the conv to 1e-3 in any geometry."""
    import cpbench

    kwargs = dict(in_channels=4, out_channels=6, kernel_size=3, bias=True)
    kwargs.update(extra)
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs).double()
    g = torch.Generator().manual_seed(5)
    groups = conv.groups
    tg, sg, kh, kw = conv.out_channels // groups, conv.in_channels // groups, *conv.kernel_size
    with torch.no_grad():
        parts = [torch.einsum("ar,br,cr,dr->abcd", *(torch.randn(n, 3, generator=g, dtype=torch.float64)
                                                     for n in (tg, sg, kh, kw))) for _ in range(groups)]
        conv.weight.copy_(torch.cat(parts))
    dec = cpbench.get_decomposer(method)
    fact = dec.decompose(conv.weight, 3, groups=groups)
    x = torch.randn(2, conv.in_channels, 9, 11, dtype=torch.float64, generator=g)
    assert fact.rel_error < 1e-6
    assert rel(dec.build(conv, fact)(x), conv(x)) < 1e-3
