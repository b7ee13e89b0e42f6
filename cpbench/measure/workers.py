"""Timing a pair in fresh worker processes, one after another, with the machine probed meanwhile.

Each worker is a new process forked from a fork server (``python -m cpbench.measure.workers``, started once
per harness process) that imported torch and cpbench once: forking it costs milliseconds instead of
the seconds of a new interpreter, and the server never ran a parallel region, so OpenMP's thread pool
starts fresh in every worker (forking the harness itself would hand workers a pool whose threads do
not exist). A worker gets the pairs as one payload
(``torch.save`` of the backend object, the models, the inputs and the backend's ``info``), prepares
them as the parent did — a backend with ``prepare_as`` rebuilds exactly the forms the parent chose,
so every process times the same prepared models — and times each pair with
:func:`cpbench.timing.time_pair`, returning the per-round samples. The parent meanwhile samples the
machine (:class:`cpbench.measure.noise.NoiseSampler`) so the probe never interrupts the timed loop.

Why the processes of one cell run back to back and not spread over the whole run: a row is written the
moment its cell ends (that is what makes a crash or Ctrl-C lose nothing and ``--resume`` exact);
spreading a cell's processes over the run would hold every row until the run's end, or rewrite rows.
What varies at the scale of minutes (other jobs starting and stopping) is measured instead, before and
during each process, and flags the cell ``busy``.

Where processes cannot be started (no ``os.fork``, or a payload that does not pickle) the passes run
in the calling process, one after another, and the row says so (``timing_mode``).
"""
from __future__ import annotations

import atexit
import contextlib
import io
import os
import pickle
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .canary import CONTENDED_RATIO, CanaryReference, canary_ms, contention_reason, reference
from .noise import NoiseSampler, allowed_cores, summarize
from .threads import thread_limits
from .timing import TimingBudget, time_pair

__all__ = ["PairSpec", "ProcessRun", "time_in_processes", "per_process_budget", "start_fork_server", "prepare_like",
           "choose_cores", "pair_samples"]


@dataclass
class PairSpec:
    """One pair to time: the models as the backend gets them, the input, what the parent's prepare said."""

    label: str
    baseline: torch.nn.Module
    compressed: torch.nn.Module
    x: torch.Tensor
    budget: TimingBudget
    info: dict = field(default_factory=dict)  # {"baseline": info, "compressed": info} of the parent's prepare
    # a pair whose arms run on different backends (the layer suite: the fastest baseline of any backend
    # against the fastest compressed execution); None: the backend passed to time_in_processes
    baseline_backend: Any = None
    compressed_backend: Any = None


@dataclass
class ProcessRun:
    """What one worker process measured: per pair, both arms' per-round samples; and the noise."""

    pid: int
    pairs: dict[str, dict]  # label -> {"baseline_ms": [...], "compressed_ms": [...], "calls_per_round": [na, nb]}
    cores: list[int] | None
    noise: dict
    seconds: float
    mode: str  # "process" or "in-process"


def prepare_like(backend, model, x, threads: int, info: dict | None):
    """``backend.prepare_as`` when the backend has it and the parent's info is known, else ``prepare``."""
    if info is not None and hasattr(backend, "prepare_as"):
        return backend.prepare_as(model, x, threads=threads, info=info)
    return backend.prepare(model, x, threads=threads)


def _time_pairs(backend, pairs: Sequence[PairSpec], threads: int, clock=time.perf_counter,
                canary: list[float] | None = None) -> dict[str, dict]:
    """Time each pair; with ``canary`` (a list), the reference GEMM's milliseconds right before the first
    pair and right after the last are appended to it (:mod:`cpbench.measure.canary`)."""
    out = {}
    with thread_limits(threads):
        if canary is not None:
            canary.append(canary_ms())
        for p in pairs:
            pa = prepare_like(p.baseline_backend or backend, p.baseline, p.x, threads, p.info.get("baseline"))
            try:
                pb = prepare_like(p.compressed_backend or backend, p.compressed, p.x, threads, p.info.get("compressed"))
                try:
                    xa, xb = pa.convert_input(p.x), pb.convert_input(p.x)
                    t = time_pair(lambda: pa(xa), lambda: pb(xb), p.budget, clock=clock)
                finally:
                    pb.close()
            finally:
                pa.close()
            out[p.label] = {"baseline_ms": t.baseline_samples_ms, "compressed_ms": t.compressed_samples_ms,
                            "calls_per_round": list(t.calls_per_round)}
        if canary is not None:
            canary.append(canary_ms())
    return out


