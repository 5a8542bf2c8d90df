"""The audio LoRA on the LLM's query and value projections.

Granite Speech's adapter must act on every forward of a prompt that carries audio (prefill and
each decode step after it) and on no text-only prompt. A module flag flipped between calls (the
reference's `enable_adapters()`) would change guards and recompile; here the switch is data: a
per-row gate tensor (1.0 = adapter on, 0.0 = off), so one compiled graph serves both, even
within one batch.

FMS's attention calls `in_proj(q, k, v)` with no room for extra arguments, so the gate reaches
the projections through a small holder shared by all layers, set by the model's forward right
before it runs the LLM (inside the compiled region, so torch.compile traces it as data).

FMS transformations that rebuild the attention's projections either keep the LoRA or refuse:
- `fms.utils.fusion.apply_unfuse_weights` calls `unfuse_weights`, which here returns a
  `LoRAUnfusedQKV` holding the same LoRA tensors and the same gate;
- tensor parallelism (`fms.utils.tp_wrapping.apply_tp`, FMS's `TensorParallelStrategy`) builds
  a new attention without them, so an attention carrying the LoRA refuses it, and `add_lora`
  refuses an attention that is already tensor-parallel;
- quantized or name-dependent linear types (`linear_config`) are refused by `add_lora`.
(`GraniteSpeech` itself refuses FMS's distributed strategies; see docs/upstream.md, section 3.)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from fms.modules.attention import FusedQKV, MultiHeadAttention, UnfusedQKV
from fms.modules.tp import TPModule

_LORA_NAMES = ("lora_q_a", "lora_q_b", "lora_v_a", "lora_v_b")


class AdapterGate:
    """Holds the current per-row gate (B,) for every LoRA projection of one model."""

    def __init__(self):
        self.value: torch.Tensor | None = None


class _GatedQVLoRA:
    """The gated low-rank update of q and v, shared by the fused and the unfused projection.

    Mixed into an FMS `QKV`; the PEFT scaling (alpha / r) is folded into the B matrices when an
    adapter is loaded.
    """

    rank: int
    gate: AdapterGate
    lora_q_a: nn.Parameter
    lora_q_b: nn.Parameter
    lora_v_a: nn.Parameter
    lora_v_b: nn.Parameter

    def _reset_lora(self):
        # PEFT's init: A random, B zero, so a fresh adapter is the identity
        nn.init.kaiming_uniform_(self.lora_q_a, a=5**0.5)
        nn.init.kaiming_uniform_(self.lora_v_a, a=5**0.5)
        nn.init.zeros_(self.lora_q_b)
        nn.init.zeros_(self.lora_v_b)

    def _add_lora(self, x, queries, keys, values):
        gate = self.gate.value
        if gate is None:
            return queries, keys, values
        gate = gate.to(x.dtype).view(-1, 1, 1)
        queries = queries + gate * F.linear(F.linear(x, self.lora_q_a), self.lora_q_b)
        values = values + gate * F.linear(F.linear(x, self.lora_v_a), self.lora_v_b)
        return queries, keys, values


class LoRAFusedQKV(_GatedQVLoRA, FusedQKV):
    """FMS's fused QKV projection plus a gated low-rank update of q and v."""

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
        self._reset_lora()

    def unfuse_weights(self) -> "LoRAUnfusedQKV":
        """FMS's unfuse (used by `apply_unfuse_weights`), carrying the LoRA and its gate along."""
        return LoRAUnfusedQKV(super().unfuse_weights(), self)

    def forward(self, q, k=None, v=None):
        return self._add_lora(q, *super().forward(q, k, v))


class LoRAUnfusedQKV(_GatedQVLoRA, UnfusedQKV):
    """FMS's unfused QKV projection with the same LoRA tensors and gate as the fused one."""

    def __init__(self, base: UnfusedQKV, lora: LoRAFusedQKV):
        with torch.device("meta"):  # its own projections are replaced by the base's right after
            super().__init__(
                base.emb_dim,
                base.nheads,
                base.kvheads,
                base.emb_kq_per_head,
                base.emb_v_per_head,
                base.use_bias,
                linear_config=base.linear_config,
            )
        self.query, self.key, self.value = base.query, base.key, base.value
        self.rank = lora.rank
        self.gate = lora.gate
        for name in _LORA_NAMES:  # the same Parameters: state-dict names and values unchanged
            setattr(self, name, getattr(lora, name))

    def reset_parameters(self):
        super().reset_parameters()
        self._reset_lora()

    def forward(self, q, k=None, v=None):
        if not ((k is None and v is None) or (k is q and v is q)):
            raise ValueError("the audio LoRA projects self-attention only (k and v must be q)")
        return self._add_lora(q, *super().forward(q, k, v))


class LoRAMultiHeadAttention(MultiHeadAttention):
    """An FMS attention whose `in_proj` carries the audio LoRA.

    FMS's tensor parallelism (`apply_tp` -> `to_tp`) builds a new `TPMultiHeadAttention` with a
    plain QKV projection, and its `load_weights` skips the LoRA keys with a warning: the LoRA
    would vanish from the output. Until it is sharded too, this refuses.
    """

    def to_tp(self, group):
        raise NotImplementedError(
            "tensor parallelism is not supported with the audio LoRA yet: FMS's "
            "TPMultiHeadAttention would rebuild the QKV projection without it"
        )


def add_lora(model: nn.Module, rank: int) -> AdapterGate:
    """Replace the QKV projection of every attention in `model` with a LoRA one."""
    gate = AdapterGate()
    for module in model.modules():
        if not isinstance(module, MultiHeadAttention):
            continue
        if isinstance(module, TPModule):
            raise NotImplementedError(
                "the audio LoRA cannot be added to a tensor-parallel attention yet (its weights "
                "would not be sharded): build the LLM without a distributed_strategy"
            )
        if not isinstance(module.in_proj, FusedQKV):
            raise ValueError("the audio LoRA needs the LLM built with fused_weights=True")
        if not isinstance(module.in_proj.qkv_fused, nn.Linear):
            raise NotImplementedError(
                "the audio LoRA needs plain torch linear QKV projections, not "
                f"{type(module.in_proj.qkv_fused).__name__} (linear_config "
                f"{module.linear_config!r}): quantized linear types are not supported"
            )
        module.in_proj = LoRAFusedQKV(module.in_proj, rank, gate)
        # a class swap, not a copy: the module keeps its weights and FMS's own code paths, and
        # only `to_tp` changes (see LoRAMultiHeadAttention)
        module.__class__ = LoRAMultiHeadAttention
    return gate
