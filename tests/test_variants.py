"""Each named variant against the reference built from the equivalent transformers config.

Everything is on the meta device: shapes and names only, no weights.
"""

import fms.models
import pytest
import torch
from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

from fms_speech.models.granite_speech import _hf_to_fms


def _transformers_config(config) -> GraniteSpeechConfig:
    encoder, projector, text = config.encoder_config, config.projector_config, config.text_config
    return GraniteSpeechConfig(
        encoder_config=dict(
            input_dim=encoder.input_dim,
            num_layers=encoder.num_layers,
            hidden_dim=encoder.hidden_dim,
            feedforward_mult=encoder.feedforward_mult,
            num_heads=encoder.num_heads,
            dim_head=encoder.dim_head,
            output_dim=encoder.output_dim,
            context_size=encoder.context_size,
            max_pos_emb=encoder.max_pos_emb,
            conv_kernel_size=encoder.conv_kernel_size,
            conv_expansion_factor=encoder.conv_expansion_factor,
        ),
        projector_config=dict(
            model_type="blip_2_qformer",
            hidden_size=projector.hidden_size,
            num_hidden_layers=projector.num_layers,
            num_attention_heads=projector.num_heads,
            intermediate_size=projector.intermediate_size,
            cross_attention_frequency=projector.cross_attention_frequency,
            encoder_hidden_size=projector.encoder_hidden_size,
        ),
        text_config=dict(
            model_type="granite",
            vocab_size=text.src_vocab_size,
            hidden_size=text.emb_dim,
            intermediate_size=round(text.hidden_grow_factor * text.emb_dim),
            num_hidden_layers=text.nlayers,
            num_attention_heads=text.nheads,
            num_key_value_heads=text.kvheads,
            head_dim=text.head_dim,
            tie_word_embeddings=text.tie_heads,
        ),
        window_size=projector.window_size,
        downsample_rate=projector.downsample_rate,
        audio_token_index=config.audio_token_index,
        tie_word_embeddings=text.tie_heads,
    )


@pytest.mark.parametrize("variant", ["3.3-2b", "3.3-8b", "3.2-8b", "4.0-1b"])
def test_variant_parameters_map_onto_the_reference(variant):
    model = fms.models.get_model("granite_speech", variant, device_type="meta", lora_rank=0)
    with torch.device("meta"):
        reference = GraniteSpeechForConditionalGeneration(_transformers_config(model.config))
    reference_sd = dict(reference.state_dict())
    if model.config.text_config.tie_heads:
        reference_sd.pop("lm_head.weight")  # tied: stored once, as the embedding
    mapped = _hf_to_fms(reference_sd, model_config=model.config)
    ours = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert sorted(mapped) == sorted(ours)
    for name, tensor in mapped.items():
        assert tuple(tensor.shape) == tuple(ours[name].shape), name
    reference_count = sum(t.numel() for t in reference_sd.values())
    assert reference_count == sum(t.numel() for t in ours.values())


def test_published_shapes_of_3_3_2b():
    model = fms.models.get_model("granite_speech", "3.3-2b", device_type="meta")
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    assert 0.43e9 < encoder_params < 0.45e9  # "~0.44B parameters (16 layers)"
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    # r=64 on q (2048->2048) and v (2048->512) in each of 40 layers
    assert lora == 40 * 64 * ((2048 + 2048) + (2048 + 512))
