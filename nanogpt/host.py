"""What a timing ran on, and whether to trust it: the CPU, its measured FMA peak, and how busy
the machine was while we timed.

    host_info()           {"cpu": model name, "simd": ..., "threads": n, "fma_peak_gflops": x, "bf16_peak_gflops": y}
    with LoadWatch() as w: ...time something...
    w.busy, w.verdict()   did other processes compete for our CPUs (from /proc/stat)?

Busy detection reads the kernel's CPU counters, not the clock: over the timed span, the CPUs
we may run on (sched_getaffinity) were busy for S seconds in all, of which our own process
used C (process CPU time, every thread); S − C is what other processes took from us. A
machine is called busy when others took at least BUSY_CPUS CPUs on average, or when there
were fewer CPUs left for us than we have threads. /proc/stat's procs_running (runnable tasks
at the end) is reported too. Where /proc is missing (not Linux), the verdict says so.
"""
from __future__ import annotations

import functools
import os
import time

import torch

BUSY_CPUS = 0.25  # other processes using a quarter of a CPU on average already shift medians
CLOCK_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/stat's unit


# ---------------------------------------------------------------------------------------
# The host: CPU model and FMA peak


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo (text given for tests), or the platform's."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            import platform

            return platform.processor() or platform.machine() or "unknown CPU"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model") and value.strip():
            return " ".join(value.split())
    return "unknown CPU"


PEAKS = {"fma_peak_gflops": "fma_peak_gflops", "bf16_peak_gflops": "bf16_dot_peak_gflops",
         "amx_peak_gflops": "amx_peak_gflops"}  # host_info's key: the extension's measuring function
PEAK_DRIFT = 0.15  # peaks measured before and after a run that differ by more: the host's speed moved


def measure_peak(key: str, threads: int, seconds: float = 0.3) -> float:
    """One of host_info's peaks (a key of PEAKS) measured now, not cached: what the same CPUs
    reach on independent chains of the instruction (csrc/peak.cpp); 0 where the CPU lacks it."""
    import nanogpt

    return getattr(nanogpt.extension(), PEAKS[key])(threads, seconds)


@functools.lru_cache(maxsize=None)
def host_info(threads: int | None = None, seconds: float = 0.3) -> dict:
    """{cpu, simd, threads, fma_peak_gflops, bf16_peak_gflops (0 without AVX-512 BF16),
    amx_peak_gflops (0 without AMX)}: measured once per process (about `seconds` each), with
    torch's thread count unless given. A peak is the ceiling every GFLOP/s figure is a share of."""
    import nanogpt

    threads = threads or torch.get_num_threads()
    return {"cpu": cpu_model(), "simd": nanogpt.extension().compiled_info().get("cxx_simd", "?"),
            "threads": threads, **{key: measure_peak(key, threads, seconds) for key in PEAKS}}


def peak_drift(name: str, before: float, after: float) -> str | None:
    """A warning when a peak measured before a run (`before`, GFLOP/s) and again after it differ
    by more than PEAK_DRIFT, else None. This machine kind shares its cores: the same host has
    measured half its FMA peak for minutes and then the whole of it again, and a row timed in
    one phase then looks twice as good a share of a peak measured in the other."""
    if max(before, after) <= 0 or abs(after - before) <= PEAK_DRIFT * max(before, after):
        return None
    return (f"the host's speed changed during this run: its {name} measured {before:.0f} GFLOP/s before "
            f"the timings and {after:.0f} after, so %peak is only as good as that; compare rows by "
            "xSDPA (timed in the same loop)")


def format_host(info: dict) -> str:
    bf16, amx = info.get("bf16_peak_gflops"), info.get("amx_peak_gflops")
    return (f"host: {info['cpu']} ({info['simd']}), {info['threads']} threads, "
            f"FMA peak {info['fma_peak_gflops']:.0f} GFLOP/s"
            + (f", bf16 dot peak {bf16:.0f} GFLOP/s (vdpbf16ps)" if bf16 else "")
            + (f", AMX bf16 peak {amx:.0f} GFLOP/s" if amx else "") + " (measured now)")


