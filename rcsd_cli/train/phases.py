"""Where a training step's time and memory go: seconds and peak resident memory per phase.

Each step of ``rcsd train`` records rollout, analysis (reason-first), teacher forward, student
forward+backward, optimizer and weight-push times in metrics.parquet, so a slow run shows its
bottleneck without a profiler. Peak RSS per phase uses Linux's resettable high-water mark
(``/proc/self/clear_refs``); elsewhere it falls back to the process's lifetime peak. On a GPU phases are
timed by CUDA events read once per step, and the CUDA allocator's peak is recorded too.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager

import torch

PHASES = ("rollout", "analysis", "reward", "teacher", "student", "optimizer", "push", "eval")


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_gib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in GiB; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def current_rss_gib() -> float:
    """This process's resident memory now (Linux; 0 where /proc is missing)."""
    return _proc_status_gib("VmRSS") or 0.0


def _rss_peak_gib() -> float:
    peak = _proc_status_gib("VmHWM")
    if peak is not None:
        return peak
    scale = 2**30 if sys.platform == "darwin" else 2**20  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class PhaseClock:
    """Accumulates seconds and peaks per phase over one step; ``take()`` returns and resets them.

    On a GPU the phases are timed with CUDA events, read once per step in ``take()``: one synchronisation per
    step instead of two per phase, which would stall the host between every phase. The allocator's peak is
    host-side bookkeeping and needs no synchronisation."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self._reset()

    def _reset(self):
        self.seconds = {p: 0.0 for p in PHASES}
        self.peak_rss = {}
        self.peak_gpu = 0.0
        self._events = []  # (phase, start, end) CUDA events, read in take()

    @contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
        _reset_rss_peak()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events.append((phase, begin, end))
                self.peak_gpu = max(self.peak_gpu, torch.cuda.max_memory_allocated() / 2**30)
            else:
                self.seconds[phase] += time.perf_counter() - start
            self.peak_rss[phase] = max(self.peak_rss.get(phase, 0.0), _rss_peak_gib())

    def take(self) -> dict:
        """This step's figures as MetricsRow fields."""
        if self._events:
            torch.cuda.synchronize()  # the step's one wait, for all its events
            for phase, begin, end in self._events:
                self.seconds[phase] += begin.elapsed_time(end) / 1000
        out = {f"{p}_seconds": round(s, 4) for p, s in self.seconds.items()}
        out["peak_rss_gib"] = round(max(self.peak_rss.values(), default=_rss_peak_gib()), 3)
        out["phase_peak_rss_gib"] = {p: round(v, 3) for p, v in self.peak_rss.items()}
        out["peak_gpu_gib"] = round(self.peak_gpu, 3) if self.cuda else None
        self._reset()
        return out


@contextmanager
def no_clock(_phase: str):
    yield
