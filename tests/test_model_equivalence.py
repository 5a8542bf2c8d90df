"""fms-speech against the reference (transformers) on random weights it saved itself.

Tolerance: max |ours - reference| / max |reference| <= 1e-4 in fp32, eager and compiled.
Logits are compared with the reference's divided by logits_scaling: transformers 5.x forgets
that division (see docs/model.md); FMS's Granite applies it.
"""

import pytest
import torch

from fms_speech.compile import compile_model
from fms_speech.testing.reference import CONFIGS, prompt_ids, relative_error

TOLERANCE = 1e-4


def _lengths(model) -> list[int]:
    """A clip shorter than one attention block, an exact multiple, and a ragged one."""
    block = model.config.encoder_config.context_size
    return [max(1, block - 3), 2 * block, 3 * block + 5]


def _reference_logits(reference, ids, features=None):
    scaling = reference.config.text_config.logits_scaling
    with torch.no_grad():
        if features is None:
            with reference.disable_adapter():
                return reference(input_ids=ids).logits / scaling
        return reference(input_ids=ids, input_features=features).logits / scaling


def _audio_prompt(model, features):
    count = int(model.audio_token_counts(features).item())
    return torch.tensor([prompt_ids(count)])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encoder_projector_logits_match_reference_eager(checkpoints, name):
    reference, model, _ = checkpoints[name]
    inner = reference.get_base_model().model
    for frames in _lengths(model):
        features = torch.randn(1, frames, 160)
        with torch.no_grad():
            expected_encoder = inner.encoder(features).last_hidden_state
            expected_audio = inner.projector(expected_encoder)
            assert relative_error(model.encoder(features), expected_encoder) <= TOLERANCE
            assert relative_error(model.get_audio_features(features), expected_audio) <= TOLERANCE
            ids = _audio_prompt(model, features)
            logits = model(ids, input_features=features)
        assert relative_error(logits, _reference_logits(reference, ids, features)) <= TOLERANCE
    # text-only prompts, LoRA off; length 2 = the LLM's kv-head count in some configs
    for length in (1, 2, 9):
        ids = torch.randint(3, 200, (1, length))
        with torch.no_grad():
            logits = model(ids)
        assert relative_error(logits, _reference_logits(reference, ids)) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_reference_compiled(checkpoints, name):
    reference, model, _ = checkpoints[name]
    torch._dynamo.reset()  # every model instance shares forward's code object and its cache
    compiled = compile_model(model)
    frames = _lengths(model)[2]
    features = torch.randn(2, frames, 160)
    ids = _audio_prompt(model, features[:1]).repeat(2, 1)
    text_ids = torch.randint(3, 200, (2, 7))
    with torch.no_grad():
        audio_logits = compiled(ids, input_features=features)
        text_logits = compiled(text_ids)
    assert relative_error(audio_logits, _reference_logits(reference, ids, features)) <= TOLERANCE
    assert relative_error(text_logits, _reference_logits(reference, text_ids)) <= TOLERANCE


def test_lora_is_on_with_audio_and_off_without(checkpoints):
    reference, model, _ = checkpoints["odd_layers_even_kernel"]
    ids = torch.randint(3, 200, (1, 6))
    with torch.no_grad():
        off = model(ids)
        on = model(ids, lora_gate=torch.ones(1))
        expected_on = reference(input_ids=ids).logits / reference.config.text_config.logits_scaling
    assert relative_error(on, expected_on) <= TOLERANCE
    assert relative_error(off, _reference_logits(reference, ids)) <= TOLERANCE
    assert (on - off).abs().max() > 1e-3  # the adapter does something


def test_placeholder_mismatch_names_both_counts(checkpoints):
    _, model, _ = checkpoints["odd_layers_even_kernel"]
    features = torch.randn(1, 40, 160)
    count = int(model.audio_token_counts(features).item())
    ids = torch.tensor([prompt_ids(count - 1)])
    with pytest.raises(ValueError, match=f"{count - 1} <\\|audio\\|> tokens.*{count} audio tokens"):
        model(ids, input_features=features)


# ---- the shipped demo model (trained weights; under-trained so far: docs/demo-model.md)


@pytest.fixture(scope="module")
def demo_pair():
    """(fms-speech model, reference with its PEFT adapter, tokenizer) of the demo checkpoint."""
    from fms.models import get_model
    from transformers import AutoTokenizer, GraniteSpeechForConditionalGeneration

    from fms_speech.cli import DEMO_MODEL

    model = get_model("hf_pretrained", model_path=str(DEMO_MODEL)).eval()
    reference = GraniteSpeechForConditionalGeneration.from_pretrained(DEMO_MODEL).eval()
    assert list(reference.peft_config) == ["default"]  # transformers loaded the adapter
    return model, reference, AutoTokenizer.from_pretrained(DEMO_MODEL)


def _demo_clips():
    from fms_speech.audio import log_mel
    from fms_speech.demo_recipe import held_out_sentences, speak

    texts = held_out_sentences(3)
    return [log_mel([torch.from_numpy(speak(text))]) for text in texts]


def test_demo_model_matches_reference_logits_and_greedy_tokens(demo_pair):
    from transformers import GenerationMixin

    from fms_speech.generation import generate
    from fms_speech.prompts import chat_text, instruction
    from fms_speech.prompts import prompt_ids as chat_prompt_ids

    model, reference, tokenizer = demo_pair
    template = chat_text(tokenizer, instruction())
    scaling = reference.config.text_config.logits_scaling
    clips = _demo_clips()
    for features, lengths in clips:
        count = int(model.audio_token_counts(features, lengths).item())
        ids = torch.tensor([chat_prompt_ids(tokenizer, template, count)])
        with torch.no_grad():
            ours = model(ids, input_features=features, feature_lengths=lengths)
            theirs = reference(input_ids=ids, input_features=features).logits / scaling
            # GenerationMixin's generate: GraniteSpeech's own only toggles the adapter (on, as
            # loaded, for audio), through an API that wants peft >= 0.22
            expected = GenerationMixin.generate(
                reference,
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                input_features=features,
                input_features_mask=torch.ones(1, count, dtype=torch.bool),
                max_new_tokens=40,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )[0, ids.shape[1] :].tolist()
        assert relative_error(ours, theirs) <= TOLERANCE
        output = generate(
            model,
            [ids[0].tolist()],
            features,
            lengths,
            max_new_tokens=40,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        eos = tokenizer.eos_token_id
        expected = expected[: expected.index(eos)] if eos in expected else expected
        assert output.sequences[0] == expected
