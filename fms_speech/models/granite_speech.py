"""Granite Speech as an FMS model: Conformer encoder -> Q-Former projector -> Granite LLM.

The LLM is FMS's own `Granite`; the audio LoRA is added to its fused QKV projections. The audio
vectors are written into the prompt's embeddings at the `<|audio|>` placeholders with a gather
and a `where`, so the merge has no data-dependent shapes and the whole forward is one graph.
"""

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from fms import models
from fms.distributed.strategy import (
    DistributedStrategy,
    NoOpStrategy,
    NotDistributed,
    TensorParallelStrategy,
)
from fms.models.granite import Granite, GraniteConfig
from fms.models.hf.config_utils.param_builders import build_granite_params
from fms.modules.attention import get_attention_type
from fms.utils import serialization
from fms.utils.config import ModelConfig

from fms_speech import checkpoint
from fms_speech._compat import (
    granite_hf_to_fms_rope,
    mark_unbacked,
    maybe_mark_dynamic,
    register_hf_architecture,
    run_frame_eagerly,
)
from fms_speech.models.checks import check_loaded, check_shapes
from fms_speech.models.conformer import (
    ConformerConfig,
    ConformerEncoder,
    frame_mask,
    full_lengths,
)
from fms_speech.models.layout import trailing_positions
from fms_speech.models.lora import add_lora
from fms_speech.models.qformer import QFormerConfig, QFormerProjector, num_audio_tokens
from fms_speech.models.tensor_parallel import LoadRecord, check_world_size

logger = logging.getLogger(__name__)

_architecture_name = "granite_speech"


@dataclass
class GraniteSpeechConfig(ModelConfig):
    encoder_config: ConformerConfig = field(default_factory=ConformerConfig)
    projector_config: QFormerConfig = field(default_factory=QFormerConfig)
    text_config: GraniteConfig = field(default_factory=GraniteConfig)
    audio_token_index: int = 49159
    lora_rank: int = 64  # 0: no audio adapter
    lora_alpha: float = 32.0  # PEFT scaling alpha / rank, folded into B when the adapter loads
    fused_weights: bool = True


# forward's inputs whose sizes vary from call to call, and their varying dimensions (0, 1, ...)
_POSITIONAL_INPUTS = ("input_ids", "input_features", "feature_lengths", "position_ids")
_DYNAMIC_DIMS = {
    "input_ids": (0, 1),  # batch, tokens
    "input_features": (0, 1),  # batch, frames
    "feature_lengths": (0,),
    "position_ids": (0, 1),
    "lora_gate": (0,),
    "mask": (0, 1, 2),  # FMS's attention mask: batch, queries, keys
}
_CACHE_DIMS = (0, 2)  # FMS's KV cache tensors: batch, positions


