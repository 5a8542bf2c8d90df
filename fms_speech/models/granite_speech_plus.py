"""Granite Speech Plus (`granite_speech_plus`, granite-speech-4.1-2b-plus) as an FMS model.

`granite_speech` with one change in the encoder: the states of the layers listed in
`cat_hidden_layers` are concatenated with the final output on the feature axis, in layer order
(index 0 = the `input_linear` output, index i = block i's output counting from 1), so the
projector reads `hidden_dim * (len(cat_hidden_layers) + 1)` features per frame. As in the
reference, the copy of block `num_layers // 2` includes the mid-layer CTC update (transformers
applies it in place). Checkpoint names, feature extractor and prompts are `granite_speech`'s.
"""

from dataclasses import dataclass, field

import torch
from fms import models
from fms.utils import serialization

from fms_speech._compat import register_hf_architecture
from fms_speech.models.conformer import ConformerConfig, ConformerEncoder
from fms_speech.models.granite_speech import (
    GraniteSpeech,
    GraniteSpeechConfig,
    _granite_text,
    _text_4_0_1b,
    build_granite_speech_params,
    hf_config_kwargs,
    hf_to_fms_step,
)
from fms_speech.models.qformer import QFormerConfig

_architecture_name = "granite_speech_plus"


@dataclass
class GraniteSpeechPlusEncoderConfig(ConformerConfig):
    cat_hidden_layers: tuple[int, ...] = (3,)

    def __post_init__(self):
        super().__post_init__()
        self.cat_hidden_layers = tuple(self.cat_hidden_layers)


@dataclass
class GraniteSpeechPlusConfig(GraniteSpeechConfig):
    encoder_config: GraniteSpeechPlusEncoderConfig = field(
        default_factory=GraniteSpeechPlusEncoderConfig
    )


class ConcatConformerEncoder(ConformerEncoder):
    """The Conformer whose output is [listed layers' states..., final] on the feature axis."""

    def __init__(self, config: GraniteSpeechPlusEncoderConfig | None = None, **kwargs):
        super().__init__(config or GraniteSpeechPlusEncoderConfig(), **kwargs)
        layers = self.config.cat_hidden_layers
        if len(set(layers)) != len(layers):
            raise ValueError(f"cat_hidden_layers {list(layers)} repeats a layer")
        bad = [index for index in layers if not 0 <= index < self.config.num_layers]
        if bad:
            raise ValueError(
                f"cat_hidden_layers index {bad[0]} is out of range [0, {self.config.num_layers})"
            )

    @property
    def output_width(self) -> int:
        return self.config.hidden_dim * (len(self.config.cat_hidden_layers) + 1)

    def forward(
        self, input_features: torch.Tensor, feature_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        export = tuple(sorted(self.config.cat_hidden_layers))
        return torch.cat(self.layer_outputs(input_features, feature_lengths, export), dim=-1)


class GraniteSpeechPlus(GraniteSpeech):
    """GraniteSpeech whose projector reads the concatenation of several encoder layers."""

    encoder_class = ConcatConformerEncoder

    def __init__(self, config: GraniteSpeechPlusConfig | None = None, **kwargs):
        super().__init__(config or GraniteSpeechPlusConfig(), **kwargs)
        expected = self.encoder.output_width
        if self.config.projector_config.encoder_hidden_size != expected:
            raise ValueError(
                f"the projector reads {self.config.projector_config.encoder_hidden_size} "
                f"features per frame but the encoder concatenates {expected} "
                f"(hidden_dim x {len(self.config.encoder_config.cat_hidden_layers) + 1})"
            )

    @classmethod
    def from_config(cls, config: GraniteSpeechPlusConfig) -> "GraniteSpeechPlus":
        return cls(config)


# ---- variants (the published config.json; a checkpoint's own config wins)

# granite-speech-4.1-2b-plus: granite-speech-4.1-2b's topology, block 3 concatenated with the
# output (2 x 1024 features into the projector), no LoRA adapter
_4_1_2b_plus_config = GraniteSpeechPlusConfig(
    encoder_config=GraniteSpeechPlusEncoderConfig(output_dim=348, cat_hidden_layers=(3,)),
    projector_config=QFormerConfig(encoder_hidden_size=2048, output_size=2048),
    text_config=_granite_text(**_text_4_0_1b),
    audio_token_index=100352,
    lora_rank=0,
)


def _granite_speech_plus_factory_factory(config):
    def factory(**kwargs):
        return GraniteSpeechPlus(config, **kwargs)

    return factory


models.register_model(
    _architecture_name, "4.1-2b-plus", _granite_speech_plus_factory_factory(_4_1_2b_plus_config)
)


# ---- transformers config <-> ours


def build_granite_speech_plus_params(config) -> dict:
    """Map transformers' GraniteSpeechPlusConfig to GraniteSpeechPlus keyword overrides."""
    params = build_granite_speech_params(config)
    encoder = params["encoder_config"]
    layers = config.encoder_config.cat_hidden_layers or []
    params["encoder_config"] = GraniteSpeechPlusEncoderConfig(
        **encoder.as_dict(), cat_hidden_layers=tuple(layers)
    )
    return params


def hf_config(config: GraniteSpeechPlusConfig):
    """transformers' GraniteSpeechPlusConfig for ours: the inverse of
    build_granite_speech_plus_params."""
    from transformers import GraniteSpeechPlusConfig as HFGraniteSpeechPlusConfig

    kwargs = hf_config_kwargs(config)
    layers = list(config.encoder_config.cat_hidden_layers)
    kwargs["encoder_config"]["cat_hidden_layers"] = layers or None
    return HFGraniteSpeechPlusConfig(**kwargs)


register_hf_architecture(
    "GraniteSpeechPlusForConditionalGeneration",
    _architecture_name,
    build_granite_speech_plus_params,
)

# the checkpoint names are granite_speech's; the expected shapes are this class's
serialization.register_adapter_step(
    _architecture_name, "hf_to_fms", hf_to_fms_step(GraniteSpeechPlus)
)
serialization.register_adapter(_architecture_name, "hf", ["hf_to_fms"])
