"""Measuring tools of `fms-speech bench`: timers, peak memory, compile counters, profiles and
torch._dynamo.explain."""

import os
import statistics
import subprocess
import sys
import time

import torch
from torch._dynamo.utils import counters, guard_failures

from fms_speech import bench_models as models


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


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
    """Peak memory above the level at entry: CUDA allocator peak, or sampled RSS on CPU."""

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
            _release_free_memory()
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


def _release_free_memory():
    """Give freed heap back to the OS so that the RSS at entry is the memory in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def compile_counts() -> dict:
    from torch._dynamo import convert_frame

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
    torch._dynamo.reset()
    guard_failures.clear()
    return compile_counts()


def profile_call(fn, device: torch.device, rows: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    with profile(activities=activities) as prof, torch.no_grad():
        fn()
        synchronize(device)
    averages = prof.key_averages()
    total = sum(getattr(e, sort.removesuffix("_total")) for e in averages) or 1.0
    top = sorted(averages, key=lambda e: -getattr(e, sort.removesuffix("_total")))[:rows]
    return {
        "table": averages.table(sort_by=sort, row_limit=rows),
        "top": [
            {
                "op": e.key,
                "self_ms": getattr(e, sort.removesuffix("_total")) / 1000,
                "share": getattr(e, sort.removesuffix("_total")) / total,
                "calls": e.count,
            }
            for e in top
        ],
    }


def explain_graphs(reference, fms_model, batch: models.Batch, device) -> dict:
    """torch._dynamo.explain of each implementation's prefill forward (graphs and breaks)."""
    features, lengths = models.features_of(batch, device)
    prompts = batch.prompts
    ids, attention = models._left_pad(prompts, device)
    audio = reference.config.audio_token_index
    counts = (ids == audio).sum(dim=1)
    mask = torch.arange(int(counts.max()), device=device)[None, :] < counts[:, None]
    result = {}
    with torch.no_grad():
        torch._dynamo.reset()
        ref = torch._dynamo.explain(reference)(
            input_ids=ids,
            attention_mask=attention,
            input_features=features.to(reference.dtype),
            input_features_mask=mask,
            use_cache=True,
        )
        torch._dynamo.reset()
        ours = torch._dynamo.explain(fms_model)(
            ids, input_features=features.to(models._dtype(fms_model)), feature_lengths=lengths
        )
        torch._dynamo.reset()
    for name, explanation in (("reference", ref), ("fms", ours)):
        reasons = [str(r.reason).splitlines()[0][:160] for r in explanation.break_reasons]
        result[name] = {
            "graphs": explanation.graph_count,
            "graph_breaks": explanation.graph_break_count,
            "break_reasons": sorted(set(reasons)),
        }
    return result
