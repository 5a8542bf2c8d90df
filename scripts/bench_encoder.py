"""The encoder alone, compiled several ways: time, compile time and the top ops of a profile.

    python scripts/bench_encoder.py [--variant 3.3-2b] [--layers 16] [--seconds 30]
        [--dtype bfloat16] [--ways default freezing ...] [--profile]

Random weights at a variant's encoder shapes. Each way is compiled after a dynamo reset; the
eager encoder and the reference's eager encoder (same weights) are timed alongside. The ways
are the changes tried for docs/bench-notes.md.
"""

import argparse
import statistics
import time

import torch
import torch._inductor.config as inductor_config
import torch.fx.experimental._config as fx_config
from fms.models import get_model

import fms_speech  # noqa: F401
from fms_speech import roofline
from fms_speech.bench_models import hf_config_from_fms
from fms_speech.compile import compile_model

WAYS = {
    "default": {},
    "freezing": {"freezing": True},
    "no-duck-shape": {},  # fx option, set below
    "max-autotune-gemm": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "CPP,ATEN"},
    "cpp-wrapper": {"cpp_wrapper": True},
}


def timed(fn, repeats: int) -> tuple[float, float]:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def reference_encoder(fms_encoder, config, dtype):
    """transformers' encoder holding the same weights (through the checkpoint key mapping)."""
    from transformers.models.granite_speech.modeling_granite_speech import (
        GraniteSpeechCTCEncoder,
    )

    hf = hf_config_from_fms(config).encoder_config
    encoder = GraniteSpeechCTCEncoder(hf).to(dtype).eval()
    ours = fms_encoder.state_dict()
    renamed = {}
    for name in encoder.state_dict():
        source = (
            name.replace("up_proj", "mlp.w1")
            .replace("down_proj", "mlp.w2")
            .replace("depth_conv.conv", "depth_conv")
        )
        if source in ours:
            renamed[name] = ours[source]
    encoder.load_state_dict(renamed, strict=False)
    return encoder


def profile(fn, rows: int = 12) -> str:
    from torch.profiler import profile as torch_profile

    with torch_profile() as prof, torch.no_grad():
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="3.3-2b")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--ways", nargs="+", default=["default"], choices=list(WAYS))
    parser.add_argument("--reference", action="store_true", help="time the reference eager")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = get_model("granite_speech", args.variant, encoder_config={"num_layers": args.layers})
    encoder = model.encoder.to(dtype).eval()
    frames = int(args.seconds * 50)
    features = torch.randn(args.batch, frames, 160).to(dtype)
    lengths = torch.full((args.batch,), frames)
    flops = roofline.encoder_flops(encoder.config, frames, args.batch)["matmul"]
    rate = roofline.gemm_rate(dtype, torch.device("cpu"))
    print(
        f"{args.variant} encoder, {args.layers} layers, {args.seconds:g} s x{args.batch}, {dtype}"
    )
    print(f"GEMM rate {rate / 1e9:.0f} GFLOP/s; matmul FLOPs {flops / 1e9:.1f} G; ")
    print(f"GEMM-only time {flops / rate * 1e3:.0f} ms")
    _, eager = timed(lambda: encoder(features, lengths), args.repeats)
    print(f"fms eager: {eager * 1e3:.0f} ms")
    if args.reference:
        reference = reference_encoder(encoder, model.config, dtype)
        _, ref = timed(lambda: reference(features), args.repeats)
        print(f"reference eager: {ref * 1e3:.0f} ms")
    for way in args.ways:
        run_way(way, encoder, features, lengths, flops / rate, args)


def run_way(way: str, encoder, features, lengths, gemm_seconds: float, args):
    torch._dynamo.reset()
    fx_config.use_duck_shape = way != "no-duck-shape"
    with inductor_config.patch(WAYS[way]):
        compiled = compile_model(encoder)
        first, median = timed(lambda: compiled(features, lengths), args.repeats)
        print(
            f"compiled ({way}): {median * 1e3:.0f} ms = {median / gemm_seconds:.2f}x GEMM-only; "
            f"first call {first:.1f} s",
            flush=True,
        )
        if args.profile:
            print(profile(lambda: compiled(features, lengths)))


if __name__ == "__main__":
    main()
