"""A padded batch gives each clip what it gets alone (the reference leaks padding)."""

import torch

from fms_speech.testing.reference import AUDIO_TOKEN, prompt_ids

TOLERANCE = 1e-5  # absolute, fp32


def _batch(model, lengths):
    clips = [torch.randn(n, 160) for n in lengths]
    features = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True)
    return clips, features, torch.tensor(lengths)


def test_each_clip_of_a_batch_matches_it_alone(checkpoints):
    _, model, _ = checkpoints["odd_layers_even_kernel"]
    block = model.config.encoder_config.context_size
    lengths = [3 * block + 5, block - 3, 2 * block, 17]  # ragged, < one block, exact multiple
    clips, features, feature_lengths = _batch(model, lengths)
    counts = model.audio_token_counts(features, feature_lengths).tolist()
    prompts = [prompt_ids(n) for n in counts]
    width = max(map(len, prompts))
    ids = torch.tensor([p + [3] * (width - len(p)) for p in prompts])  # right padding
    with torch.no_grad():
        encoder = model.encoder(features, feature_lengths)
        audio = model.get_audio_features(features, feature_lengths)
        logits = model(ids, input_features=features, feature_lengths=feature_lengths)
        for row, clip in enumerate(clips):
            alone = clip[None]
            n = lengths[row]
            assert (encoder[row, :n] - model.encoder(alone)[0]).abs().max() <= TOLERANCE
            alone_audio = model.get_audio_features(alone)[0]
            assert (audio[row, : counts[row]] - alone_audio).abs().max() <= TOLERANCE
            alone_ids = torch.tensor([prompts[row]])
            alone_logits = model(alone_ids, input_features=alone)[0]
            assert (logits[row, : len(prompts[row])] - alone_logits).abs().max() <= TOLERANCE


def test_reference_batch_leaks_padding_into_short_clips(checkpoints):
    """Why batch invariance is ours to provide: the reference's short clip changes in a batch."""
    reference, _, _ = checkpoints["odd_layers_even_kernel"]
    encoder = reference.get_base_model().model.encoder
    short, long = torch.randn(1, 5, 160), torch.randn(1, 40, 160)
    padded = torch.cat([torch.nn.functional.pad(short, (0, 0, 0, 35)), long])
    with torch.no_grad():
        alone = encoder(short).last_hidden_state[0]
        in_batch = encoder(padded).last_hidden_state[0, :5]
    assert (alone - in_batch).abs().max() > 1e-3


def test_audio_token_count_formula(checkpoints):
    _, model, _ = checkpoints["odd_layers_even_kernel"]
    features = torch.zeros(3, 31, 160)
    counts = model.audio_token_counts(features, torch.tensor([31, 15, 16]))
    # (window // downsample) * ceil(T / window) with window 15, downsample 5
    assert counts.tolist() == [9, 3, 6]
    assert model.config.audio_token_index == AUDIO_TOKEN