# ---------------------------------------------------------------------------------------
# Was the machine busy?


def cpu_busy_seconds(stat: str, cpus) -> float:
    """Seconds the given CPUs spent busy (everything but idle and iowait) since boot, from the
    text of /proc/stat (its per-CPU lines "cpuN user nice system idle iowait irq softirq steal
    ..."); steal counts as busy: a hypervisor that gives our CPU to another guest slows us too."""
    ticks = 0
    wanted = {f"cpu{c}" for c in cpus}
    for line in stat.splitlines():
        fields = line.split()
        if fields and fields[0] in wanted:
            values = [int(x) for x in fields[1:9]]
            ticks += sum(values) - values[3] - values[4]  # minus idle and iowait
    return ticks / CLOCK_TICK


def procs_running(stat: str) -> int | None:
    """Runnable tasks right now (our own running threads included), from /proc/stat's text."""
    for line in stat.splitlines():
        if line.startswith("procs_running"):
            return int(line.split()[1])
    return None


def judge_load(wall: float, own_cpu: float, cpus_busy: float, ncpu: int, threads: int,
               running: int | None = None) -> tuple[bool, str]:
    """(busy, one-line verdict) from one timed span: `wall` seconds long, during which our
    process used `own_cpu` CPU seconds and our `ncpu` CPUs were busy `cpus_busy` seconds in
    all. Pure arithmetic, so tests can feed it readings of their own."""
    if wall <= 0:
        return False, "load: span too short to judge"
    others = max(0.0, cpus_busy - own_cpu) / wall  # CPUs other processes used on average
    ours = own_cpu / wall
    left = ncpu - others
    busy = others >= BUSY_CPUS or left < threads - 0.5
    detail = (f"other processes used {others:.2f} of {ncpu} CPUs on average while we timed, "
              f"we used {ours:.2f} for {threads} threads"
              + (f"; {running} tasks runnable at the end" if running is not None else ""))
    if busy:
        return True, f"MACHINE BUSY, timing not to be trusted: {detail}"
    return False, f"machine quiet: {detail}"


class LoadWatch:
    """Context manager around a timed span: afterwards .busy and .verdict() say whether other
    processes competed for our CPUs meanwhile. `read_stat` (tests) returns /proc/stat's text."""

    def __init__(self, read_stat=None, cpus=None, threads: int | None = None):
        self.read_stat = read_stat or _read_proc_stat
        self.cpus = sorted(cpus if cpus is not None else _our_cpus())
        self.threads = threads or torch.get_num_threads()
        self.busy, self._verdict = False, "load: not measured"

    def __enter__(self):
        self._stat0 = self.read_stat()
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        wall, own = time.perf_counter() - self._wall0, time.process_time() - self._cpu0
        stat1 = self.read_stat()
        if self._stat0 is None or stat1 is None:
            self._verdict = "load: unknown (no /proc/stat on this system)"
            return False
        busy_s = cpu_busy_seconds(stat1, self.cpus) - cpu_busy_seconds(self._stat0, self.cpus)
        self.busy, self._verdict = judge_load(wall, own, busy_s, len(self.cpus), self.threads,
                                              procs_running(stat1))
        return False

    def verdict(self) -> str:
        return self._verdict


def _read_proc_stat() -> str | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return f.read()
    except OSError:
        return None


def _our_cpus():
    try:
        return os.sched_getaffinity(0)
    except AttributeError:
        return range(os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------
# How long will it take?


def quadratic_total(lengths, trials) -> float:
    """Seconds for one forward pass per context length in `lengths`, with a pass over L tokens
    modelled as c0 + c1·L + c2·L² (overhead, the linear layers, the attention) and fitted to
    the measured trials [(L, seconds), ...] (three or more distinct L for the full model;
    fewer fit fewer terms). A pass never counts as taking less than no time."""
    import numpy as np

    ls, ts = zip(*trials)
    coeffs = np.polyfit(ls, ts, deg=min(2, len(set(ls)) - 1))
    return float(np.clip(np.polyval(coeffs, np.asarray(lengths, dtype=float)), 0, None).sum())


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
