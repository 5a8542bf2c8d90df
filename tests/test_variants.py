"""Each named variant against the reference built from the equivalent transformers config.

Everything is on the meta device: shapes and names only, no weights. The config mapping under
test is the model's own (`hf_config` and `build_granite_speech_params`, its inverse); the
independent oracle is the reference itself: the parameters transformers builds from the mapped
config must map one to one, with the same shapes and counts, onto ours.
"""

import fms.models
import pytest
import torch
from transformers import GraniteSpeechForConditionalGeneration

from fms_speech.models.granite_speech import _hf_to_fms, build_granite_speech_params, hf_config


@pytest.mark.parametrize("variant", ["3.3-2b", "3.3-8b", "3.2-8b", "4.0-1b"])
def test_variant_parameters_map_onto_the_reference(variant):
    model = fms.models.get_model("granite_speech", variant, device_type="meta", lora_rank=0)
    with torch.device("meta"):
        reference = GraniteSpeechForConditionalGeneration(hf_config(model.config))
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


@pytest.mark.parametrize("variant", ["3.3-2b", "3.2-8b", "4.0-1b"])
def test_config_mapping_round_trips(variant):
    config = fms.models.get_model("granite_speech", variant, device_type="meta").config
    params = build_granite_speech_params(hf_config(config))
    for part in ("encoder_config", "projector_config", "text_config"):
        assert params[part].as_dict() == getattr(config, part).as_dict(), part
    assert params["audio_token_index"] == config.audio_token_index


def test_published_shapes_of_3_3_2b():
    model = fms.models.get_model("granite_speech", "3.3-2b", device_type="meta")
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    assert 0.43e9 < encoder_params < 0.45e9  # "~0.44B parameters (16 layers)"
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    # r=64 on q (2048->2048) and v (2048->512) in each of 40 layers
    assert lora == 40 * 64 * ((2048 + 2048) + (2048 + 512))
