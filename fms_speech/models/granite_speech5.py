"""Granite Speech 5.0 (`granite_speech5`) as an FMS model: a CTC Conformer, no projector, no LLM.

log-mel + deltas (B, T, 320) -> Conformer with subsampling blocks (time / 4) -> CTC logits
(B, T // 4 + 2, vocab), of which a clip of L rows owns the first L // 4 (`output_lengths`).
The blocks are the Conformer's (`fms_speech.models.conformer`); what is this model's own is the
subsampling, the float32 BatchNorm, and the CTC head, which is the encoder's mid-layer CTC
projection (`encoder.out`) when tied, as published.

Compile: the whole forward is one graph for every length and batch (time is padded once to a
multiple of 4 frames, at least 8, so every later length is a product and never 1). Greedy
decoding and word timestamps work on the logits afterwards (`fms_speech.ctc`).
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from fms import models
from fms.distributed.strategy import DistributedStrategy, NoOpStrategy, NotDistributed
from fms.utils import serialization
from fms.utils.config import ModelConfig

from fms_speech._compat import register_hf_architecture
from fms_speech.audio import DELTA_FEATURE_DIM
from fms_speech.models.checks import check_loaded, check_shapes
from fms_speech.models.conformer import ConformerConfig, ConformerEncoder, full_lengths

_architecture_name = "granite_speech5"
HF_MODEL_TYPE = "granite_speech5_ctc"  # config.json's model_type


def _encoder_5_0_470m() -> ConformerConfig:
    return ConformerConfig(
        input_dim=DELTA_FEATURE_DIM,
        num_layers=16,
        hidden_dim=1024,
        feedforward_mult=4,
        num_heads=8,
        dim_head=128,
        output_dim=16384,  # the CTC vocabulary: 16384 BPE units, blank = 0
        context_size=128,
        max_pos_emb=512,
        conv_kernel_size=7,
        conv_expansion_factor=2,
        subsample_layers=(0, 1),
        float32_batch_norm=True,
        float32_attention=False,
    )


@dataclass
class GraniteSpeech5Config(ModelConfig):
    # output_dim is the CTC vocabulary (the mid-layer CTC and the head share it)
    encoder_config: ConformerConfig = field(default_factory=_encoder_5_0_470m)
    blank_token_id: int = 0  # transformers' pad_token_id: the CTC blank
    tie_ctc_head: bool = True  # ctc_head is encoder.out (transformers' tie_word_embeddings)


class GraniteSpeech5(nn.Module):
    """`model(input_features, feature_lengths)` -> CTC logits (B, T_out, vocab).

    `output_lengths(feature_lengths)` gives the rows of each clip; rows past a clip's end are
    padding (greedy decoding makes them blank, as the reference's `generate` does).
    """

    def __init__(
        self,
        config: GraniteSpeech5Config | None = None,
        distributed_strategy: DistributedStrategy = NoOpStrategy,
        **kwargs,
    ):
        super().__init__()
        if not isinstance(distributed_strategy, NotDistributed):  # get_model passes its strategy
            raise NotImplementedError(
                f"GraniteSpeech5 does not support {type(distributed_strategy).__name__} yet: "
                "load it on one device, without a distributed_strategy"
            )
        self.config = (config or GraniteSpeech5Config()).updated(**kwargs)
        encoder_config = self.config.encoder_config
        if not encoder_config.subsample_layers:
            raise ValueError("granite_speech5 needs at least one subsampling block")
        if not 0 <= self.config.blank_token_id < encoder_config.output_dim:
            raise ValueError(
                f"blank_token_id {self.config.blank_token_id} is outside the vocabulary "
                f"of {encoder_config.output_dim}"
            )
        self.encoder = ConformerEncoder(encoder_config)
        if self.config.tie_ctc_head:
            self.ctc_head = None
        else:
            self.ctc_head = nn.Linear(encoder_config.hidden_dim, encoder_config.output_dim)

    @classmethod
    def from_config(cls, config: GraniteSpeech5Config) -> "GraniteSpeech5":
        return cls(config)

    def get_config(self) -> GraniteSpeech5Config:
        return self.config

    def reset_parameters(self):
        self.encoder.reset_parameters()
        if self.ctc_head is not None:
            nn.init.trunc_normal_(self.ctc_head.weight, std=0.02)
            nn.init.zeros_(self.ctc_head.bias)

    def post_init(self):
        # called by get_model after loading: parameters still on meta were in no checkpoint
        check_loaded(self)

    @property
    def vocab_size(self) -> int:
        return self.config.encoder_config.output_dim

    def output_lengths(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        """CTC frames (80 ms each) that belong to each clip."""
        return self.encoder.output_lengths(feature_lengths)

    def forward(
        self, input_features: torch.Tensor, feature_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        if feature_lengths is None:
            feature_lengths = full_lengths(input_features)
        dtype = self.encoder.input_linear.weight.dtype
        states = self.encoder(input_features.to(dtype), feature_lengths)
        head = self.encoder.out if self.ctc_head is None else self.ctc_head
        return head(states)


# ---- variants (the published config.json; a checkpoint's own config wins)

_5_0_470m_config = GraniteSpeech5Config()


def _granite_speech5_factory_factory(config):
    def factory(**kwargs):
        return GraniteSpeech5(config, **kwargs)

    return factory


models.register_model(
    _architecture_name, "5.0-470m", _granite_speech5_factory_factory(_5_0_470m_config)
)


# ---- transformers config <-> ours (fms.models.get_model("hf_pretrained", model_path=DIR))


def build_granite_speech5_params(config) -> dict:
    """Map transformers' GraniteSpeech5CTCConfig to GraniteSpeech5 keyword overrides."""
    encoder = config.encoder_config
    if encoder.hidden_act != "silu":
        raise ValueError(f"unsupported encoder activation {encoder.hidden_act!r} (expected silu)")
    if encoder.num_key_value_heads != encoder.num_attention_heads:
        raise ValueError(
            "the encoder's attention projects keys and values with every head: "
            f"num_key_value_heads ({encoder.num_key_value_heads}) must equal "
            f"num_attention_heads ({encoder.num_attention_heads})"
        )
    if encoder.vocab_size != config.vocab_size:
        raise ValueError(
            f"the encoder's vocabulary ({encoder.vocab_size}) differs from the CTC head's "
            f"({config.vocab_size})"
        )
    feedforward_mult = encoder.intermediate_size / encoder.hidden_size
    if int(feedforward_mult * encoder.hidden_size) != encoder.intermediate_size:
        raise ValueError(
            f"intermediate_size {encoder.intermediate_size} is not representable as a multiple "
            f"of hidden_size {encoder.hidden_size}"
        )
    subsample = list(encoder.subsample_layers)
    if len(set(subsample)) != len(subsample):
        raise ValueError(f"subsample_layers {subsample} repeats a block")
    return {
        "encoder_config": ConformerConfig(
            input_dim=4 * encoder.num_mel_bins,  # mel and delta, two frames stacked
            num_layers=encoder.num_hidden_layers,
            hidden_dim=encoder.hidden_size,
            feedforward_mult=int(feedforward_mult)
            if feedforward_mult.is_integer()
            else feedforward_mult,
            num_heads=encoder.num_attention_heads,
            dim_head=encoder.head_dim,
            output_dim=encoder.vocab_size,
            context_size=encoder.context_size,
            max_pos_emb=encoder.max_position_embeddings,
            conv_kernel_size=encoder.conv_kernel_size,
            conv_expansion_factor=encoder.conv_expansion_factor,
            subsample_layers=tuple(subsample),
            feedforward_bias=encoder.attention_bias,
            float32_batch_norm=True,
            float32_attention=False,
        ),
        "blank_token_id": config.pad_token_id if config.pad_token_id is not None else 0,
        "tie_ctc_head": bool(config.tie_word_embeddings),
    }


def hf_config(config: GraniteSpeech5Config):
    """transformers' GraniteSpeech5CTCConfig for ours: the inverse of build_granite_speech5_params."""
    from transformers import GraniteSpeech5CTCConfig

    encoder = config.encoder_config
    if encoder.input_dim % 4:
        raise ValueError(f"input_dim {encoder.input_dim} is not 4 x mel bins")
    return GraniteSpeech5CTCConfig(
        vocab_size=encoder.output_dim,
        pad_token_id=config.blank_token_id,
        tie_word_embeddings=config.tie_ctc_head,
        encoder_config={
            "vocab_size": encoder.output_dim,
            "hidden_size": encoder.hidden_dim,
            "intermediate_size": int(encoder.feedforward_mult * encoder.hidden_dim),
            "num_hidden_layers": encoder.num_layers,
            "num_attention_heads": encoder.num_heads,
            "num_key_value_heads": encoder.num_heads,
            "num_mel_bins": encoder.input_dim // 4,
            "head_dim": encoder.dim_head,
            "max_position_embeddings": encoder.max_pos_emb,
            "context_size": encoder.context_size,
            "conv_kernel_size": encoder.conv_kernel_size,
            "conv_expansion_factor": encoder.conv_expansion_factor,
            "subsample_layers": list(encoder.subsample_layers),
            "attention_bias": encoder.feedforward_bias,
        },
    )


register_hf_architecture("GraniteSpeech5ForCTC", _architecture_name, build_granite_speech5_params)


# ---- serialization: transformers names -> ours

_RULES = [
    # order matters: the conv module's BatchNorm (`conv.norm`) is renamed before the block's
    # LayerNorm in front of the conv module (`norm_conv`) takes the name `conv.norm`
    (r"\.conv\.norm\.", ".conv.batch_norm."),
    (r"\.conv\.depthwise_conv\.", ".conv.depth_conv."),
    (r"\.conv\.pointwise_lin1\.", ".conv.up_conv."),
    (r"\.conv\.pointwise_lin2\.", ".conv.down_conv."),
    (r"\.norm_conv\.", ".conv.norm."),
    (r"\.feed_forward([12])\.linear1\.", r".ff\1.mlp.w1."),
    (r"\.feed_forward([12])\.linear2\.", r".ff\1.mlp.w2."),
    (r"\.norm_feed_forward([12])\.", r".ff\1.pre_norm."),
    (r"\.norm_self_att\.", ".attn.pre_norm."),
    (r"\.self_attn\.q_proj\.", ".attn.to_q."),
    (r"\.self_attn\.o_proj\.", ".attn.to_out."),
    (r"\.self_attn\.rel_pos_emb\.", ".attn.rel_pos_emb."),
    (r"\.norm_out\.", ".post_norm."),
]
_KV = re.compile(r"^(encoder\.layers\.\d+)\.self_attn\.([kv])_proj\.weight$")
# the pointwise convolutions are Linear layers there, 1x1 Conv1d here
_POINTWISE = re.compile(r"\.conv\.(up|down)_conv\.weight$")


def _hf_to_fms(
    input_sd: Mapping[str, Any], model_config: GraniteSpeech5Config | None = None, **kwargs
) -> Mapping[str, Any]:
    config = model_config or GraniteSpeech5Config()
    new_sd, kv, unexpected = {}, {}, []
    for name, tensor in input_sd.items():
        if name.startswith("ctc_head."):
            if not config.tie_ctc_head:
                new_sd[name] = tensor
            # tied: the head is encoder.out, as the reference ties it
            continue
        if not name.startswith("encoder."):
            unexpected.append(name)
            continue
        match = _KV.match(name)
        if match:
            kv.setdefault(match[1], {})[match[2]] = tensor
            continue
        for pattern, replacement in _RULES:
            name = re.sub(pattern, replacement, name)
        if _POINTWISE.search(name):
            tensor = tensor.unsqueeze(-1)
        new_sd[name] = tensor
    if unexpected:
        raise ValueError(f"unexpected keys in the checkpoint: {', '.join(sorted(unexpected))}")
    for layer, parts in kv.items():
        if set(parts) != {"k", "v"}:
            lone = next(iter(parts))
            raise ValueError(f"the checkpoint has {layer}.self_attn.{lone}_proj but not its pair")
        # the Conformer's to_kv: keys, then values
        new_sd[f"{layer}.attn.to_kv.weight"] = torch.cat([parts["k"], parts["v"]], dim=0)
    check_shapes(new_sd, GraniteSpeech5, config)
    return new_sd


serialization.register_adapter_step(_architecture_name, "hf_to_fms", _hf_to_fms)
serialization.register_adapter(_architecture_name, "hf", ["hf_to_fms"])
