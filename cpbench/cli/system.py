"""The commands about this installation: ``cpbench plugins``, ``cpbench machine``, ``cpbench build-kernel``."""
from __future__ import annotations

import json
import sys

from rich.console import Console

from .console import _console

__all__ = ["cmd_plugins", "cmd_machine", "cmd_build_kernel"]

_SIMD = {"avx512": "AVX-512 (14x32)", "avx2": "AVX2 (6x16)", "none": "none (MKL GEMMs, plain taps loops)"}


def cmd_plugins(args) -> int:
    from ..plugin.manager import get_plugins
    from ..plugin.registry import description_of

    plugins = get_plugins()
    data = {
        "plugins": [
            {"name": i.name, "distribution": i.distribution, "version": i.version, "builtin": i.builtin,
             "provides": i.provides, "error": i.error}
            for i in plugins.info.values()
        ],
        "registered": {kind: {n: reg.plugin_of(n) for n in reg.names()} for kind, reg in plugins.registries.items()},
        "descriptions": {kind: {n: description_of(reg.get(n)) for n in reg.names()}
                         for kind, reg in plugins.registries.items()},
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    t = Table(title="cpbench plugins (cpbench plugins --json for everything)", box=box.SIMPLE_HEAD,
              show_edge=False, pad_edge=False, title_justify="left")
    t.add_column("kind", no_wrap=True)
    t.add_column("name", no_wrap=True)
    t.add_column("what it is (from which package, unless built in)")
    for kind, names in data["registered"].items():
        for n, plugin in names.items():
            info = plugins.info.get(plugin)
            where = "" if info is not None and info.builtin else (
                f" — {info.distribution} {info.version}" if info and info.distribution else f" — plugin {plugin}")
            t.add_row(kind, n, escape(data["descriptions"][kind][n] + where))
    console.print(t)
    sys.stdout.flush()
    for f in plugins.failures():
        Console(stderr=True).print(f"[red]not loaded[/red] {f.name}: {f.error}")
    return 0


def cmd_build_kernel(args) -> int:
    from ..errors import BackendError
    from ..kernels import fused

    try:
        build = fused.build_kernel(args.march, verbose=args.verbose)
    except BackendError as exc:
        print(f"cpbench: {exc}", file=sys.stderr)
        print("cpbench: cpbench works without it: backends do not offer the cp4-fused form and pick among "
              "the other CP-block forms", file=sys.stderr)
        return 1
    k, compiler = build.kernel, build.inputs["compiler"]
    state = "already built" if build.cached else f"built in {build.seconds:.0f} s"
    print(f"fused CP kernel ({k.march}): {state}; build key {k.key}; operator torch.ops.{k.module.op_namespace}"
          f".cp_fused; micro-kernel {_SIMD.get(k.simd, k.simd)}")
    print(f"  {k.path}")
    print(f"  compiler {compiler['path']} ({compiler['version']}); torch {build.inputs['torch']}; "
          f"flags {' '.join(build.inputs['cflags'])}")
    return 0


def cmd_machine(args) -> int:
    from ..measure.noise import format_machine_report, machine_report

    report = machine_report(window_s=args.seconds)
    print(json.dumps(report, indent=2) if args.json else format_machine_report(report))
    return 0
