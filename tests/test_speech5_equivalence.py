"""granite_speech5 (CTC) against the reference on random weights it saved itself (sharded).

Tolerance: max |ours - reference| / max |reference| <= 1e-4 in fp32, eager and compiled, on the
encoder output and the CTC logits; the greedy decoding (token ids and text) equals the
reference's `generate` + tokenizer `batch_decode`. The reference needs at least
2**len(subsample_layers) frames per clip (its pooling fails below), so no shorter clip is fed.
"""

import json

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoTokenizer

from fms_speech.compile import compile_model
from fms_speech.ctc import greedy_decode
from fms_speech.testing.reference import BLANK, SPEECH5_CONFIGS, relative_error

TOLERANCE = 1e-4


def _lengths(model) -> list[int]:
    """Odd lengths: one shorter than an attention block at every rate, one whose blocks do not
    divide it at any rate, and a ragged long one."""
    encoder = model.config.encoder_config
    shortest = 2 ** len(encoder.subsample_layers) + 1
    return [shortest, 4 * encoder.context_size + 3, 9 * encoder.context_size + 7]


def _batch(lengths: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), max(lengths), 320, generator=generator)
    lengths = torch.tensor(lengths)
    frames = torch.arange(features.shape[1])
    features = features * (frames[None, :] < lengths[:, None])[..., None]  # zero padding
    return features, lengths


def _reference_decoding(reference, tokenizer, features, lengths):
    """The reference's `generate` (greedy, padded frames -> blank) and the tokenizer's decode."""
    mask = (torch.arange(features.shape[1])[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        sequences = reference.generate(input_features=features, attention_mask=mask)
    texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    ids = []
    for row in sequences.tolist():
        merged = [t for i, t in enumerate(row) if i == 0 or t != row[i - 1]]
        ids.append([t for t in merged if t != BLANK])
    return ids, texts


def _our_decoding(model, tokenizer, logits, lengths):
    tokens = greedy_decode(logits, model.output_lengths(lengths), model.config.blank_token_id)
    ids = [[t.token_id for t in clip] for clip in tokens]
    texts = [tokenizer.decode(i, skip_special_tokens=True, group_tokens=False) for i in ids]
    return ids, texts


def _assert_valid_rows_match(model, logits, expected, lengths):
    for row, valid in enumerate(model.output_lengths(lengths).tolist()):
        assert relative_error(logits[row, :valid], expected[row, :valid]) <= TOLERANCE, row


@pytest.mark.parametrize("name", list(SPEECH5_CONFIGS))
def test_encoder_and_logits_match_reference_eager(ctc_checkpoints, name):
    reference, model, _ = ctc_checkpoints[name]
    for frames in _lengths(model):
        features = torch.randn(1, frames, 320, generator=torch.Generator().manual_seed(frames))
        with torch.no_grad():
            expected_states = reference.encoder(input_features=features).last_hidden_state
            expected_logits = reference(input_features=features).logits
            states = model.encoder(features)
            logits = model(features)
        rows = expected_logits.shape[1]
        assert rows == int(model.output_lengths(torch.tensor([frames])))
        assert relative_error(states[:, :rows], expected_states) <= TOLERANCE, frames
        assert relative_error(logits[:, :rows], expected_logits) <= TOLERANCE, frames


@pytest.mark.parametrize("name", list(SPEECH5_CONFIGS))
def test_padded_batch_and_decoding_match_reference_eager(ctc_checkpoints, name):
    """A padded batch: each clip's logits as the reference computes them (its batch masks
    padding too), and the greedy token ids and text of the reference's generate + decode."""
    reference, model, directory = ctc_checkpoints[name]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    features, lengths = _batch(_lengths(model))
    mask = (torch.arange(features.shape[1])[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        expected = reference(input_features=features, attention_mask=mask).logits
        logits = model(features, lengths)
    _assert_valid_rows_match(model, logits, expected, lengths)
    expected_ids, expected_texts = _reference_decoding(reference, tokenizer, features, lengths)
    ids, texts = _our_decoding(model, tokenizer, logits, lengths)
    assert ids == expected_ids
    assert texts == expected_texts
    assert sum(map(len, ids)) >= 3  # something was emitted: the comparison could fail


# compiled: one configuration over many shapes (and the compilation count), the others once
MANY_SHAPES_CONFIG = "ctc_three_subsamplings"
# dynamo specialises a dimension that is 1 on the first call: a first call with one clip gives a
# batch-1 graph, the next batch size one dynamic graph that serves everything else (the CTC
# model's batch is not marked unbacked, unlike granite_speech's: fms_speech.compile)
MAX_GRAPHS = 2


@pytest.mark.slow
def test_compiled_over_many_shapes_is_one_graph_and_matches_reference(ctc_checkpoints):
    reference, model, _ = ctc_checkpoints[MANY_SHAPES_CONFIG]
    torch._dynamo.reset()
    compiled = compile_model(model)
    minimum = 2 ** len(model.config.encoder_config.subsample_layers)  # the reference's least
    generator = torch.Generator().manual_seed(0)
    shapes = [(1, 20), (2, 37), (8, 9), (3, 50), (1, 301), (4, 101), (1, 3), (6, 250), (5, 5)]
    before = counters["stats"]["unique_graphs"]
    for batch, frames in shapes:
        lengths = torch.randint(1, frames + 1, (batch,), generator=generator)
        lengths[0] = frames
        features, lengths = _batch(lengths.tolist(), seed=batch * 1000 + frames)
        with torch.no_grad():
            logits = compiled(features, lengths)
            eager = model(features, lengths)
        valid_rows = model.output_lengths(lengths).tolist()
        for row, (length, valid) in enumerate(zip(lengths.tolist(), valid_rows, strict=True)):
            if length < minimum:  # no output row (the reference cannot run it)
                assert valid == 0
                continue
            assert relative_error(logits[row, :valid], eager[row, :valid]) <= TOLERANCE
            with torch.no_grad():
                expected = reference(input_features=features[row : row + 1, :length]).logits
            assert relative_error(logits[row, :valid], expected[0]) <= TOLERANCE, (batch, frames)
    graphs = counters["stats"]["unique_graphs"] - before
    assert 1 <= graphs <= MAX_GRAPHS, f"{graphs} compilations for {len(shapes)} shapes"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SPEECH5_CONFIGS if n != MANY_SHAPES_CONFIG])
def test_logits_and_decoding_match_reference_compiled(ctc_checkpoints, name):
    reference, model, directory = ctc_checkpoints[name]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch._dynamo.reset()
    compiled = compile_model(model)
    features, lengths = _batch(_lengths(model), seed=1)
    mask = (torch.arange(features.shape[1])[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        expected = reference(input_features=features, attention_mask=mask).logits
        logits = compiled(features, lengths)
    _assert_valid_rows_match(model, logits, expected, lengths)
    expected_ids, expected_texts = _reference_decoding(reference, tokenizer, features, lengths)
    assert _our_decoding(model, tokenizer, logits, lengths) == (expected_ids, expected_texts)


def test_tied_head_is_the_encoders_ctc_projection(ctc_checkpoints):
    reference, model, directory = ctc_checkpoints["ctc_tiny"]
    assert model.ctc_head is None and reference.config.tie_word_embeddings
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(key.startswith("ctc_head.") for key in weight_map)  # the reference drops it
    assert torch.equal(reference.ctc_head.weight, model.encoder.out.weight)
    _, untied, _ = ctc_checkpoints["ctc_untied_late_subsampling"]
    assert untied.ctc_head is not None
    assert not torch.equal(untied.ctc_head.weight, untied.encoder.out.weight)
