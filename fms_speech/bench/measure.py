"""Measuring tools of the bench and its experiments: timers, peak memory, compile counters and
profiles."""

import contextlib
import ctypes
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo import convert_frame
from torch._dynamo.utils import counters, guard_failures
from torch.profiler import ProfilerActivity, profile


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def repeat_timed(
    fn: Callable[[], Any], device: torch.device, warmup: int = 1, repeats: int = 3
) -> tuple[float, list[tuple[float, Any]]]:
    """The first call's seconds (warm-up included: compilation shows there), then
    `warmup - 1` untimed calls, then `repeats` timed ones as (seconds, result)."""
    first, _ = timed(fn, device)
    for _ in range(warmup - 1):
        fn()
    return first, [timed(fn, device) for _ in range(repeats)]


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int = 1, repeats: int = 3):
    """{'first_call', 'median', 'min', 'max'} in seconds (see `repeat_timed`)."""
    first, runs = repeat_timed(fn, device, warmup, repeats)
    return {"first_call": first, **summary([seconds for seconds, _ in runs])}


# Samples the RSS of process `pid` from outside: a sampling thread would take the GIL from
# the model's Python code every few milliseconds.
_RSS_SAMPLER = """
import os, select, sys
statm, page, peak = f"/proc/{sys.argv[1]}/statm", os.sysconf("SC_PAGE_SIZE"), 0
while not select.select([sys.stdin], [], [], 0.005)[0]:
    with open(statm) as f:
        peak = max(peak, int(f.read().split()[1]) * page)
print(peak)
"""


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, or sampled RSS on CPU.

    After the block: `result` = {'peak_bytes', 'above_start_bytes'}.
    """

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            release_free_memory()
            self.start = self.rss()
            self.sampler = subprocess.Popen(
                [sys.executable, "-c", _RSS_SAMPLER, str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            output, _ = self.sampler.communicate("")
            peak = max(int(output or 0), self.rss())
        self.result = {"peak_bytes": peak, "above_start_bytes": peak - self.start}


def release_free_memory() -> None:
    """Give freed heap back to the OS so that the RSS at entry is the memory in use."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def compile_counts() -> dict:
    compiles = convert_frame.FRAME_COMPILE_COUNTER.values()
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "recompiles": sum(max(0, n - 1) for n in compiles),
    }


def counts_since(before: dict) -> dict:
    after = compile_counts()
    # recompiles restart from zero at each dynamo reset: `before` is taken right after one
    delta = {k: after[k] - before[k] for k in ("graphs", "graph_breaks")}
    delta["recompiles"] = after["recompiles"]
    reasons = sorted(
        {r.split(": ", 1)[-1].splitlines()[0] for rs in guard_failures.values() for r in rs}
    )
    delta["recompile_reasons"] = [r[:200] for r in reasons[:8]]
    return delta


def fresh_dynamo() -> dict:
    """Reset dynamo (every compiled graph forgotten); the counts to pass to `counts_since`."""
    torch._dynamo.reset()
    guard_failures.clear()
    return compile_counts()


def profile_call(fn: Callable[[], Any], device: torch.device, rows: int = 15) -> dict:
    """One call under torch.profiler: {'table': text, 'top': the `rows` costliest ops}."""
    activities = [ProfilerActivity.CPU]
    sort = "self_cpu_time"
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort = "self_cuda_time"
    with profile(activities=activities) as prof, torch.no_grad():
        fn()
        synchronize(device)
    averages = prof.key_averages()
    total = sum(getattr(e, sort) for e in averages) or 1.0
    top = sorted(averages, key=lambda e: -getattr(e, sort))[:rows]
    return {
        "table": averages.table(sort_by=f"{sort}_total", row_limit=rows),
        "top": [
            {
                "op": e.key,
                "self_ms": getattr(e, sort) / 1000,
                "share": getattr(e, sort) / total,
                "calls": e.count,
            }
            for e in top
        ],
    }
