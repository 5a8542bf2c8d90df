"""Each named variant against the reference built from the equivalent transformers config.

Everything is on the meta device: shapes and names only, no weights. The config mapping under
test is the model's own (`hf_config` and `build_*_params`, its inverse); the independent oracle
is the reference itself: the parameters transformers builds from the mapped config must map one
to one, with the same shapes and counts, onto ours.
"""

import fms.models
import pytest
import torch

from fms_speech.models import granite_speech, granite_speech5, granite_speech_plus
from fms_speech.testing.reference import reference_class

# architecture -> (its module: hf_config, build_*_params, _hf_to_fms)
MODULES = {
    "granite_speech": (
        granite_speech,
        granite_speech.build_granite_speech_params,
        granite_speech._hf_to_fms,
    ),
    "granite_speech_plus": (
        granite_speech_plus,
        granite_speech_plus.build_granite_speech_plus_params,
        granite_speech_plus.hf_to_fms_step(granite_speech_plus.GraniteSpeechPlus),
    ),
    "granite_speech5": (
        granite_speech5,
        granite_speech5.build_granite_speech5_params,
        granite_speech5._hf_to_fms,
    ),
}
VARIANTS = [
    ("granite_speech", "3.3-2b"),
    ("granite_speech", "3.3-8b"),
    ("granite_speech", "3.2-8b"),
    ("granite_speech", "4.0-1b"),
    ("granite_speech", "4.1-2b"),
    ("granite_speech_plus", "4.1-2b-plus"),
    ("granite_speech5", "5.0-470m"),
]


@pytest.mark.parametrize(("architecture", "variant"), VARIANTS)
def test_variant_parameters_map_onto_the_reference(architecture, variant):
    module, _, hf_to_fms = MODULES[architecture]
    overrides = {} if architecture == "granite_speech5" else {"lora_rank": 0}
    model = fms.models.get_model(architecture, variant, device_type="meta", **overrides)
    hf = module.hf_config(model.config)
    with torch.device("meta"):
        reference = reference_class(hf)(hf)
    reference_sd = dict(reference.state_dict())
    # tied: stored once (the embedding; granite_speech5's encoder.out), as the reference saves it
    for tied in ("lm_head.weight", "ctc_head.weight", "ctc_head.bias"):
        if tied in reference_sd and getattr(hf, "tie_word_embeddings", False):
            reference_sd.pop(tied)
    mapped = hf_to_fms(reference_sd, model_config=model.config)
    ours = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert sorted(mapped) == sorted(ours)
    for name, tensor in mapped.items():
        assert tuple(tensor.shape) == tuple(ours[name].shape), name
    reference_count = sum(t.numel() for t in reference_sd.values())
    assert reference_count == sum(t.numel() for t in ours.values())
    assert reference_count == sum(p.numel() for p in reference.parameters()) + sum(
        b.numel() for n, b in reference.named_buffers() if n in reference_sd
    )


@pytest.mark.parametrize(("architecture", "variant"), VARIANTS)
def test_config_mapping_round_trips(architecture, variant):
    module, build_params, _ = MODULES[architecture]
    config = fms.models.get_model(architecture, variant, device_type="meta").config
    params = build_params(module.hf_config(config))
    for key, value in params.items():
        if key in ("lora_rank", "lora_alpha"):  # from adapter_config.json, not config.json
            continue
        ours = getattr(config, key)
        assert (value.as_dict() if hasattr(value, "as_dict") else value) == (
            ours.as_dict() if hasattr(ours, "as_dict") else ours
        ), key


def test_published_shapes_of_3_3_2b():
    model = fms.models.get_model("granite_speech", "3.3-2b", device_type="meta")
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    assert 0.43e9 < encoder_params < 0.45e9  # "~0.44B parameters (16 layers)"
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    # r=64 on q (2048->2048) and v (2048->512) in each of 40 layers
    assert lora == 40 * 64 * ((2048 + 2048) + (2048 + 512))


def test_published_shapes_of_4_x():
    """4.0-1b and 4.1-2b: no LoRA, untied head; 4.1-2b-plus: block 3 into a 2048-wide projector;
    5.0-470m: about 470M parameters, a 16384-unit CTC vocabulary, time / 4."""
    for variant in ("4.0-1b", "4.1-2b"):
        model = fms.models.get_model("granite_speech", variant, device_type="meta")
        assert model.config.lora_rank == 0 and not model.config.text_config.tie_heads
        assert not any("lora_" in n for n, _ in model.named_parameters())
    plus = fms.models.get_model("granite_speech_plus", "4.1-2b-plus", device_type="meta")
    assert plus.config.encoder_config.cat_hidden_layers == (3,)
    assert plus.config.projector_config.encoder_hidden_size == 2048
    assert plus.config.audio_token_index == 100352
    ctc = fms.models.get_model("granite_speech5", "5.0-470m", device_type="meta")
    assert 0.46e9 < sum(p.numel() for p in ctc.parameters()) < 0.48e9
    assert ctc.vocab_size == 16384 and ctc.config.encoder_config.subsample_layers == (0, 1)
