"""What the machine can do and what the model asks of it: the bounds the benchmark compares with.

- `gemm_rate`: measured FLOP/s of a large square matrix product in a dtype;
- `memory_bandwidth`: measured bytes/s of reading a tensor larger than the caches (a sum);
- `encoder_flops`: the FLOPs of the Conformer encoder on a clip, counted by
  `torch.utils.flop_counter.FlopCounterMode` on meta tensors (no arithmetic is run);
- `decode_weight_count`: the weights one decode step reads (every LLM weight once; the
  embedding table only through a tied LM head); times the dtype's size, the bytes.
"""

import torch
from fms.models import get_model
from torch.utils.flop_counter import FlopCounterMode

from fms_speech.bench.measure import time_calls
from fms_speech.models.conformer import ConformerEncoder

# the aten ops that are matrix products (attention included); convolutions are counted apart
_MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "scaled_dot_product", "matmul")


def best_seconds(fn, device: torch.device, repeats: int) -> float:
    """The fastest run after a warm-up (first-touch page faults, oneDNN primitive creation): a
    rate the machine reaches (other work on it only slows runs down)."""
    return time_calls(fn, device, warmup=1, repeats=repeats)["min"]


def gemm_rate(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 10):
    """FLOP/s of a (size x size) @ (size x size) product."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    seconds = best_seconds(lambda: torch.mm(a, b), device, repeats)
    return 2 * size**3 / seconds


def memory_bandwidth(device: torch.device, gib: float = 2.0, repeats: int = 10) -> float:
    """Bytes/s read by summing a float32 tensor of `gib` GiB (beyond any cache)."""
    data = torch.ones(int(gib * 2**30) // 4, device=device)
    seconds = best_seconds(lambda: data.sum(), device, repeats)
    return data.numel() * 4 / seconds


def encoder_flops(encoder_config, frames: int, batch: int = 1) -> dict[str, int]:
    """{'matmul': ..., 'conv': ..., 'total': ...} FLOPs of fms-speech's encoder on `frames`."""
    with torch.device("meta"):
        encoder = ConformerEncoder(encoder_config)
        features = torch.empty(batch, frames, encoder_config.input_dim)
        lengths = torch.full((batch,), frames, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encoder(features, lengths)
    by_op = {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}
    matmul = sum(n for op, n in by_op.items() if any(m in op for m in _MATMUL_OPS))
    conv = sum(n for op, n in by_op.items() if "convolution" in op)
    return {"matmul": matmul, "conv": conv, "total": sum(by_op.values())}


def decode_weight_count(language_model: torch.nn.Module, tied: bool) -> int:
    """Weights one decode step reads: each once; an untied input table only by its rows."""
    embedding = language_model.base_model.embedding.weight
    return sum(
        param.numel()
        for param in language_model.parameters()
        # untied: only B rows of the input table are read (the head is a weight of its own)
        if tied or param is not embedding
    )


def variant_decode_weight_count(variant: str) -> int:
    """decode_weight_count of a published variant at full depth, from a meta model."""
    with torch.device("meta"):
        model = get_model("granite_speech", variant, device_type="meta")
    return decode_weight_count(model.language_model, model.config.text_config.tie_heads)


def machine_rates(device: torch.device, dtypes, quick: bool = False) -> dict:
    size = 1024 if quick else 2048
    rates = {
        "gemm_flops": {str(d).removeprefix("torch."): gemm_rate(d, device, size) for d in dtypes},
        "gemm_size": size,
        "memory_bandwidth": memory_bandwidth(device, 0.5 if quick else 2.0),
    }
    return rates
