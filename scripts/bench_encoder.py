"""The encoder alone, compiled several ways: time, compile time and the top ops of a profile.

    python scripts/bench_encoder.py [--variant 3.3-2b] [--layers 16] [--seconds 30]
        [--dtype bfloat16] [--ways default freezing ...] [--profile]

Random weights at a variant's encoder shapes. Each way is compiled after a dynamo reset; the
eager encoder and the reference's eager encoder (same weights) are timed alongside. The ways
are the changes tried for docs/bench-notes.md.
"""

import argparse
import contextlib
import copy
import statistics
import time
from unittest import mock

import torch
import torch._inductor.config as inductor_config
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from fms.models import get_model

import fms_speech  # noqa: F401
from fms_speech import roofline
from fms_speech.bench_models import hf_config_from_fms
from fms_speech.compile import compile_model
from fms_speech.models.conformer import BlockRelativeAttention, ConformerConvModule

WAYS = {
    "default": {},
    "freezing": {"freezing": True},
    "no-duck-shape": {},  # fx option, set below
    "max-autotune-gemm": {
        "freezing": True,
        "max_autotune": True,
        "max_autotune_gemm_backends": "CPP,ATEN",
    },
    "cpp-wrapper": {"cpp_wrapper": True},
    "manual-attention": {},  # model patches, below
    "shifted-depthwise": {},
    "freezing+patches": {"freezing": True},
    "project-then-pad": {},
}
PATCHED_WAYS = ("manual-attention", "shifted-depthwise", "freezing+patches", "project-then-pad")


