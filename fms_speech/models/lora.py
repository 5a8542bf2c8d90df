"""The audio LoRA on the LLM's query and value projections.

Granite Speech's adapter must act on every forward of a prompt that carries audio (prefill and
each decode step after it) and on no text-only prompt. A module flag flipped between calls (the
reference's `enable_adapters()`) would change guards and recompile; here the switch is data: a
per-row gate tensor (1.0 = adapter on, 0.0 = off), so one compiled graph serves both, even
within one batch.

FMS's attention calls `in_proj(q, k, v)` with no room for extra arguments, so the gate reaches
the projections through a small holder shared by all layers, set by the model's forward right
before it runs the LLM (inside the compiled region, so torch.compile traces it as data).

FMS transformations that rebuild the attention's projections keep the LoRA or refuse:
- `fms.utils.fusion.apply_unfuse_weights` calls `unfuse_weights`, which here returns a
  `LoRAUnfusedQKV` holding the same LoRA tensors and the same gate;
- tensor parallelism: FMS's `TensorParallelStrategy` builds each `TPMultiHeadAttention` anew, so
  the LoRA is added after that swap (`add_lora` on a tensor-parallel LLM): each rank's LoRA
  acts on its own heads and `LoRATPMultiHeadAttention.load_weights` loads its shard of the
  adapter; an attention that already carries the LoRA refuses to be converted (`to_tp`);
- quantized or name-dependent linear types (`linear_config`) are refused by `add_lora`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from fms.modules.attention import FusedQKV, MultiHeadAttention, TPMultiHeadAttention, UnfusedQKV
from fms.modules.tp import ShardType

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

    FMS's tensor parallelism (`apply_tp` -> `to_tp`) would build a new `TPMultiHeadAttention`
    with a plain QKV projection and drop the LoRA: it refuses. Tensor parallelism adds the LoRA
    after the swap instead (`add_lora` on the tensor-parallel LLM, as GraniteSpeech does).
    """

    def to_tp(self, group):
        raise NotImplementedError(
            "an attention that already carries the audio LoRA cannot be made tensor-parallel "
            "(FMS would rebuild its QKV projection without it): build the LLM with the "
            "TensorParallelStrategy first, then add the LoRA"
        )


class LoRATPMultiHeadAttention(TPMultiHeadAttention):
    """FMS's tensor-parallel attention whose local QKV projection carries its shard of the LoRA.

    A (rank x emb_dim) is whole on every rank (the input is); the B rows follow the fused QKV
    rows they add to: q's by query heads, v's by key/value heads (replicated where there are
    fewer KV heads than ranks, as FMS does for the KV weights). Each head's rows stay together,
    so the RoPE permutation the adapter applies inside a head is kept.
    """

    def load_weights(self, tensor_values: dict[str, torch.Tensor]) -> set | None:
        # FMS loads a checkpoint in groups of keys, and the PEFT adapter's keys may come in a
        # group of their own: load what is there (fms_speech.models.tensor_parallel.LoadRecord
        # checks afterwards that every tensor was loaded by some call)
        in_proj = self.in_proj
        for key in [k for k in tensor_values if k.split(".")[-1] in _LORA_NAMES]:
            name = key.split(".")[-1]
            value = tensor_values.pop(key)
            if name.endswith("_a"):
                self.sharded_copy(getattr(in_proj, name), value, 0, [1], ShardType.CLONE)
            else:
                heads = self.pre_tp_nheads if name == "lora_q_b" else self.pre_tp_kvheads
                self.sharded_copy(getattr(in_proj, name), value, 0, [heads])
        return super().load_weights(tensor_values) if tensor_values else set()


def add_lora(model: nn.Module, rank: int) -> AdapterGate:
    """Replace the QKV projection of every attention in `model` with a LoRA one.

    On a tensor-parallel model (FMS's TensorParallelStrategy already applied), each attention's
    LoRA has its rank's rows of B and loads them from the full checkpoint tensors.
    """
    gate = AdapterGate()
    for module in model.modules():
        if not isinstance(module, MultiHeadAttention):
            continue
        if isinstance(module, (LoRAMultiHeadAttention, LoRATPMultiHeadAttention)):
            raise ValueError("this attention already carries an audio LoRA")
        if not isinstance(module.in_proj, FusedQKV):
            raise ValueError("the audio LoRA needs the LLM built with fused_weights=True")
        if not isinstance(module.in_proj.qkv_fused, nn.Linear):
            raise NotImplementedError(
                "the audio LoRA needs plain torch linear QKV projections, not "
                f"{type(module.in_proj.qkv_fused).__name__} (linear_config "
                f"{module.linear_config!r}): quantized linear types are not supported"
            )
        # the local projection: on a tensor-parallel attention, this rank's heads only
        module.in_proj = LoRAFusedQKV(module.in_proj, rank, gate)
        # a class swap, not a copy: the module keeps its weights and FMS's own code paths; only
        # `to_tp` (refused) or `load_weights` (the LoRA's shard) change
        tensor_parallel = isinstance(module, TPMultiHeadAttention)
        module.__class__ = LoRATPMultiHeadAttention if tensor_parallel else LoRAMultiHeadAttention
    return gate
