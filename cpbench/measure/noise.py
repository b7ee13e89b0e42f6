"""Machine noise, measured: how busy the machine is right before and while a cell is timed.

A :func:`snapshot` reads, cheaply and without disturbing the timed process: the load average, the
threads runnable right now (``procs_running`` in ``/proc/stat``) and the other processes psutil sees
running, CPU steal time (a hypervisor giving our vCPU to another guest), current against maximum CPU
frequency and the frequency governor, the cgroup CPU quota, and the SMT siblings of the cores we may
run on. :class:`NoiseSampler` takes snapshots in a background thread of the *parent* while a worker
process times, so the worker's timing loop is never interrupted by the probe; :func:`summarize` turns
the samples into the fields a result row records, and :func:`verdict` into "quiet" or "busy: ...".
None of this sees the host's other tenants; :mod:`.canary` does, and :func:`machine_report` and
:func:`wait_for_quiet` ask it too.

Why not psutil alone: psutil's per-process status is the main thread's state, so a multi-threaded job
with busy worker threads looks "sleeping"; ``procs_running`` counts every runnable thread. psutil still
names the other running processes, which is what a user needs to find the culprit.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence

__all__ = ["BUSY_OTHER_RUNNABLE", "BUSY_STEAL", "SLOW_FREQ", "snapshot", "NoiseSampler", "summarize",
           "verdict", "wait_for_quiet", "machine_report", "format_machine_report"]

#: Mean number of *other* runnable threads (beyond the timed process's own) at or above which the
#: machine counts as busy while a cell was timed. Half a thread means another job was runnable half
#: the time: on a 2-core machine with the timed work on one core, a second process busy on the other
#: core already shares the L3 cache and memory bandwidth with it (the under-load check of issue 17).
#: Not yet calibrated on a quiet machine: every cell measured so far saw 13 to 27 other runnable
#: threads, and processes of one cell then disagreed by up to 10x.
BUSY_OTHER_RUNNABLE = 0.5
#: Fraction of CPU time stolen by the hypervisor at or above which the machine counts as busy.
BUSY_STEAL = 0.05
#: Current/maximum CPU frequency below which a core counts as slowed (power saving, thermal limits).
SLOW_FREQ = 0.9


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _proc_stat() -> tuple[list[float] | None, int | None]:
    """(aggregate cpu jiffies [user nice system idle iowait irq softirq steal], procs_running)."""
    text = _read("/proc/stat") or ""
    cpu, running = None, None
    for line in text.splitlines():
        if line.startswith("cpu "):
            cpu = [float(v) for v in line.split()[1:9]]
        elif line.startswith("procs_running"):
            running = int(line.split()[1])
    return cpu, running


def allowed_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def smt_siblings(cores: Sequence[int]) -> dict[str, list[int]]:
    """Each core's SMT siblings (other hardware threads on the same physical core), from sysfs."""
    out = {}
    for c in cores:
        text = _read(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list")
        if text is None:
            continue
        sib: list[int] = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            sib.extend(range(int(lo), int(hi or lo) + 1))
        out[str(c)] = [s for s in sib if s != c]
    return out


def cgroup_cpu_quota() -> float | None:
    """CPUs the cgroup may use (quota/period), None when unlimited or unreadable (v2 and v1 paths)."""
    v2 = _read("/sys/fs/cgroup/cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" else float(quota) / float(period or 100000)
    quota = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") or _read("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us")
    period = _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us") or _read("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us")
    if quota is None or period is None or int(quota) < 0:
        return None
    return int(quota) / int(period)


def _freq(cores: Sequence[int]) -> tuple[float | None, float | None, str | None]:
    """(mean current MHz, max MHz, governor) over ``cores``; max/governor None where a VM hides them."""
    cur, mx = [], []
    for c in cores:
        base = f"/sys/devices/system/cpu/cpu{c}/cpufreq/"
        f, m = _read(base + "scaling_cur_freq"), _read(base + "cpuinfo_max_freq")
        if f:
            cur.append(float(f) / 1e3)
        if m:
            mx.append(float(m) / 1e3)
    if not cur:  # no cpufreq in sysfs (most VMs): /proc/cpuinfo's "cpu MHz" still says the current clock
        try:
            import psutil

            freqs = psutil.cpu_freq(percpu=True) or []
            cur = [freqs[c].current for c in cores if c < len(freqs) and freqs[c].current]
            mx = [freqs[c].max for c in cores if c < len(freqs) and freqs[c].max]
        except Exception:  # psutil cannot read it here: frequency unknown
            pass
    gov = _read(f"/sys/devices/system/cpu/cpu{cores[0] if cores else 0}/cpufreq/scaling_governor")
    return (sum(cur) / len(cur) if cur else None, max(mx) if mx else None, gov)


def other_running_processes(exclude: Sequence[int] = ()) -> list[str]:
    """Names (and pids) of the other processes psutil sees running right now."""
    try:
        import psutil
    except ImportError:
        return []
    skip = {os.getpid(), *exclude}
    out = []
    for p in psutil.process_iter(["pid", "name", "status"]):
        if p.info["status"] == psutil.STATUS_RUNNING and p.info["pid"] not in skip:
            out.append(f"{p.info['name']}[{p.info['pid']}]")
    return out


def snapshot(*, own_threads: int = 0, cores: Sequence[int] | None = None, names: bool = False) -> dict:
    """One reading of the machine. ``own_threads``: runnable threads of ours to not count as others
    (the prober's own thread is always excluded)."""
    cores = list(cores) if cores is not None else allowed_cores()
    cpu, running = _proc_stat()
    cur, mx, gov = _freq(cores)
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    snap = {
        "t": time.time(), "load_average": load, "procs_running": running,
        "other_runnable": None if running is None else max(0, running - 1 - own_threads),
        "cpu_jiffies": cpu, "freq_mhz": cur, "max_freq_mhz": mx, "governor": gov,
    }
    if names:
        snap["other_processes"] = other_running_processes()
    return snap


def static_noise_facts(cores: Sequence[int] | None = None) -> dict:
    """What does not change between samples: cores allowed, their SMT siblings, cgroup quota."""
    cores = list(cores) if cores is not None else allowed_cores()
    return {"cores_allowed": cores, "logical_cores": os.cpu_count(), "smt_siblings": smt_siblings(cores),
            "cgroup_cpu_quota": cgroup_cpu_quota()}


class NoiseSampler:
    """Snapshots every ``interval_s`` in a daemon thread while a ``with`` block runs (in the parent,
    so the timed worker process is not disturbed); ``samples`` holds them, the first taken on entry."""

    def __init__(self, *, own_threads: int = 0, interval_s: float = 0.2,
                 probe: Callable[..., dict] = snapshot):
        self.own_threads, self.interval_s, self.probe = own_threads, interval_s, probe
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(self.probe(own_threads=self.own_threads))

    def __enter__(self) -> "NoiseSampler":
        self.samples.append(self.probe(own_threads=self.own_threads))
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cpbench-noise")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append(self.probe(own_threads=self.own_threads))


def summarize(samples: Sequence[dict]) -> dict:
    """The noise over a stretch of time, from its snapshots: mean and max other runnable threads, steal
    fraction (from the jiffies of the first and last sample), the lowest current/max frequency ratio,
    load average at the end, and the ``busy`` verdict with its reasons."""
    if not samples:
        return {"busy": False, "reasons": [], "samples": 0}
    others = [s["other_runnable"] for s in samples if s.get("other_runnable") is not None]
    steal = None
    first, last = samples[0].get("cpu_jiffies"), samples[-1].get("cpu_jiffies")
    if first and last:
        total = sum(last) - sum(first)
        steal = (last[7] - first[7]) / total if total > 0 else 0.0
    ratios = [s["freq_mhz"] / s["max_freq_mhz"] for s in samples if s.get("freq_mhz") and s.get("max_freq_mhz")]
    out = {
        "samples": len(samples), "seconds": samples[-1]["t"] - samples[0]["t"],
        "other_runnable_mean": sum(others) / len(others) if others else None,
        "other_runnable_max": max(others) if others else None,
        "steal": steal, "freq_ratio_min": min(ratios) if ratios else None,
        "freq_mhz": samples[-1].get("freq_mhz"), "governor": samples[-1].get("governor"),
        "load_average": samples[-1].get("load_average"),
    }
    reasons = busy_reasons(out)
    out.update(busy=bool(reasons), reasons=reasons)
    return out


def busy_reasons(summary: dict) -> list[str]:
    """Why a summarised stretch counts as busy (empty: quiet), against the documented thresholds."""
    reasons = []
    om = summary.get("other_runnable_mean")
    if om is not None and om >= BUSY_OTHER_RUNNABLE:
        reasons.append(f"{om:.1f} other runnable threads on average")
    st = summary.get("steal")
    if st is not None and st >= BUSY_STEAL:
        reasons.append(f"{100 * st:.0f}% steal")
    fr = summary.get("freq_ratio_min")
    if fr is not None and fr < SLOW_FREQ:
        reasons.append(f"CPU at {100 * fr:.0f}% of its maximum frequency")
    return reasons


def verdict(summary: dict) -> str:
    """"quiet" or "busy: <reasons>"."""
    return "busy: " + ", ".join(summary["reasons"]) if summary.get("busy") else "quiet"


def wait_for_quiet(max_seconds: float, *, own_threads: int = 0, window_s: float = 2.0,
                   probe: Callable[..., dict] = snapshot, sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic,
                   canary: Callable[[], float | None] | None = None) -> dict:
    """Wait, at most ``max_seconds``, for a ``window_s`` stretch that :func:`summarize` calls quiet
    and, with ``canary`` (the reference GEMM's ratio to its quiet level, :mod:`.canary`), whose canary
    at its end is not contended: the guest can look idle while the host's other tenants slow it.

    Returns ``{"waited_s", "quiet", "last"}`` (``last``: the summary of the last window). It never
    raises for a busy machine: the caller records the cell as measured on a busy one.
    """
    start = clock()
    while True:
        samples = [probe(own_threads=own_threads)]
        t0 = clock()
        while clock() - t0 < window_s:
            sleep(min(0.25, window_s))
            samples.append(probe(own_threads=own_threads))
        last = summarize(samples)
        if canary is not None and not last["busy"]:
            _add_contention(last, canary())
        if not last["busy"] or clock() - start >= max_seconds:
            return {"waited_s": clock() - start, "quiet": not last["busy"], "last": last}


def _add_contention(summary: dict, ratio: float | None) -> None:
    """Record a canary ratio in a summary; a contended one makes it busy, with its reason."""
    from .canary import contention_reason

    summary["canary_ratio"] = ratio
    reason = contention_reason(ratio)
    if reason:
        summary.update(busy=True, reasons=[*summary.get("reasons", []), reason])


def machine_report(window_s: float = 3.0, *, host: Callable[[], dict] | None = None) -> dict:
    """What ``cpbench machine`` prints: facts, a ``window_s`` summary, the host's contention (``host``:
    the canary probe, :func:`.canary.contention_now` at one thread), the verdict and advice."""
    if host is None:
        from .canary import contention_now as host
    samples = []
    with NoiseSampler(interval_s=0.25) as s:
        time.sleep(window_s)
    samples = s.samples
    summary = summarize(samples)
    canary = host()
    _add_contention(summary, canary.get("canary_ratio"))
    facts = static_noise_facts()
    advice = []
    from .canary import contention_reason

    if contention_reason(canary.get("canary_ratio")):
        advice.append("the host's other tenants are slowing this VM though nothing in it shows: cells timed now "
                      "are flagged busy; wait for a quiet spell (--require-quiet SECONDS waits for one) or time "
                      "on a dedicated host")
    if summary.get("other_runnable_mean") and summary["other_runnable_mean"] >= BUSY_OTHER_RUNNABLE:
        advice.append("other jobs are running: wait for them, or pass --require-quiet SECONDS to `cpbench run` "
                      "(it waits for a quiet machine and flags cells measured on a busy one)")
    if summary.get("steal") is not None and summary["steal"] >= BUSY_STEAL:
        advice.append("the hypervisor is taking CPU time from this VM (steal): a dedicated host or a "
                      "larger instance gives steadier timings")
    if summary.get("freq_ratio_min") is not None and summary["freq_ratio_min"] < SLOW_FREQ:
        advice.append("the CPU runs below its maximum clock: set the governor to 'performance' "
                      "(cpupower frequency-set -g performance) or check cooling")
    if summary.get("governor") not in (None, "performance"):
        advice.append(f"frequency governor is {summary['governor']!r}: 'performance' keeps the clock steady")
    if facts["cgroup_cpu_quota"] is not None and facts["cgroup_cpu_quota"] < len(facts["cores_allowed"]):
        advice.append(f"the cgroup CPU quota ({facts['cgroup_cpu_quota']:.2g} CPUs) is below the cores allowed "
                      f"({len(facts['cores_allowed'])}): threads beyond the quota are throttled")
    if any(facts["smt_siblings"].values()):
        advice.append("cores share SMT siblings: a neighbour on a sibling slows the timed core; time at "
                      "threads <= physical cores")
    return {"facts": facts, "summary": summary, "verdict": verdict(summary), "host": canary,
            "other_processes": other_running_processes(), "advice": advice}


def format_machine_report(report: dict) -> str:
    """``cpbench machine``'s text: the verdict first, then what was measured, then what to do."""
    s, f = report["summary"], report["facts"]

    def num(v, fmt):
        return "unknown" if v is None else fmt.format(v)

    lines = [f"machine: {report['verdict']}",
             f"  watched {s.get('seconds', 0):.1f} s: other runnable threads mean "
             f"{num(s.get('other_runnable_mean'), '{:.1f}')} (max {num(s.get('other_runnable_max'), '{}')}), "
             f"steal {num(s.get('steal') and 100 * s['steal'], '{:.1f}%')}",
             f"  load average {num(s.get('load_average') and [round(v, 2) for v in s['load_average']], '{}')} on {len(f['cores_allowed'])} allowed cores "
             f"{f['cores_allowed']} of {f['logical_cores']}",
             f"  CPU clock {num(s.get('freq_mhz'), '{:.0f} MHz')}, lowest/max "
             f"{num(s.get('freq_ratio_min') and 100 * s['freq_ratio_min'], '{:.0f}%')}, governor "
             f"{s.get('governor') or 'not exposed (VM)'}",
             f"  cgroup CPU quota {num(f['cgroup_cpu_quota'], '{:.2g} CPUs') if f['cgroup_cpu_quota'] else 'none'}; "
             f"SMT siblings {f['smt_siblings'] if any(f['smt_siblings'].values()) else 'none'}"]
    h = report.get("host") or {}
    if h.get("canary_ms") is not None:
        lines.append(f"  host: reference GEMM {h['canary_ms']:.3f} ms at {h['threads']} thread(s), "
                     + (f"{h['canary_ratio']:.2f}x its quiet level ({h['reference_ms']:.3f} ms, "
                        f"from {h['window']} past canaries)" if h.get("canary_ratio") is not None
                        else "no quiet level learned yet (the timing workers' canaries teach it)"))
    if report.get("other_processes"):
        lines.append("  running now: " + ", ".join(report["other_processes"][:8]))
    lines += [f"  advice: {a}" for a in report["advice"]] or ["  advice: none; timings here should be steady"]
    return "\n".join(lines)