def manual_attention(self, x, frame_valid):
    """BlockRelativeAttention.forward with softmax(q k^T + bias) v written out, not SDPA."""
    batch, num_frames, _ = x.shape
    block = self.context_size
    num_blocks = num_frames // block + 2
    pad = num_blocks * block - num_frames
    x = F.pad(self.pre_norm(x), (0, 0, 0, pad))

    def blocks(t):
        t = t.unflatten(1, (num_blocks, block)).flatten(0, 1)
        return t.unflatten(-1, (self.num_heads, self.dim_head)).transpose(1, 2)

    q = blocks(self.to_q(x))
    k, v = (blocks(t) for t in self.to_kv(x).chunk(2, dim=-1))
    bias = self._positional_scores(q)
    key_valid = F.pad(frame_valid, (0, pad)).unflatten(1, (num_blocks, block)).flatten(0, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale + bias
    scores = scores.masked_fill(~key_valid[:, None, None, :], torch.finfo(scores.dtype).min)
    out = torch.matmul(scores.float().softmax(-1).to(v.dtype), v)
    out = out.transpose(1, 2).flatten(2).unflatten(0, (batch, num_blocks)).flatten(1, 2)
    return self.to_out(out[:, :num_frames])


def project_then_pad(self, x, frame_valid):
    """BlockRelativeAttention.forward with q, k, v projected from the T real frames and padded
    to whole blocks afterwards (the projections have no bias: padding rows stay zero)."""
    batch, num_frames, _ = x.shape
    block = self.context_size
    num_blocks = num_frames // block + 2
    pad = num_blocks * block - num_frames
    x = self.pre_norm(x)

    def blocks(t):
        t = F.pad(t, (0, 0, 0, pad)).unflatten(1, (num_blocks, block)).flatten(0, 1)
        return t.unflatten(-1, (self.num_heads, self.dim_head)).transpose(1, 2)

    q = blocks(self.to_q(x))
    k, v = (blocks(t) for t in self.to_kv(x).chunk(2, dim=-1))
    bias = self._positional_scores(q)
    key_valid = F.pad(frame_valid, (0, pad)).unflatten(1, (num_blocks, block)).flatten(0, 1)
    bias = bias.masked_fill(~key_valid[:, None, None, :], torch.finfo(bias.dtype).min)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    out = out.transpose(1, 2).flatten(2).unflatten(0, (batch, num_blocks)).flatten(1, 2)
    return self.to_out(out[:, :num_frames])


def shifted_depthwise(self, x, frame_valid):
    """ConformerConvModule.forward with the depthwise convolution as k shifted multiply-adds on
    the (B, T, C) layout, and batch norm written out: one fusable chain for inductor."""
    x = self.norm(x)
    x = F.linear(x, self.up_conv.weight.squeeze(-1), self.up_conv.bias)
    x = F.glu(x, dim=-1) * frame_valid.unsqueeze(-1).to(x.dtype)
    num_frames = x.shape[1]
    padded = F.pad(x, (0, 0, *self.padding))
    weight = self.depth_conv.weight[:, 0, :]  # (C, k)
    x = sum(padded[:, i : i + num_frames] * weight[:, i] for i in range(weight.shape[1]))
    bn = self.batch_norm
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    x = F.silu((x - bn.running_mean) * scale + bn.bias)
    return F.linear(x, self.down_conv.weight.squeeze(-1), self.down_conv.bias)


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
    return first, statistics.median(times) if times else first


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


def profile(fn, rows: int = 25) -> str:
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
    parser.add_argument("--check", action="store_true", help="compare each way with eager")
    parser.add_argument("--interleave", action="store_true", help="time the ways in turns")
    parser.add_argument("--reference", action="store_true", help="time the reference eager")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--eager", action="store_true", help="time the eager encoder too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:  # name inductor's fused kernels in the profile
        inductor_config.cpp.enable_kernel_profile = True
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
    if args.eager:
        _, eager = timed(lambda: encoder(features, lengths), args.repeats)
        print(f"fms eager: {eager * 1e3:.0f} ms")
    if args.reference:
        reference = reference_encoder(encoder, model.config, dtype)
        _, ref = timed(lambda: reference(features), args.repeats)
        print(f"reference eager: {ref * 1e3:.0f} ms")
    if args.interleave:
        interleave(args.ways, encoder, features, lengths, flops / rate, args.repeats)
        return
    for way in args.ways:
        run_way(way, encoder, features, lengths, flops / rate, args)


def interleave(ways, encoder, features, lengths, gemm_seconds: float, rounds: int):
    """A/B on a noisy machine: compile every way first (inductor options, no model patches),
    then time them in turns, round after round."""
    compiled = {}
    for way in ways:
        if way == "no-duck-shape":
            raise SystemExit("--interleave cannot change fx options per way")
        module = patched_copy(encoder, way) if way in PATCHED_WAYS else encoder
        compiled[way] = compile_model(module, options=dict(WAYS[way]))
        first, _ = timed(lambda way=way: compiled[way](features, lengths), 0)
        print(f"{way}: first call {first:.1f} s", flush=True)
    times = {way: [] for way in ways}
    for _ in range(rounds):
        for way in ways:
            times[way].append(timed(lambda way=way: compiled[way](features, lengths), 0)[0])
    for way in ways:
        median = statistics.median(times[way])
        spread = f"{min(times[way]) * 1e3:.0f}–{max(times[way]) * 1e3:.0f}"
        print(f"{way}: {median * 1e3:.0f} ms [{spread}] = {median / gemm_seconds:.2f}x GEMM-only")


def _patches(way: str) -> dict:
    patches = {}
    if way in ("manual-attention", "freezing+patches"):
        patches[BlockRelativeAttention] = manual_attention
    if way == "project-then-pad":
        patches[BlockRelativeAttention] = project_then_pad
    if way in ("shifted-depthwise", "freezing+patches"):
        patches[ConformerConvModule] = shifted_depthwise
    return patches


def patched_copy(encoder, way: str):
    """A copy of the encoder whose attention / convolution modules run the way's forward (its
    own classes, so that its compiled code lives beside the original's)."""
    encoder = copy.deepcopy(encoder)
    for base, forward in _patches(way).items():
        patched = type(f"{way}-{base.__name__}", (base,), {"forward": forward})
        for module in encoder.modules():
            if type(module) is base:
                module.__class__ = patched
    return encoder


def run_way(way: str, encoder, features, lengths, gemm_seconds: float, args):
    torch._dynamo.reset()
    fx_config.use_duck_shape = way != "no-duck-shape"
    patches = contextlib.ExitStack()
    if way in ("manual-attention", "freezing+patches"):
        patches.enter_context(
            mock.patch.object(BlockRelativeAttention, "forward", manual_attention)
        )
    if way in ("shifted-depthwise", "freezing+patches"):
        patches.enter_context(mock.patch.object(ConformerConvModule, "forward", shifted_depthwise))
    with patches, inductor_config.patch(WAYS[way]):
        compiled = compile_model(encoder)
        first, median = timed(lambda: compiled(features, lengths), args.repeats)
        if args.check:
            with torch.no_grad():
                expected = encoder.float()(features.float(), lengths)
                encoder.to(features.dtype)
                actual = compiled(features, lengths).float()
            error = ((actual - expected).abs().max() / expected.abs().max()).item()
            print(f"  relative error against fp32 eager: {error:.2e}")
        print(
            f"compiled ({way}): {median * 1e3:.0f} ms = {median / gemm_seconds:.2f}x GEMM-only; "
            f"first call {first:.1f} s",
            flush=True,
        )
        if args.profile:
            print(profile(lambda: compiled(features, lengths)))


if __name__ == "__main__":
    main()
