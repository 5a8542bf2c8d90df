"""The encoder alone, compiled several ways: time, compile time and the top ops of a profile.

    python -m fms_speech.bench.experiments.encoder [--variant 3.3-2b] [--layers 16]
        [--seconds 30] [--dtype bfloat16] [--ways default freezing ...] [--profile]

Random weights at a variant's encoder shapes. Each way is compiled after a dynamo reset; the
eager encoder and the reference's eager encoder (same weights) are timed alongside. The ways
are the changes tried for docs/bench-notes.md.
"""

import argparse
import copy

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

from fms_speech.bench import roofline
from fms_speech.bench.experiments.random_weights import audio_prompts, variant_model
from fms_speech.bench.measure import profile_call, summary, time_calls, timed
from fms_speech.compile import compile_model
from fms_speech.models.conformer import BlockRelativeAttention, ConformerConvModule
from fms_speech.testing.reference import reference_encoder, relative_error

CPU = torch.device("cpu")
WAYS = {
    "default": {},
    "freezing": {"freezing": True},
    "max-autotune-gemm": {
        "freezing": True,
        "max_autotune": True,
        "max_autotune_gemm_backends": "CPP,ATEN",
    },
    "cpp-wrapper": {"cpp_wrapper": True},
    "manual-attention": {},  # model patches, see _patches
    "shifted-depthwise": {},
    "freezing+patches": {"freezing": True},
    "project-then-pad": {},
}


def attention_variant(project_first: bool, written_out: bool):
    """BlockRelativeAttention.forward, changed (fms_speech.models.conformer has the original).

    project_first: q, k, v projected from the T real frames and padded to whole blocks
    afterwards (the projections have no bias: padding rows stay zero); written_out:
    softmax(q k^T + bias) v as matrix products and a float32 softmax, not SDPA.
    """

    def forward(self, x, frame_valid):
        batch, num_frames, _ = x.shape
        block = self.context_size
        num_blocks = num_frames // block + 2
        pad = num_blocks * block - num_frames
        x = self.pre_norm(x)
        if not project_first:
            x = F.pad(x, (0, 0, 0, pad))

        def blocks(t):
            if project_first:
                t = F.pad(t, (0, 0, 0, pad))
            t = t.unflatten(1, (num_blocks, block)).flatten(0, 1)
            return t.unflatten(-1, (self.num_heads, self.dim_head)).transpose(1, 2)

        q = blocks(self.to_q(x))
        k, v = (blocks(t) for t in self.to_kv(x).chunk(2, dim=-1))
        bias = self._positional_scores(q)
        key_valid = F.pad(frame_valid, (0, pad)).unflatten(1, (num_blocks, block)).flatten(0, 1)
        masked = ~key_valid[:, None, None, :]
        if written_out:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale + bias
            scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
            out = torch.matmul(scores.float().softmax(-1).to(v.dtype), v)
        else:
            bias = bias.masked_fill(masked, torch.finfo(bias.dtype).min)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.transpose(1, 2).flatten(2).unflatten(0, (batch, num_blocks)).flatten(1, 2)
        return self.to_out(out[:, :num_frames])

    return forward


manual_attention = attention_variant(project_first=False, written_out=True)
project_then_pad = attention_variant(project_first=True, written_out=False)


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
    """The encoder, or a copy whose attention / convolution modules run the way's forward (its
    own classes, so that its compiled code lives beside the original's)."""
    patches = _patches(way)
    if not patches:
        return encoder
    encoder = copy.deepcopy(encoder)
    for base, forward in patches.items():
        patched = type(f"{way}-{base.__name__}", (base,), {"forward": forward})
        for module in encoder.modules():
            if type(module) is base:
                module.__class__ = patched
    return encoder


def interleave(ways, encoder, features, lengths, gemm_seconds: float, rounds: int):
    """A/B on a noisy machine: compile every way first, then time them in turns, round after
    round."""
    compiled = {}
    for way in ways:
        compiled[way] = compile_model(patched_copy(encoder, way), options=dict(WAYS[way]))
        first, _ = timed(lambda way=way: compiled[way](features, lengths), CPU)
        print(f"{way}: first call {first:.1f} s", flush=True)
    times = {way: [] for way in ways}
    for _ in range(rounds):
        for way in ways:
            times[way].append(timed(lambda way=way: compiled[way](features, lengths), CPU)[0])
    for way in ways:
        stats = summary(times[way])
        spread = f"{stats['min'] * 1e3:.0f}–{stats['max'] * 1e3:.0f}"
        ratio = stats["median"] / gemm_seconds
        print(f"{way}: {stats['median'] * 1e3:.0f} ms [{spread}] = {ratio:.2f}x GEMM-only")


def run_way(way: str, encoder, features, lengths, gemm_seconds: float, args):
    torch._dynamo.reset()
    with inductor_config.patch(WAYS[way]):
        compiled = compile_model(patched_copy(encoder, way))
        stats = time_calls(lambda: compiled(features, lengths), CPU, repeats=args.repeats)
        if args.check:
            expected = encoder.float()(features.float(), lengths)
            encoder.to(features.dtype)
            error = relative_error(compiled(features, lengths), expected)
            print(f"  relative error against fp32 eager: {error:.2e}")
        print(
            f"compiled ({way}): {stats['median'] * 1e3:.0f} ms = "
            f"{stats['median'] / gemm_seconds:.2f}x GEMM-only; "
            f"first call {stats['first_call']:.1f} s",
            flush=True,
        )
        if args.profile:
            print(profile_call(lambda: compiled(features, lengths), CPU, rows=25)["table"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="3.3-2b")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--ways", nargs="+", default=["default"], choices=list(WAYS))
    parser.add_argument("--check", action="store_true", help="compare each way with eager")
    parser.add_argument("--interleave", action="store_true", help="time the ways in turns")
    parser.add_argument("--reference", action="store_true", help="time the reference eager")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--eager", action="store_true", help="time the eager encoder too")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:  # name inductor's fused kernels in the profile
        inductor_config.cpp.enable_kernel_profile = True
    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    model = variant_model(args.variant, encoder_layers=args.layers, llm_layers=1, dtype=dtype)
    encoder = model.encoder
    _, features, lengths = audio_prompts(model, args.batch, args.seconds)
    flops = roofline.encoder_flops(encoder.config, features.shape[1], args.batch)["matmul"]
    rate = roofline.gemm_rate(dtype, CPU)
    print(
        f"{args.variant} encoder, {args.layers} layers, {args.seconds:g} s x{args.batch}, {dtype}"
    )
    print(f"GEMM rate {rate / 1e9:.0f} GFLOP/s; matmul FLOPs {flops / 1e9:.1f} G; ")
    print(f"GEMM-only time {flops / rate * 1e3:.0f} ms")
    if args.eager:
        eager = time_calls(lambda: encoder(features, lengths), CPU, repeats=args.repeats)
        print(f"fms eager: {eager['median'] * 1e3:.0f} ms")
    if args.reference:
        reference = reference_encoder(encoder, dtype)
        ref = time_calls(lambda: reference(features), CPU, repeats=args.repeats)
        print(f"reference eager: {ref['median'] * 1e3:.0f} ms")
    if args.interleave:
        interleave(args.ways, encoder, features, lengths, flops / rate, args.repeats)
        return
    for way in args.ways:
        run_way(way, encoder, features, lengths, flops / rate, args)


if __name__ == "__main__":
    main()