def mark_dynamic_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: batch and sequence dimensions are dynamic from the first call.

    Under a plain `torch.compile(model)` dynamo runs the module's hooks before it traces
    forward, so the first graph already has a symbolic length and batch (a first batch of 1 is
    still specialised there: at most 2 graphs over any shapes, instead of one static graph, then
    one with a dynamic length, then one with a dynamic batch). Under `compile_model` the batch
    is marked unbacked instead, and no first batch of 1 is specialised. Marks and checks only:
    never changes results.
    """
    if torch.compiler.is_compiling():
        return
    named = {**dict(zip(_POSITIONAL_INPUTS, args, strict=False)), **kwargs}
    tensors = []  # (tensor, its dynamic dims, the batch first)
    for name, dims in _DYNAMIC_DIMS.items():
        tensors.append((named.get(name), dims))
    for layer in named.get("past_key_value_states") or ():
        for tensor in layer:
            tensors.append((tensor, _CACHE_DIMS))
    # (loops, no comprehensions or helpers: each would be a frame that dynamo traces)
    batch_sizes = set()
    for tensor, dims in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        if module.unbacked_batch:
            # one symbol for every input's batch, never specialised to 1 (fms_speech.compile)
            mark_unbacked(tensor, 0, shape_id="batch", min=1)
            batch_sizes.add(tensor.shape[0])
            dims = dims[1:]
        maybe_mark_dynamic(tensor, dims[: tensor.dim()])
    # the compiled graph takes one batch for all and does not check it (fms_speech.compile)
    if len(batch_sizes) > 1 or 0 in batch_sizes:
        raise ValueError(f"the inputs' batch sizes are {sorted(batch_sizes)}: one, at least 1")


# dynamo would otherwise compile the hook's own frame, where it sees `is_compiling()` true
run_frame_eagerly(mark_dynamic_inputs.__code__)


class GraniteSpeech(nn.Module):
    """Granite Speech; with FMS's `TensorParallelStrategy` (`get_model(...,
    distributed_strategy="tp")` under torchrun) the LLM is split over the ranks by FMS and the
    encoder and projector are whole on every rank, as FMS's LLaVA-Next keeps its vision tower.

    Why replicated: the encoder and projector are a small share of the weights (about 0.5 B of
    the 2-8 B) and run once per clip, while the LLM runs once per generated token; keeping them
    whole costs no collective and leaves every rank with the full audio embeddings to merge.
    """

    encoder_class = ConformerEncoder  # granite_speech_plus's encoder concatenates layers

    def __init__(
        self,
        config: GraniteSpeechConfig | None = None,
        distributed_strategy: DistributedStrategy = NoOpStrategy,
        **kwargs,
    ):
        super().__init__()
        tensor_parallel = isinstance(distributed_strategy, TensorParallelStrategy)
        if not (tensor_parallel or isinstance(distributed_strategy, NotDistributed)):
            raise NotImplementedError(
                f"{type(self).__name__} does not support {type(distributed_strategy).__name__}: "
                "load it on one device, or tensor-parallel (distributed_strategy='tp')"
            )
        self.config = (config or GraniteSpeechConfig()).updated(**kwargs)
        if not self.config.fused_weights:
            raise ValueError("GraniteSpeech needs fused_weights=True (the LoRA rides on them)")
        if tensor_parallel:  # before anything is built or read: one sentence, not an assert
            check_world_size(self.config.text_config, distributed_strategy.group.size())
        self.encoder = self.encoder_class(self.config.encoder_config)
        self.projector = QFormerProjector(self.config.projector_config)
        self.language_model = Granite(
            self.config.text_config, distributed_strategy=distributed_strategy
        )
        # after FMS's tensor-parallel swap, which would drop it (see fms_speech.models.lora)
        self._adapter_gate = (
            add_lora(self.language_model, self.config.lora_rank)
            if (self.config.lora_rank > 0)
            else None
        )
        # set by fms_speech.compile.compile_model: the batch becomes an unbacked size
        self.unbacked_batch = False
        self.register_forward_pre_hook(mark_dynamic_inputs, with_kwargs=True)
        self._tp_loads = LoadRecord().watch(self) if tensor_parallel else None

    @classmethod
    def from_config(cls, config: GraniteSpeechConfig) -> "GraniteSpeech":
        return cls(config)

    def get_config(self) -> GraniteSpeechConfig:
        return self.config

    def reset_parameters(self):
        self.encoder.reset_parameters()
        self.projector.reset_parameters()
        self.language_model.reset_parameters()  # FMS resets our LoRA QKV with the rest

    def post_init(self):
        # called by get_model after loading: parameters still on meta were in no checkpoint,
        # and a tensor-parallel module's tensors that its load_weights did not fill are
        # torch.empty (FMS moved them off meta before loading)
        self.language_model.post_init()
        check_loaded(self)
        if self._tp_loads is not None:
            record, self._tp_loads = self._tp_loads, None
            record.release()
            unloaded = record.unloaded()
            if unloaded:
                why = f" ({record.errors[0]})" if record.errors else ""
                raise ValueError(
                    f"{len(unloaded)} weights of the tensor-parallel model were not loaded from "
                    f"the checkpoint: {_names(unloaded)}{why}"
                )

    def get_audio_features(
        self, input_features: torch.Tensor, feature_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected audio vectors (B, N, text_hidden); row b's first n_b are its clip's."""
        if feature_lengths is None:
            feature_lengths = full_lengths(input_features)
        encoder_states = self.encoder(input_features, feature_lengths)
        frame_valid = frame_mask(feature_lengths, input_features.shape[1])
        return self.projector(encoder_states, frame_valid)

    def audio_token_counts(
        self, input_features: torch.Tensor, feature_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """How many `<|audio|>` placeholders each row's prompt must carry."""
        if feature_lengths is None:
            feature_lengths = full_lengths(input_features)
        c = self.config.projector_config
        return num_audio_tokens(feature_lengths, c.window_size, c.downsample_rate)

    def _merge_audio(
        self, input_ids: torch.Tensor, embeds: torch.Tensor, audio: torch.Tensor
    ) -> torch.Tensor:
        is_audio = input_ids == self.config.audio_token_index
        # the k-th placeholder of a row takes the row's k-th audio vector
        index = (is_audio.cumsum(dim=1) - 1).clamp(min=0, max=audio.shape[1] - 1)
        gathered = torch.gather(audio, 1, index.unsqueeze(-1).expand(-1, -1, audio.shape[-1]))
        return torch.where(is_audio.unsqueeze(-1), gathered.to(embeds.dtype), embeds)

    def _check_placeholders(self, input_ids, input_features, feature_lengths):
        expected = self.audio_token_counts(input_features, feature_lengths).tolist()
        found = (input_ids == self.config.audio_token_index).sum(dim=1).tolist()
        for row, (n_found, n_expected) in enumerate(zip(found, expected, strict=False)):
            if n_found != n_expected:
                raise ValueError(
                    f"row {row}: the prompt has {n_found} <|audio|> tokens but its clip has "
                    f"{n_expected} audio tokens"
                )

    def _logits(self, hidden: torch.Tensor, last_n_tokens: int) -> torch.Tensor:
        """FMS Granite's head on the last n positions (all for 0), divided by logits_scaling.

        What `Granite.forward` does after its base model, except that the last positions reach
        the head as a fresh tensor, not a strided view (fms_speech.models.layout).
        """
        if last_n_tokens and hidden.shape[1] >= last_n_tokens:
            hidden = trailing_positions(hidden, last_n_tokens)
        logits = self.language_model.head(hidden)
        return logits / self.config.text_config.logits_scaling

    def forward(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_value_states: list | None = None,
        use_cache: bool = False,
        lora_gate: torch.Tensor | None = None,
        last_n_tokens: int = 0,
        **attn_kwargs,
    ):
        """Logits (B, L, vocab) / logits_scaling; with use_cache, also the new KV cache.

        lora_gate (B,): 1.0 turns the audio LoRA on for a row, 0.0 off. Default: on for every
        row when `input_features` is given, off otherwise; decode steps after an audio prefill
        pass the prefill's gate again (see fms_speech.generation).
        """
        _tie_sizes(
            input_ids,
            position_ids,
            past_key_value_states,
            attn_kwargs.get("mask"),
            (input_features, feature_lengths, lora_gate),
        )
        is_audio = input_ids == self.config.audio_token_index
        text_ids = torch.where(is_audio, torch.zeros_like(input_ids), input_ids)
        embeds = self.language_model.base_model.embedding(text_ids)
        if input_features is not None:
            if not torch.compiler.is_compiling():
                self._check_placeholders(input_ids, input_features, feature_lengths)
            audio = self.get_audio_features(input_features.to(embeds.dtype), feature_lengths)
            embeds = self._merge_audio(input_ids, embeds, audio)
        if lora_gate is None:
            fill = 1.0 if input_features is not None else 0.0
            lora_gate = torch.full((input_ids.shape[0],), fill, device=input_ids.device)
        if self._adapter_gate is not None:
            self._adapter_gate.value = lora_gate
        get_attention_type(**attn_kwargs)["validate_attn_kwargs"](
            input_ids=embeds,
            position_ids=position_ids,
            past_key_value_states=past_key_value_states,
            **attn_kwargs,
        )
        try:
            # always with a cache: FMS's SDPA path without one mistakes (B, L, kv_heads, d) keys
            # for (B, kv_heads, L, d) when L == kv_heads (ibm-fms 1.13.1)
            hidden, cache = self.language_model.base_model(
                embeds, position_ids, past_key_value_states, True, **attn_kwargs
            )
        finally:
            if self._adapter_gate is not None:
                self._adapter_gate.value = None
        logits = self._logits(hidden, last_n_tokens)
        return (logits, cache) if use_cache else logits


def _tie_sizes(input_ids, position_ids, past_key_value_states, mask, batched=()) -> None:
    """State the sizes the inputs share, so that a compiled graph has one symbol for each.

    compile_model turns duck sizing off (fms_speech.compile), so every input dimension gets its
    own symbol even where two are always equal: the positions' length and the tokens' (FMS's
    rotary embedding then slices its table with `positions - tokens`, a start inductor cannot
    prove non-negative), each layer's key and value cache lengths, the mask's sides. Inductor's
    CUDA code generation failed on such graphs (docs/compile-efficiency.md, "The GPU check");
    these checks make the symbols one. In eager they check the inputs before any work.
    The batch of `input_ids` is also that of every tensor in `batched` (the features, their
    lengths, the LoRA gate), and at least 1.
    """
    batch, length = input_ids.shape
    if torch.compiler.is_compiling():
        torch._check(batch >= 1)

    def same(size, expected, what: str) -> None:
        if torch.compiler.is_compiling():
            torch._check(size == expected)  # dynamo cannot take a message closure here
        elif size != expected:
            raise ValueError(f"{what} is {size}, expected {expected}")

    for tensor in batched:
        if tensor is not None:
            same(tensor.shape[0], batch, "an input's batch")
    if position_ids is not None:
        same(position_ids.shape[0], batch, "position_ids' batch")
        same(position_ids.shape[1], length, "position_ids' length")
    past = 0
    if past_key_value_states:
        past = past_key_value_states[0][0].shape[2]
        for keys, values in past_key_value_states:
            for cached in (keys, values):
                same(cached.shape[0], batch, "a cache's batch")
                same(cached.shape[2], past, "a cache's length")
    if mask is not None:
        same(mask.shape[0], batch, "the mask's batch")
        same(mask.shape[-2], length, "the mask's query length")
        same(mask.shape[-1], past + length, "the mask's key length")


def _names(names: list[str], shown: int = 8) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# ---- variants (shapes from the published config.json files; a checkpoint's own config wins)


def _granite_text(**overrides) -> GraniteConfig:
    base = {
        "src_vocab_size": 49160,
        "emb_dim": 2048,
        "norm_eps": 1e-5,
        "nheads": 32,
        "head_dim": 64,
        "kvheads": 8,
        "nlayers": 40,
        "hidden_grow_factor": 8192 / 2048,
        "multiple_of": 1,
        "max_expected_seq_len": 131072,
        "rope_theta": 1e7,
        "p_dropout": 0.0,
        "tie_heads": True,
        "embedding_multiplier": 12.0,
        "logits_scaling": 8.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.015625,
        "activation_fn": "silu",
    }
    base.update(overrides)
    return GraniteConfig(**base)


_text_8b = {
    "emb_dim": 4096,
    "head_dim": 128,
    "hidden_grow_factor": 12800 / 4096,
    "attention_multiplier": 0.0078125,
    "logits_scaling": 16.0,
}

_3_3_2b_config = GraniteSpeechConfig(text_config=_granite_text())
_3_3_8b_config = GraniteSpeechConfig(
    projector_config=QFormerConfig(output_size=4096), text_config=_granite_text(**_text_8b)
)
_3_2_8b_config = GraniteSpeechConfig(
    encoder_config=ConformerConfig(num_layers=10, output_dim=42),
    projector_config=QFormerConfig(output_size=4096),
    text_config=_granite_text(**_text_8b, src_vocab_size=49156),
    audio_token_index=49155,
)
# granite-4.0-1b-speech and granite-speech-4.1-2b (same topology): a Granite 4.0 1B dense LLM
# with an untied lm_head and no LoRA adapter; the published config.json is the authority
_text_4_0_1b = {
    "src_vocab_size": 100353,
    "nheads": 16,
    "kvheads": 4,
    "head_dim": 128,
    "hidden_grow_factor": 4096 / 2048,
    "rope_theta": 10_000.0,
    "attention_multiplier": 0.0078125,
    "tie_heads": False,
}
_4_0_1b_config = GraniteSpeechConfig(
    encoder_config=ConformerConfig(output_dim=348),
    projector_config=QFormerConfig(output_size=2048),
    text_config=_granite_text(**_text_4_0_1b),
    audio_token_index=100352,
    lora_rank=0,
)
_4_1_2b_config = _4_0_1b_config


def _granite_speech_factory_factory(config):
    def factory(**kwargs):
        return GraniteSpeech(config, **kwargs)

    return factory


models.register_model(_architecture_name, "3.3-2b", _granite_speech_factory_factory(_3_3_2b_config))
models.register_model(_architecture_name, "3.3-8b", _granite_speech_factory_factory(_3_3_8b_config))
models.register_model(_architecture_name, "3.2-8b", _granite_speech_factory_factory(_3_2_8b_config))
models.register_model(_architecture_name, "4.0-1b", _granite_speech_factory_factory(_4_0_1b_config))
models.register_model(_architecture_name, "4.1-2b", _granite_speech_factory_factory(_4_1_2b_config))


# ---- transformers config <-> ours (fms.models.get_model("hf_pretrained", model_path=DIR))

# fields named alike on both sides
_ENCODER_FIELDS = (
    "input_dim",
    "num_layers",
    "hidden_dim",
    "feedforward_mult",
    "num_heads",
    "dim_head",
    "output_dim",
    "context_size",
    "max_pos_emb",
    "conv_kernel_size",
    "conv_expansion_factor",
)
# ours -> transformers' Blip2QFormerConfig
_PROJECTOR_FIELDS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "cross_attention_frequency": "cross_attention_frequency",
    "encoder_hidden_size": "encoder_hidden_size",
    "layer_norm_eps": "layer_norm_eps",
}


def build_granite_speech_params(config) -> dict:
    """Map transformers' GraniteSpeechConfig to GraniteSpeech keyword overrides.

    The adapter's rank and alpha come from `adapter_config.json` beside config.json.
    """
    text = config.text_config
    if text.model_type != "granite":
        raise ValueError(f"unsupported LLM type {text.model_type!r} (expected 'granite')")
    encoder, projector = config.encoder_config, config.projector_config
    text_params = build_granite_params(text)
    text_params["tie_heads"] = bool(
        getattr(config, "tie_word_embeddings", text_params["tie_heads"])
    )
    model_dir = getattr(config, "_name_or_path", None)
    lora_rank, lora_alpha = checkpoint.adapter_settings(model_dir) if model_dir else (0, 0.0)
    return {
        "encoder_config": ConformerConfig(**{k: getattr(encoder, k) for k in _ENCODER_FIELDS}),
        "projector_config": QFormerConfig(
            **{ours: getattr(projector, theirs) for ours, theirs in _PROJECTOR_FIELDS.items()},
            window_size=config.window_size,
            downsample_rate=config.downsample_rate,
            output_size=text.hidden_size,
        ),
        "text_config": GraniteConfig(**text_params),
        "audio_token_index": config.audio_token_index,
        "lora_rank": lora_rank,
        "lora_alpha": lora_alpha,
    }


def hf_config(config: GraniteSpeechConfig):
    """transformers' GraniteSpeechConfig for ours: the inverse of build_granite_speech_params."""
    from transformers import GraniteSpeechConfig as HFGraniteSpeechConfig

    return HFGraniteSpeechConfig(**hf_config_kwargs(config))


def hf_config_kwargs(config: GraniteSpeechConfig) -> dict:
    """The keyword arguments of transformers' config class for ours (granite_speech_plus adds to
    the encoder's)."""
    encoder, projector, text = config.encoder_config, config.projector_config, config.text_config
    text_config = {
        "model_type": "granite",
        "vocab_size": text.src_vocab_size,
        "hidden_size": text.emb_dim,
        "intermediate_size": round(text.emb_dim * text.hidden_grow_factor),
        "num_hidden_layers": text.nlayers,
        "num_attention_heads": text.nheads,
        "num_key_value_heads": text.kvheads,
        "head_dim": text.head_dim,
        "max_position_embeddings": text.max_expected_seq_len,
        "rms_norm_eps": text.norm_eps,
        "rope_theta": text.rope_theta,
        "embedding_multiplier": text.embedding_multiplier,
        "residual_multiplier": text.residual_multiplier,
        "attention_multiplier": text.attention_multiplier,
        "logits_scaling": text.logits_scaling,
        "tie_word_embeddings": text.tie_heads,
    }
    return dict(
        encoder_config={**{k: getattr(encoder, k) for k in _ENCODER_FIELDS}, "dropout": 0.0},
        projector_config={
            "model_type": "blip_2_qformer",
            **{theirs: getattr(projector, ours) for ours, theirs in _PROJECTOR_FIELDS.items()},
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        text_config=text_config,
        audio_token_index=config.audio_token_index,
        window_size=projector.window_size,
        downsample_rate=projector.downsample_rate,
        has_lora_adapter=config.lora_rank > 0,
        tie_word_embeddings=text.tie_heads,
    )


register_hf_architecture(
    "GraniteSpeechForConditionalGeneration", _architecture_name, build_granite_speech_params
)


# ---- serialization: transformers 4.x / 5.x names (+ PEFT adapter keys) -> ours

# PEFT's prefix on the adapter's keys (adapter_model.safetensors, read with the base shards)
_PEFT_PREFIX = "base_model.model."
# checkpoint prefixes of transformers 5.x -> the 4.x ones the rules below use
_V5_PREFIXES = [
    (r"^model\.encoder\.", "encoder."),
    (r"^model\.projector\.", "projector."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]

_AUDIO_RULES = [
    (r"^encoder\.layers\.(\d+)\.(ff[12])\.up_proj\.", r"encoder.layers.\1.\2.mlp.w1."),
    (r"^encoder\.layers\.(\d+)\.(ff[12])\.down_proj\.", r"encoder.layers.\1.\2.mlp.w2."),
    (r"^encoder\.layers\.(\d+)\.conv\.depth_conv\.conv\.", r"encoder.layers.\1.conv.depth_conv."),
    (r"^projector\.qformer\.layernorm\.", "projector.query_norm."),
    (r"^projector\.qformer\.encoder\.layer\.", "projector.layers."),
    (r"\.attention\.attention\.", ".self_attention."),
    (r"\.attention\.output\.dense\.", ".self_attention.dense."),
    (r"\.attention\.output\.LayerNorm\.", ".self_attention.layer_norm."),
    (r"\.crossattention\.attention\.", ".cross_attention."),
    (r"\.crossattention\.output\.dense\.", ".cross_attention.dense."),
    (r"\.crossattention\.output\.LayerNorm\.", ".cross_attention.layer_norm."),
    (r"\.intermediate_query\.dense\.", ".mlp.w1."),
    (r"\.output_query\.dense\.", ".mlp.w2."),
    (r"\.output_query\.LayerNorm\.", ".mlp_norm."),
]

_LORA_KEY = re.compile(
    r"^language_model\.model\.layers\.(\d+)\.self_attn\.([qv])_proj\.lora_([AB])\.weight$"
)


def _canonical(name: str) -> str:
    name = name.removeprefix(_PEFT_PREFIX)
    for pattern, replacement in _V5_PREFIXES:
        name = re.sub(pattern, replacement, name)
    return name


def _lora_to_fms(name: str, tensor, config: GraniteSpeechConfig) -> tuple[str, Any]:
    layer, proj, ab = _LORA_KEY.match(name).groups()
    if ab == "B":
        # PEFT computes B(A x) * alpha / r: fold the scaling into B once
        tensor = tensor * (config.lora_alpha / config.lora_rank)
    if proj == "q" and ab == "B":
        # the q rows are permuted for FMS's RoPE layout: permute the LoRA's output rows alike
        fake = f"base_model.layers.{layer}.attn.in_proj.query.weight"
        tensor = granite_hf_to_fms_rope({fake: tensor}, model_config=config.text_config)[fake]
    return f"language_model.base_model.layers.{layer}.attn.in_proj.lora_{proj}_{ab.lower()}", tensor


def hf_to_fms_step(model_class: type):
    """The `hf_to_fms` adapter step of `model_class` (GraniteSpeech or a subclass): the names
    are the same, the expected shapes those of the class built from the model's config."""

    def step(input_sd: Mapping[str, Any], model_config=None, **kwargs) -> Mapping[str, Any]:
        return _hf_to_fms(input_sd, model_config, model_class=model_class)

    return step


def _hf_to_fms(
    input_sd: Mapping[str, Any],
    model_config: GraniteSpeechConfig | None = None,
    model_class: type | None = None,
    **kwargs,
) -> Mapping[str, Any]:
    config = model_config or GraniteSpeechConfig()
    new_sd, llm_sd, lora_sd, unexpected = {}, {}, {}, []
    for name, tensor in input_sd.items():
        name = _canonical(name)
        if name.startswith(("encoder.", "projector.")):
            for pattern, replacement in _AUDIO_RULES:
                name = re.sub(pattern, replacement, name)
            new_sd[name] = tensor
        elif _LORA_KEY.match(name):
            lora_sd[name] = tensor
        elif name.startswith("language_model."):
            llm_sd[name.removeprefix("language_model.")] = tensor
        else:
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"unexpected keys in the checkpoint: {', '.join(sorted(unexpected))}")
    if lora_sd and config.lora_rank == 0:
        raise ValueError(
            f"the checkpoint has audio LoRA weights ({min(lora_sd)}) but the model was built "
            "without an adapter (lora_rank=0)"
        )
    try:
        new_sd.update(_lora_to_fms(n, t, config) for n, t in lora_sd.items())
        if llm_sd:
            adapter_kwargs = {"model_config": config.text_config}
            adapted = serialization.get_adapted("granite", "hf", llm_sd, adapter_kwargs)
            new_sd.update((f"language_model.{k}", v) for k, v in adapted.items())
    except RuntimeError as error:  # FMS's RoPE/fusion steps reshape by the config's heads
        llm_tensors = {**lora_sd, **{f"language_model.{k}": v for k, v in llm_sd.items()}}
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(llm_tensors.items()))
        raise ValueError(
            f"shape mismatch for {min(llm_tensors)}: checkpoint tensors ({shapes}) "
            f"do not fit the LLM configuration: {error}"
        ) from error
    check_shapes(new_sd, model_class or GraniteSpeech, config)
    return new_sd


serialization.register_adapter_step(_architecture_name, "hf_to_fms", hf_to_fms_step(GraniteSpeech))
serialization.register_adapter(_architecture_name, "hf", ["hf_to_fms"])


# ---- ours -> transformers 5.x names + a PEFT adapter (the inverse of _hf_to_fms)

# applied in order; the encoder's and the projector's rules never see each other's keys
_AUDIO_RULES_TO_HF = {
    "encoder.": [
        (r"^encoder\.layers\.(\d+)\.(ff[12])\.mlp\.w1\.", r"encoder.layers.\1.\2.up_proj."),
        (r"^encoder\.layers\.(\d+)\.(ff[12])\.mlp\.w2\.", r"encoder.layers.\1.\2.down_proj."),
        (
            r"^encoder\.layers\.(\d+)\.conv\.depth_conv\.",
            r"encoder.layers.\1.conv.depth_conv.conv.",
        ),
    ],
    "projector.": [
        (r"^projector\.query_norm\.", "projector.qformer.layernorm."),
        (r"^projector\.layers\.", "projector.qformer.encoder.layer."),
        (r"\.self_attention\.dense\.", ".attention.output.dense."),
        (r"\.self_attention\.layer_norm\.", ".attention.output.LayerNorm."),
        (r"\.self_attention\.", ".attention.attention."),
        (r"\.cross_attention\.dense\.", ".crossattention.output.dense."),
        (r"\.cross_attention\.layer_norm\.", ".crossattention.output.LayerNorm."),
        (r"\.cross_attention\.", ".crossattention.attention."),
        (r"\.mlp\.w1\.", ".intermediate_query.dense."),
        (r"\.mlp\.w2\.", ".output_query.dense."),
        (r"\.mlp_norm\.", ".output_query.LayerNorm."),
    ],
}
_FMS_LLM_LAYER = re.compile(r"^language_model\.base_model\.layers\.(\d+)\.(.+)$")
_FMS_LLM_LAYER_NAMES = {
    "ln.weight": "input_layernorm.weight",
    "ff_ln.weight": "post_attention_layernorm.weight",
    "attn.dense.weight": "self_attn.o_proj.weight",
    "ff_sub_layer.w2.weight": "mlp.down_proj.weight",
}
_FMS_LORA = re.compile(r"^attn\.in_proj\.lora_([qv])_([ab])$")


def _fms_to_hf_rope(tensor: torch.Tensor, head_size: int) -> torch.Tensor:
    """Undo FMS's RoPE row permutation (`granite_hf_to_fms_rope`) of a q or k projection."""
    heads = tensor.shape[0] // head_size
    return tensor.view(heads, -1, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def fms_to_hf(
    state_dict: Mapping[str, torch.Tensor], config: GraniteSpeechConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our state dict as transformers' GraniteSpeechForConditionalGeneration (5.x names) and
    the PEFT adapter (`adapter_model.safetensors` keys, alpha / r unfolded from B).

    The inverse of the `hf` adapter: the fused QKV and gate/up projections are split, q and k
    rows (and the LoRA's q B rows) get HF's RoPE order back. A tied LM head is left out.
    """
    text = config.text_config
    head_size = text.emb_dim // text.nheads  # what FMS's RoPE step permutes by
    q_rows, kv_rows = text.nheads * text.head_dim, text.kvheads * text.head_dim
    base, adapter = {}, {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().contiguous()
        prefix = next((p for p in _AUDIO_RULES_TO_HF if name.startswith(p)), None)
        if prefix is not None:
            for pattern, replacement in _AUDIO_RULES_TO_HF[prefix]:
                name = re.sub(pattern, replacement, name)
            base[f"model.{name}"] = tensor
            continue
        if name == "language_model.head.weight":
            if not text.tie_heads:
                base["lm_head.weight"] = tensor
            continue
        if name == "language_model.base_model.embedding.weight":
            base["model.language_model.embed_tokens.weight"] = tensor
            continue
        if name == "language_model.base_model.dec_norm.weight":
            base["model.language_model.norm.weight"] = tensor
            continue
        match = _FMS_LLM_LAYER.match(name)
        if match is None:
            if name.startswith("language_model.base_model.rot_emb"):
                continue  # RoPE tables are computed, not stored
            raise ValueError(f"no transformers name for {name}")
        layer, rest = match.groups()
        hf_layer = f"model.language_model.layers.{layer}"
        lora = _FMS_LORA.match(rest)
        if rest in _FMS_LLM_LAYER_NAMES:
            base[f"{hf_layer}.{_FMS_LLM_LAYER_NAMES[rest]}"] = tensor
        elif rest == "attn.in_proj.qkv_fused.weight":
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
            base[f"{hf_layer}.self_attn.q_proj.weight"] = _fms_to_hf_rope(q, head_size)
            base[f"{hf_layer}.self_attn.k_proj.weight"] = _fms_to_hf_rope(k, head_size)
            base[f"{hf_layer}.self_attn.v_proj.weight"] = v.contiguous()
        elif rest == "ff_sub_layer.wg1_fused.weight":
            gate, up = tensor.chunk(2)
            base[f"{hf_layer}.mlp.gate_proj.weight"] = gate.contiguous()
            base[f"{hf_layer}.mlp.up_proj.weight"] = up.contiguous()
        elif lora is not None:
            proj, ab = lora.groups()
            if ab == "b":
                tensor = tensor / (config.lora_alpha / config.lora_rank)
                if proj == "q":
                    tensor = _fms_to_hf_rope(tensor, head_size)
            key = f"{_PEFT_PREFIX}{hf_layer}.self_attn.{proj}_proj.lora_{ab.upper()}.weight"
            adapter[key] = tensor.contiguous()
        else:
            raise ValueError(f"no transformers name for {name}")
    return base, adapter
