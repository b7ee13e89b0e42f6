"""Which convs of a network a cell decomposes: ``layers = "auto"``, names, glob patterns, FLOP shares.

A layer spec is one of

* ``"auto"`` — every ``nn.Conv2d`` that can be made faster (see below), in module order;
* a list of dotted module names (``"layer1.0.conv1"``: taken as given, the user asked for them) and
  glob patterns (``"layer*.conv2"``: matched against the convs ``"auto"`` would take);
* a table ``{include = [...], exclude = [...], min_flops_share = 0.02}``: ``include`` as above
  (default ``"auto"``), then patterns removed, then layers below that share of the network's FLOPs.

A conv "can be made faster" when its kernel is larger than 1×1 (a 1×1 conv is already a channel
mix: nothing to factor), it is not depthwise, it has at least :data:`MIN_CHANNELS` input and output
channels per group (a 1–3-channel stem or a 1-channel head keeps almost its whole kernel at any
useful rank), and the cell's decomposer at the cell's rank spec promises a theoretical layer speedup
of at least :data:`MIN_LAYER_SPEEDUP` (for ``"error:"`` specs, whose rank is only known after
decomposing, at the smallest rank: the best it can do).

A rank spec that a selected layer cannot reach (``"speedup:3"`` beyond any rank, an integer above the
layer's maximum) is an outcome for that layer, decided before anything is decomposed: the layer is
left as it is and the reason recorded in :attr:`Selection.skipped`. Only when no layer is left does
the cell fail, and then before any work.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RankError, UsageError
from .flops import conv_macs, count_flops
from .layers import ConvGeometry, geometry
from .surgery import conv_layers, layer_input_shapes

__all__ = ["MIN_CHANNELS", "MIN_LAYER_SPEEDUP", "Selection", "select_layers", "check_layer_spec"]

MIN_CHANNELS = 4
MIN_LAYER_SPEEDUP = 1.2
SPEC_KEYS = ("include", "exclude", "min_flops_share")
_GLOB = set("*?[")


@dataclass
class Selection:
    """The layers a cell decomposes, in module order, and why the others are left as they are."""

    layers: list[str]
    info: dict[str, dict] = field(default_factory=dict)   # chosen layer -> shapes, FLOPs, FLOP share
    skipped: dict[str, str] = field(default_factory=dict)  # conv left as it is -> the reason


def _is_glob(s: str) -> bool:
    return bool(_GLOB & set(s))


def check_layer_spec(spec: Any, where: str = "layers") -> None:
    """One-line :class:`UsageError` unless ``spec`` is "auto", a list of names/patterns or a spec table."""
    allowed = ('"auto", a list of layer names or glob patterns, or a table '
               '{include = [...], exclude = [...], min_flops_share = F}')
    if spec == "auto":
        return
    if isinstance(spec, list) and spec and all(isinstance(s, str) and s for s in spec):
        return
    if isinstance(spec, dict):
        bad = sorted(set(spec) - set(SPEC_KEYS))
        if bad:
            raise UsageError(f"{where}: unknown key(s) {bad}; allowed: {', '.join(SPEC_KEYS)}")
        if "include" in spec:
            check_layer_spec(spec["include"], f"{where}.include")
        ex = spec.get("exclude", [])
        if not (isinstance(ex, list) and all(isinstance(s, str) for s in ex)):
            raise UsageError(f"{where}.exclude must be a list of layer names or glob patterns, not {ex!r}")
        share = spec.get("min_flops_share", 0.0)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise UsageError(f"{where}.min_flops_share must be a number in [0, 1), not {share!r}")
        return
    raise UsageError(f"{where} {spec!r} is not allowed; allowed: {allowed}")


def _structural_reason(conv: nn.Conv2d) -> str | None:
    geo = geometry(conv)
    s, t = geo.in_channels // geo.groups, geo.out_channels // geo.groups
    if (geo.kh, geo.kw) == (1, 1):
        return "1×1 kernel: already a channel mix, nothing to factor"
    if geo.groups > 1 and geo.groups == geo.in_channels:
        return "depthwise: one filter per channel, nothing to factor"
    if min(s, t) < MIN_CHANNELS:
        return (f"{geo.in_channels}→{geo.out_channels} channels: fewer than {MIN_CHANNELS} per group "
                "on one side, too few for a low-rank form to gain")
    return None


def _layer_geometry(conv: nn.Conv2d, options: dict) -> ConvGeometry:
    geo = geometry(conv)
    if options.get("group_mode") == "block-diagonal":
        geo = dataclasses.replace(geo, groups=1)
    return geo


def rank_outcome(conv: nn.Conv2d, decomposer, rank: Any, in_hw, options: dict, name: str) -> tuple[Any, float | None]:
    """``(rank, theoretical layer speedup)`` that ``rank`` resolves to on ``conv``, without decomposing
    (an ``"error:"`` spec: the smallest rank, the best case). Raises :class:`RankError` when the layer
    cannot reach the spec. The speedup is None when the decomposer has no cost model."""
    from ..decomposition.ranks import _candidates, max_rank_for, parse_rank, resolve_rank

    rs = parse_rank(rank)
    options = dict(options or {})
    if conv.groups > 1:
        options.setdefault("groups", conv.groups)
    geo = _layer_geometry(conv, options)
    weight = conv.weight.detach()
    if rs.kind == "error":
        r = _candidates(decomposer, tuple(weight.shape), geo.groups, options)[0]
    else:
        r, _ = resolve_rank(rs, decomposer, weight, geo, tuple(in_hw), options=options, layer=name)
    if rs.kind == "fixed" and hasattr(decomposer, "max_rank"):
        from ..run.validate import _within  # the one wording of an out-of-range rank

        _within(r, max_rank_for(decomposer, tuple(weight.shape), geo.groups, options), decomposer.name, name)
    if not hasattr(decomposer, "macs"):
        return r, None
    kw = {"form": options["form"]} if options.get("form") else {}
    try:
        macs = decomposer.macs(geo, r, tuple(in_hw), **kw)
    except TypeError:  # a pair for a decomposer that takes integers: decompose() says so
        return r, None
    return r, conv_macs(geo, tuple(in_hw)) / max(macs, 1)


def _match(patterns: list[str], convs: dict, eligible: list[str], where: str) -> list[str]:
    chosen: list[str] = []
    for p in patterns:
        if _is_glob(p):
            hits = [n for n in eligible if fnmatch.fnmatchcase(n, p)]
            if not hits and not any(fnmatch.fnmatchcase(n, p) for n in convs):
                raise UsageError(f"{where}: pattern {p!r} matches no Conv2d layer; Conv2d layers: "
                                 f"{', '.join(convs) or 'none'}")
            chosen += hits
        else:
            chosen.append(p)
    return chosen


def select_layers(model: nn.Module, example_input: torch.Tensor, spec: Any = "auto", *, decomposer=None,
                  rank: Any = None, options: dict | None = None) -> Selection:
    """Resolve a layer spec on ``model`` (one forward pass of ``example_input``, batch 1 is enough).

    ``decomposer`` and ``rank`` (a spec, or a ``{layer: spec}`` table) are the cell's: they decide which
    convs can gain and which cannot reach the rank; without them only the structural rules apply.
    """
    check_layer_spec(spec)
    options = dict(options or {})
    convs = conv_layers(model)
    order = {n: i for i, n in enumerate(convs)}
    shapes = layer_input_shapes(model, example_input, list(convs))
    total = max(count_flops(model, example_input), 1)
    flops = {n: count_flops(convs[n], torch.zeros(shapes[n], dtype=convs[n].weight.dtype))
             for n in convs if n in shapes}
    skipped: dict[str, str] = {}
    for n in convs:
        if n not in shapes:
            skipped[n] = "not run by the network's forward pass on the example input"

    def gain_reason(n: str) -> str | None:
        if decomposer is None or rank is None:
            return None
        spec_n = rank.get(n) if isinstance(rank, dict) else rank
        if spec_n is None:
            return None
        try:
            r, speedup = rank_outcome(convs[n], decomposer, spec_n, shapes[n][-2:], options, n)
        except RankError as exc:
            return str(exc)
        if speedup is not None and speedup < MIN_LAYER_SPEEDUP:
            return (f"theoretical layer speedup {speedup:.2f} < {MIN_LAYER_SPEEDUP} with {decomposer.name} "
                    f"at rank {r} ({spec_n})")
        return None

    eligible = []
    for n in convs:
        if n in skipped:
            continue
        why = _structural_reason(convs[n]) or gain_reason(n)
        if why is None:
            eligible.append(n)
        else:
            skipped[n] = why

    table = spec if isinstance(spec, dict) else {"include": spec}
    include = table.get("include", "auto")
    if include == "auto":
        chosen = list(eligible)
    else:
        chosen = _match(include, convs, eligible, "layers")
        conv_layers(model, [n for n in chosen])  # exact names: a clear error for a non-conv
        # names the user gave are taken even if "auto" would not, unless the rank cannot be reached
        for n in chosen:
            if n not in eligible and n in shapes:
                skipped.pop(n, None)
                why = None
                if decomposer is not None and rank is not None:
                    spec_n = rank.get(n) if isinstance(rank, dict) else rank
                    try:
                        if spec_n is not None:
                            rank_outcome(convs[n], decomposer, spec_n, shapes[n][-2:], options, n)
                    except RankError as exc:
                        why = str(exc)
                if why:
                    skipped[n] = why
        chosen = [n for n in chosen if n not in skipped]
    for p in table.get("exclude", []):
        chosen = [n for n in chosen if not fnmatch.fnmatchcase(n, p)]
    share = float(table.get("min_flops_share", 0.0))
    if share > 0:
        for n in list(chosen):
            if flops[n] / total < share:
                skipped[n] = f"FLOP share {flops[n] / total:.2%} < min_flops_share {share:.2%}"
                chosen.remove(n)
    chosen = sorted(dict.fromkeys(chosen), key=order.__getitem__)
    info = {}
    for n in chosen:
        geo = geometry(convs[n])
        info[n] = {"in_channels": geo.in_channels, "out_channels": geo.out_channels,
                   "kernel_size": [geo.kh, geo.kw], "stride": list(geo.stride), "groups": geo.groups,
                   "input_shape": list(shapes[n][1:]), "flops": flops[n], "flops_share": flops[n] / total}
    if include != "auto":  # with a list, report only on the layers it named or matched
        named = set(_match(include, convs, list(convs), "layers"))
        skipped = {n: why for n, why in skipped.items() if n in named}
    skipped = {n: skipped[n] for n in sorted(skipped, key=order.__getitem__) if n not in chosen}
    return Selection(chosen, info, skipped)
