"""``cpbench decompose``: one kernel file decomposed by one method, its error printed."""
from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

from ..errors import CpbenchError, UsageError

__all__ = ["cmd_decompose", "load_kernel"]


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _options(pairs: list[str]) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise UsageError(f"option {p!r} must be KEY=VALUE")
        k, v = p.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def load_kernel(path: str, tensor: str | None = None):
    """A 4-D kernel from .npy, .pt (weights_only) or .safetensors; one-line errors."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"kernel file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            import numpy as np

            w = torch.from_numpy(np.load(p, allow_pickle=False))
        elif suffix in (".pt", ".pth"):
            obj = torch.load(p, weights_only=True, map_location="cpu")
            w = _pick(obj, tensor, p)
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            w = _pick(load_file(str(p)), tensor, p)
        else:
            raise UsageError(f"kernel file {p} has suffix {suffix!r}; allowed: .npy, .pt, .safetensors")
    except CpbenchError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot read kernel file {p}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    return w


def _pick(obj, name, path):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if name is not None:
            if name not in tensors:
                raise UsageError(f"{path} has no tensor {name!r}; tensors: {', '.join(tensors)}")
            return tensors[name]
        four = {k: v for k, v in tensors.items() if v.dim() == 4}
        if len(four) == 1:
            return next(iter(four.values()))
        raise UsageError(f"{path} holds {len(four)} 4-D tensors; choose one with --tensor: {', '.join(four)}")
    raise UsageError(f"{path} holds a {type(obj).__name__}, not a tensor")


def cmd_decompose(args) -> int:
    import cpbench
    from ..decomposition.ranks import parse_rank

    w = load_kernel(args.kernel, args.tensor)
    dec = cpbench.get_decomposer(args.method)
    rank = _parse_value(args.rank) if isinstance(args.rank, str) else args.rank
    spec = parse_rank(rank)
    if spec.kind != "fixed":
        raise UsageError(f"decompose takes an integer rank (or a Tucker-2 pair), got {args.rank!r}")
    opts = _options(args.option)
    if args.groups > 1:
        opts["groups"] = args.groups
    start = time.perf_counter()
    fact = dec.decompose(w, spec.value, seed=args.seed, **opts)
    seconds = time.perf_counter() - start
    from ..run.results import jsonable

    out = {"method": dec.name, "rank": spec.value, "shape": list(w.shape), "rel_error": fact.rel_error,
           "seconds": seconds, "info": jsonable({k: v for k, v in fact.info.items() if k != "per_group"})}
    if args.save:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in fact.factors.items()}, args.save,
                  metadata={"rel_error": str(fact.rel_error), "method": dec.name})
        out["saved"] = args.save
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{dec.name} rank {spec.value} on {tuple(w.shape)}: rel_error {fact.rel_error:.6g} in {seconds:.3f} s")
        for k, v in out["info"].items():
            print(f"  {k}: {_brief(v)}")
    return 0


def _brief(value, keep: int = 4):
    """A long list (a history of every step) as its length, first and last values; ``--json`` has it all."""
    if isinstance(value, list) and len(value) > 2 * keep:
        head, tail = ", ".join(map(str, value[:keep // 2])), ", ".join(map(str, value[-(keep // 2):]))
        return f"[{head}, ... {tail}] ({len(value)} values; --json for all)"
    return value
