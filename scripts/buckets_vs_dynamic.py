"""Dynamic shapes against static per-bucket graphs: compile time and step time, side by side.

    python scripts/buckets_vs_dynamic.py

Random weights at the 3.3-2b widths with 2 encoder and 2 LLM layers (to keep compiles short on
a 2-core CPU); each shape is run after a warm-up, median of 5.
"""

import statistics
import time

import torch
from fms.models import get_model

import fms_speech  # noqa: F401
from fms_speech.compile import compile_model

SHAPES = [(1, 10), (4, 30)]  # (batch, seconds)


def inputs(model, batch, seconds):
    features = torch.randn(batch, seconds * 50, 160)
    count = int(model.audio_token_counts(features[:1]).item())
    ids = torch.tensor([[5] + [model.config.audio_token_index] * count + [6, 7]] * batch)
    return ids, features


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    with torch.no_grad():
        fn(*args, **kwargs)
    return time.perf_counter() - start


def main():
    torch.manual_seed(0)
    model = get_model(
        "granite_speech", "3.3-2b", encoder_config={"num_layers": 2}, text_config={"nlayers": 2}
    ).eval()
    dynamic = compile_model(model)
    for batch, seconds in SHAPES:
        ids, features = inputs(model, batch, seconds)
        compile_s = timed(dynamic, ids, input_features=features)
        steps = [timed(dynamic, ids, input_features=features) for _ in range(5)]
        print(f"dynamic  b={batch} {seconds}s: first call {compile_s:6.1f} s, "
              f"step {statistics.median(steps) * 1e3:7.1f} ms", flush=True)
    for batch, seconds in SHAPES:
        torch._dynamo.reset()
        static = torch.compile(model, fullgraph=True, dynamic=False)
        ids, features = inputs(model, batch, seconds)
        compile_s = timed(static, ids, input_features=features)
        steps = [timed(static, ids, input_features=features) for _ in range(5)]
        print(f"static   b={batch} {seconds}s: first call {compile_s:6.1f} s, "
              f"step {statistics.median(steps) * 1e3:7.1f} ms", flush=True)
    steps = [timed(model, ids, input_features=features) for _ in range(5)]
    print(f"eager    b={batch} {seconds}s: step {statistics.median(steps) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
