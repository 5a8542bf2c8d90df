"""Compile time and graph count over clip shapes; dynamic shapes against static per-shape graphs.

    python -m fms_speech.bench.experiments.shapes [--variant 3.3-2b] [--encoder-layers 2]
        [--llm-layers 2] [--shapes 3sx1 10sx2 ...] [--steps 5] [--static] [--eager]

One forward with an audio prompt per call, random weights. The dynamic graph (`compile_model`)
meets the shapes in order: its first call at each shape is compile time plus one step, and the
graph count shows which shapes compiled. `--static` compiles one static graph per shape after a
dynamo reset (length buckets); `--eager` times the model uncompiled; `--steps N`: the median of
N more calls per shape.

Set TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0 for cold compiles; leave them
for the warm-cache time of a second process.
"""

import argparse

import torch

from fms_speech.bench.experiments.random_weights import audio_prompts, variant_model
from fms_speech.bench.measure import compile_counts, time_calls, timed
from fms_speech.bench.settings import ClipShape
from fms_speech.compile import compile_model

CPU = torch.device("cpu")
# batch 1 first (its own graph), then the dynamic graph; long, wide, odd sizes after it
DEFAULT_SHAPES = [ClipShape(s, b) for s, b in [(3, 1), (10, 2), (30, 4), (60, 1), (1, 8), (17, 3)]]


def forward_call(runner, model, shape: ClipShape):
    prompts, features, _ = audio_prompts(model, shape.batch, shape.seconds)
    ids = torch.tensor(prompts)
    return lambda: runner(ids, input_features=features)


def measure(label: str, runner, model, shape: ClipShape, steps: int, compiled: bool) -> None:
    call = forward_call(runner, model, shape)
    if steps:
        stats = time_calls(call, CPU, warmup=1, repeats=steps)
        first, step = stats["first_call"], f", step {stats['median'] * 1e3:7.1f} ms"
    else:
        first, step = timed(call, CPU)[0], ""
    graphs = f", graphs so far {compile_counts()['graphs']}" if compiled else ""
    print(f"{label:<8} {shape.key:>8}: first call {first:6.2f} s{step}{graphs}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="3.3-2b")
    parser.add_argument("--encoder-layers", type=int, default=2)
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument(
        "--shapes", nargs="+", type=ClipShape.from_key, default=DEFAULT_SHAPES, help="e.g. 10sx4"
    )
    parser.add_argument("--steps", type=int, default=0, help="timed calls after the first")
    parser.add_argument("--static", action="store_true", help="one static graph per shape too")
    parser.add_argument("--eager", action="store_true", help="the uncompiled model too")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model = variant_model(args.variant, args.encoder_layers, args.llm_layers)
    dynamic = compile_model(model)
    for shape in args.shapes:
        measure("dynamic", dynamic, model, shape, args.steps, compiled=True)
    if args.static:
        for shape in args.shapes:
            torch._dynamo.reset()
            static = torch.compile(model, fullgraph=True, dynamic=False)
            measure("static", static, model, shape, args.steps, compiled=True)
    if args.eager:
        for shape in args.shapes:
            measure("eager", model, model, shape, args.steps, compiled=False)


if __name__ == "__main__":
    main()
