"""Running cells in a child Python process with a time limit (used when ``cell_timeout_s`` is set).

A cell cannot be stopped from inside its own process (torch kernels do not check for
interruption), so a cell with a time limit runs in a long-lived child process: the child imports
cpbench once, runs cell after cell (keeping cpbench's in-process memo between them), and is
killed — and replaced for the next cell — when a cell overruns. A killed cell becomes an error row
``timed out after N s``. Only the parent talks to the child: length-prefixed pickles over the
child's stdin/stdout (the child's own prints go to stderr).

The child has the same plugin set as the parent: it loads the entry points itself and imports
the modules of any plugin registered directly (``Plugins(extra=...)``) in the parent.
"""
from __future__ import annotations

import os
import pickle
import select
import socket
import struct
import subprocess
import sys
import time
from typing import Any

__all__ = ["CellProcess", "error_row"]

_HEADER = struct.Struct("!Q")
STARTUP_TIMEOUT_S = 300.0  # importing torch on a busy machine can take a while


def error_row(cell, message: str, **extra: Any) -> dict:
    """A result row for a cell that produced none itself (timed out, its worker died, ...)."""
    from cpbench.plugin.manager import get_plugins
    from cpbench.run import axes_result, versions

    result = axes_result(cell)
    result.status, result.error, result.host = "error", message, socket.gethostname()
    try:
        result.versions = versions(get_plugins())
    except Exception:  # never lose the row over its metadata
        pass
    row = result.to_row()
    row.update(extra)
    return row


def _direct_plugin_modules() -> list[tuple[str, str]]:
    """``(name, module)`` of plugins registered directly (not via entry points) in this process."""
    from cpbench.plugin.manager import get_plugins

    plugins = get_plugins()
    out = []
    for name, info in plugins.info.items():
        if info.distribution is None and not info.error:
            obj = plugins.pm.get_plugin(name)
            mod = getattr(obj, "__name__", None) if type(obj).__name__ == "module" else None
            if mod and mod != "__main__":
                out.append((name, mod))
    return out


class _Died(Exception):
    pass


class CellProcess:
    """One child process that runs cells; ``run(fn, cell, timeout_s)`` returns the cell's row."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._buf = b""

    # -- process -----------------------------------------------------------------------------
    def _start(self) -> None:
        self._buf = b""
        self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, bufsize=0)
        self._send(_direct_plugin_modules())
        msg = self._recv(time.monotonic() + STARTUP_TIMEOUT_S)
        if msg is None:
            raise _Died(f"cell process did not start within {STARTUP_TIMEOUT_S:g} s")
        if msg[0] != "ready":
            raise _Died(f"cell process failed to start: {msg[1]}")

    def close(self) -> None:
        p, self._proc = self._proc, None
        if p is not None and p.poll() is None:
            p.kill()
        if p is not None:
            p.wait()
            for f in (p.stdin, p.stdout):
                try:
                    f.close()
                except OSError:
                    pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- protocol ----------------------------------------------------------------------------
    def _send(self, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._proc.stdin.write(_HEADER.pack(len(data)) + data)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise _Died(f"cell process exited ({type(exc).__name__})") from None

    def _recv(self, deadline: float):
        """The next message, or ``None`` when ``deadline`` passes first."""
        fd = self._proc.stdout.fileno()
        need = None
        while True:
            if need is None and len(self._buf) >= _HEADER.size:
                need = _HEADER.size + _HEADER.unpack(self._buf[:_HEADER.size])[0]
            if need is not None and len(self._buf) >= need:
                msg = pickle.loads(self._buf[_HEADER.size:need])
                self._buf = self._buf[need:]
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                code = self._proc.wait()
                raise _Died(f"cell process died (exit code {code})")
            self._buf += chunk

    # -- running -----------------------------------------------------------------------------
    def run(self, fn, cell, timeout_s: float, step=None) -> dict:
        """``fn(cell, step=...)`` in the child; an error row if it overruns ``timeout_s`` or dies."""
        started = time.time()
        try:
            if self._proc is None or self._proc.poll() is not None:
                self.close()
                self._start()
                started = time.time()  # the cell's clock starts once the child is ready
            self._send((fn, cell, step is not None))
            deadline = time.monotonic() + timeout_s
            while True:
                msg = self._recv(deadline)
                if msg is None:
                    self.close()
                    return error_row(cell, f"timed out after {timeout_s:g} s", started_at=started,
                                     wall_seconds=time.time() - started)
                kind, payload = msg
                if kind == "step":
                    if step is not None:
                        step(payload)
                elif kind == "row":
                    return payload
                else:
                    return error_row(cell, f"cell process: {payload}", started_at=started,
                                     wall_seconds=time.time() - started)
        except _Died as exc:
            self.close()
            return error_row(cell, str(exc), started_at=started, wall_seconds=time.time() - started)


# -- the child --------------------------------------------------------------------------------
def _child() -> None:
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything the cell prints goes to stderr, not into the protocol
    inp = sys.stdin.buffer

    def send(obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_HEADER.pack(len(data)) + data)

    def read():
        head = inp.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return None
        (n,) = _HEADER.unpack(head)
        return pickle.loads(inp.read(n))

    extra = read()
    if extra is None:
        return
    try:
        import importlib

        from cpbench.plugin.manager import Plugins, reset_plugins

        mods = {name: importlib.import_module(mod) for name, mod in extra}
        reset_plugins(Plugins(extra=mods) if mods else None)
        import cpbench.run.cell  # noqa: F401  (import the heavy parts before the clock starts)
        try:  # FLOP counting imports torch._dynamo on first use: seconds, not the cell's time
            import torch._dynamo  # noqa: F401
        except Exception:
            pass
        from cpbench.plugin.manager import get_plugins

        get_plugins()
    except Exception as exc:
        send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    send(("ready", None))
    while True:
        job = read()
        if job is None:
            return
        fn, cell, want_steps = job
        step = (lambda s: send(("step", s))) if want_steps else None
        try:
            row = fn(cell, step=step)
        except Exception as exc:
            send(("failed", f"{type(exc).__name__}: {exc}"))
            continue
        send(("row", row))


if __name__ == "__main__":
    _child()
