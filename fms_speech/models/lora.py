"""The audio LoRA on the LLM's query and value projections.

Granite Speech's adapter must act on every forward of a prompt that carries audio (prefill and
each decode step after it) and on no text-only prompt. A module flag flipped between calls (the
reference's `enable_adapters()`) would change guards and recompile; here the switch is data: a
per-row gate tensor (1.0 = adapter on, 0.0 = off), so one compiled graph serves both, even
within one batch.

FMS's attention calls `in_proj(q, k, v)` with no room for extra arguments, so the gate reaches
the projections through a small holder shared by all layers, set by the model's forward right
before it runs the LLM (inside the compiled region, so torch.compile traces it as data).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from fms.modules.attention import FusedQKV, MultiHeadAttention


class AdapterGate:
    """Holds the current per-row gate (B,) for every LoRA projection of one model."""

    def __init__(self):
        self.value: torch.Tensor | None = None


class LoRAFusedQKV(FusedQKV):
    """FMS's fused QKV projection plus a gated low-rank update of q and v.

    The PEFT scaling (alpha / r) is folded into the B matrices when an adapter is loaded.
    """

    def __init__(self, base: FusedQKV, rank: int, gate: AdapterGate):
        with torch.device("meta"):  # its own projection is replaced by the base's right after
            super().__init__(
                base.emb_dim,
                base.nheads,
                base.kvheads,
                base.emb_kq_per_head,
                base.emb_v_per_head,
                base.use_bias,
                linear_config=base.linear_config,
            )
        self.qkv_fused = base.qkv_fused
        self.rank = rank
        self.gate = gate
        device = base.qkv_fused.weight.device
        dtype = base.qkv_fused.weight.dtype
        self.lora_q_a = nn.Parameter(torch.empty(rank, self.emb_dim, device=device, dtype=dtype))
        self.lora_q_b = nn.Parameter(torch.empty(self.splits[0], rank, device=device, dtype=dtype))
        self.lora_v_a = nn.Parameter(torch.empty(rank, self.emb_dim, device=device, dtype=dtype))
        self.lora_v_b = nn.Parameter(torch.empty(self.splits[2], rank, device=device, dtype=dtype))

    def reset_parameters(self):
        super().reset_parameters()
        # PEFT's init: A random, B zero, so a fresh adapter is the identity
        nn.init.kaiming_uniform_(self.lora_q_a, a=5**0.5)
        nn.init.kaiming_uniform_(self.lora_v_a, a=5**0.5)
        nn.init.zeros_(self.lora_q_b)
        nn.init.zeros_(self.lora_v_b)

    def forward(self, q, k=None, v=None):
        queries, keys, values = super().forward(q, k, v)
        gate = self.gate.value
        if gate is None:
            return queries, keys, values
        gate = gate.to(q.dtype).view(-1, 1, 1)
        queries = queries + gate * F.linear(F.linear(q, self.lora_q_a), self.lora_q_b)
        values = values + gate * F.linear(F.linear(q, self.lora_v_a), self.lora_v_b)
        return queries, keys, values


def add_lora(model: nn.Module, rank: int) -> AdapterGate:
    """Replace the QKV projection of every attention in `model` with a LoRA one."""
    gate = AdapterGate()
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            if not isinstance(module.in_proj, FusedQKV):
                raise ValueError("the audio LoRA needs the LLM built with fused_weights=True")
            module.in_proj = LoRAFusedQKV(module.in_proj, rank, gate)
    return gate