def _worker(payload: bytes, cores: list[int] | None, kernels: list[str] | None = None) -> dict:
    """Runs in the fresh process: pin, prepare, time; returns samples (plain lists, cheap to pickle).
    ``kernels``: the fused CP kernel builds the harness loaded (loaded before the models are
    unpickled, which may need their operator)."""
    if cores:
        os.sched_setaffinity(0, cores)  # before any thread pool exists: its threads inherit it
    from ..kernels.forms import configure_malloc

    configure_malloc()
    if kernels:
        from ..kernels.fused import load_kernel

        for march in kernels:
            load_kernel(march)
    spec = torch.load(io.BytesIO(payload), weights_only=False)
    start = time.perf_counter()
    canary: list[float] = []
    pairs = _time_pairs(spec["backend"], spec["pairs"], spec["threads"], canary=canary)
    return {"pid": os.getpid(), "pairs": pairs, "cores": sorted(os.sched_getaffinity(0)) if cores else None,
            "seconds": time.perf_counter() - start, "canary_ms": canary}


def _send(fh, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(struct.pack("<Q", len(data)))
    fh.write(data)
    fh.flush()


def _recv(fh):
    head = fh.read(8)
    if len(head) < 8:
        raise EOFError("worker pipe closed")
    (n,) = struct.unpack("<Q", head)
    data = fh.read(n)
    if len(data) < n:
        raise EOFError("worker pipe closed mid-message")
    return pickle.loads(data)


def serve(inp, out) -> None:
    """The fork server's loop (``python -m cpbench.measure.workers``): one request in, one forked worker, one
    reply out. Written by hand rather than with multiprocessing's forkserver because that re-imports the
    caller's ``__main__`` in every worker, which breaks any script without an ``if __name__`` guard
    (asv, notebooks, benchmark scripts)."""
    while True:
        try:
            payload, cores, kernel = _recv(inp)
        except EOFError:
            return
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the fresh worker
            os.close(r)
            code = 0
            with os.fdopen(w, "wb") as fh:
                try:
                    _send(fh, ("ok", _worker(payload, cores, kernel)))
                except BaseException as exc:  # reported to the parent, which records the cell as failed
                    _send(fh, ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"))
                    code = 1
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as fh:
            try:
                reply = _recv(fh)
            except EOFError:
                reply = None
        _, status = os.waitpid(pid, 0)
        if reply is None:
            reply = ("error", f"worker process {pid} died (wait status {status})")
        _send(out, reply)


class _ForkServer:
    """A helper process that imported torch and cpbench once and forks one fresh worker per request."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # workers unpickle what we can import
        self.proc = subprocess.Popen([sys.executable, "-m", "cpbench.measure.workers"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        self.owner = os.getpid()  # a forked harness (an executor's worker) must start its own

    def run(self, payload: bytes, cores: list[int] | None) -> dict:
        fused = sys.modules.get("cpbench.kernels.fused")  # loaded here only if a fused form was built
        _send(self.proc.stdin, (payload, cores, fused.loaded_marches() if fused is not None else None))
        try:
            status, value = _recv(self.proc.stdout)
        except EOFError:
            raise RuntimeError(f"the timing fork server exited (code {self.proc.poll()})") from None
        if status != "ok":
            raise RuntimeError(f"timing worker failed: {value}")
        return value

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
            self.proc.wait(timeout=5)


_SERVER: _ForkServer | None = None


def _server() -> _ForkServer:
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None or _SERVER.owner != os.getpid():
        _SERVER = _ForkServer()
        atexit.register(_SERVER.close)
    return _SERVER


def can_start_processes() -> str | None:
    """None if worker processes can be started here, else why not."""
    if not hasattr(os, "fork") or not hasattr(os, "sched_setaffinity"):
        return "no os.fork / os.sched_setaffinity on this platform"
    return None


def choose_cores(threads: int, *, sample_s: float = 0.1) -> list[int]:
    """The ``threads`` allowed cores that were least busy over ``sample_s`` (for pinning)."""
    cores = allowed_cores()
    if threads >= len(cores):
        return cores
    try:
        import psutil

        busy = psutil.cpu_percent(interval=sample_s, percpu=True)
        cores = sorted(cores, key=lambda c: (busy[c] if c < len(busy) else 0.0, -c))
    except Exception:  # psutil cannot read per-core load: the highest-numbered cores, away from IRQs on 0
        cores = sorted(cores, reverse=True)
    return sorted(cores[:threads])


#: Workers set aside per call for running in a contention episode, and the wait before the next one
#: (``[timing] contended_retries`` sets the first per matrix). Episodes measured here lasted 2-30 s, a few a
#: minute. Four tries 2.5 s apart (the first setting) cost the default matrix 336 of its 813 s cached;
#: two tries 2 s apart (the second) still set aside 49-115 processes a run, ~40% of its 574-852 s. And
#: they bought nothing measurable: over four cached runs of the default matrix, the cells' speedups from
#: their quiet processes alone (canary <= CONTENDED_RATIO) agreed between two runs no more often than
#: those from their contended ones (7/12 against 20/26, 5/8 against 11/22, 4/9 against 11/26), and a
#: process's speedup hardly follows its canary (median correlation -0.2 to -0.3 within a cell). So by
#: default a contended process is kept at once and flags the row busy: the flag is the canary's value.
CONTENDED_RETRIES = 0
CONTENDED_WAIT_S = 2.0

#: Thread counts at which contention outlasted the last call's retries: the host is in a standing busy
#: state, not an episode, and waiting does not help (a contended run set aside 115 processes in 64
#: cell-passes, 460 of its 852 s, and kept busy ones anyway). Their next call keeps every process and
#: flags it; the first quiet process clears the state. Per harness process, never persisted.
_STANDING: set[int] = set()

#: Fewest rounds one process times: enough for its own block-bootstrap interval (blocks of 3), which
#: the ``disagree`` flag compares with the cell's.
MIN_ROUNDS_PER_PROCESS = 8


def per_process_budget(budget: TimingBudget, n: int) -> TimingBudget:
    """One of ``n`` processes' share of a cell's budget: the seconds and round limits divided among them."""
    if n <= 1:
        return budget
    return replace(budget, budget_s=budget.budget_s / n,
                   min_rounds=max(MIN_ROUNDS_PER_PROCESS, -(-budget.min_rounds // n)),
                   max_rounds=max(MIN_ROUNDS_PER_PROCESS, -(-budget.max_rounds // n)))


def start_fork_server() -> None:
    """Start the fork server now (it imports torch, seconds on a busy machine) so that a cell's first
    timing process does not wait for it; harmless to call again."""
    if can_start_processes() is None:
        _server()


def time_in_processes(
    backend,
    pairs: Sequence[PairSpec],
    *,
    threads: int,
    processes: int,
    pin: bool = False,
    sampler: Callable[..., NoiseSampler] = NoiseSampler,
    canary_reference: CanaryReference | None = None,
    sleep: Callable[[float], None] = time.sleep,
    contended_retries: int | None = None,
    share_of: int | None = None,
) -> list[ProcessRun]:
    """Time ``pairs`` in ``processes`` fresh workers, one after another; each gets ``budget_s/processes``,
    or ``budget_s/share_of`` when these are ``processes`` of a cell's ``share_of`` (its timing passes:
    the cell's budget is for all of them, not for each pass).

    A worker whose canary says it ran in a host-contention episode (:mod:`cpbench.measure.canary`) is
    set aside and another one timed after :data:`CONTENDED_WAIT_S`, at most ``contended_retries``
    (default :data:`CONTENDED_RETRIES`) times per call; a contended process kept is marked busy. ``processes=0`` times in this
    process, once, without a canary (the harness of old and of quick tests).
    """
    if processes < 0:
        raise ValueError(f"processes must be >= 0, got {processes}")
    n = max(1, processes)
    per = [replace(p, budget=per_process_budget(p.budget, max(n, share_of or 0))) for p in pairs]
    why_not = can_start_processes() if processes else "processes = 0"
    payload = None
    if why_not is None:
        try:
            buf = io.BytesIO()
            torch.save({"backend": backend, "pairs": per, "threads": threads}, buf)
            payload = buf.getvalue()
        except Exception as exc:  # a model or backend that does not pickle: time it here
            why_not = f"payload does not pickle ({type(exc).__name__}: {exc})"
    runs: list[ProcessRun] = []
    ref = canary_reference or (reference() if why_not is None else CanaryReference())
    standing = threads in _STANDING
    allowed = CONTENDED_RETRIES if contended_retries is None else contended_retries
    retries, set_aside = (0 if standing else allowed), []
    while len(runs) < n:
        cores = choose_cores(threads) if pin else None
        with sampler(own_threads=threads) as s:
            t0 = time.perf_counter()
            if why_not is None:
                try:
                    res = _server().run(payload, cores)
                    mode = "process"
                except RuntimeError as exc:  # e.g. a model class the worker cannot import: time it here
                    why_not = str(exc).splitlines()[0]
            if why_not is not None:
                res = {"pid": os.getpid(), "pairs": _time_pairs(backend, per, threads), "cores": None}
                mode = "in-process"
            secs = time.perf_counter() - t0
        run = ProcessRun(res["pid"], res["pairs"], res.get("cores"), summarize(s.samples), secs, mode)
        canary = res.get("canary_ms") or []
        if canary:
            ref.add(threads, canary)
            run.noise["canary_ms"] = canary
        if canary and retries and (ref.ratio(threads, max(canary)) or 0) > CONTENDED_RATIO:
            retries -= 1  # timed in a contention episode: set aside, wait for it to pass, time another
            set_aside.append(run)
            sleep(CONTENDED_WAIT_S)
            continue
        runs.append(run)
    for r in runs:  # against the reference as it stands after every process of this call
        canary = r.noise.get("canary_ms")
        if canary:
            _mark_contention(r.noise, ref.ratio(threads, max(canary)))
            if standing and (r.noise["canary_ratio"] or 0) > CONTENDED_RATIO:
                r.noise["contention_standing"] = True
    _note_standing(threads, runs, exhausted=bool(set_aside) and not retries, standing=standing)
    if set_aside:
        runs[-1].noise["contended_set_aside"] = [
            {"pid": r.pid, "canary_ratio": ref.ratio(threads, max(r.noise["canary_ms"]))} for r in set_aside]
    if why_not is not None and processes:
        for r in runs:
            r.noise["why_in_process"] = why_not
    return runs


def _note_standing(threads: int, runs: Sequence[ProcessRun], *, exhausted: bool, standing: bool) -> None:
    """Enter the standing state when the retries ran out with no quiet process; leave it on a quiet one."""
    timed = [r.noise["canary_ratio"] for r in runs if r.noise.get("canary_ratio") is not None]
    if any(ratio <= CONTENDED_RATIO for ratio in timed):
        _STANDING.discard(threads)
    elif timed and (exhausted or standing):
        _STANDING.add(threads)


def _mark_contention(noise: dict, ratio: float | None) -> None:
    """Record the canary ratio; above :data:`CONTENDED_RATIO` the process counts as busy."""
    noise["canary_ratio"] = ratio
    reason = contention_reason(ratio)
    if reason:
        noise["busy"] = True
        noise["reasons"] = list(noise.get("reasons", [])) + [reason]


def pair_samples(runs: Sequence[ProcessRun], label: str) -> list[tuple[list[float], list[float]]]:
    """(baseline rounds, compressed rounds) of ``label`` from every process, for the interval."""
    return [(r.pairs[label]["baseline_ms"], r.pairs[label]["compressed_ms"]) for r in runs]


if __name__ == "__main__":
    # replies go to a private copy of stdout; fd 1 itself goes to stderr, so that anything a worker
    # prints (a compiler's progress, a warning) cannot corrupt them
    _replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, _replies)
