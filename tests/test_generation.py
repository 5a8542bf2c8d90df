"""Generation against the reference's `generate()`: greedy, eos, beam search, compiled graphs.

Tokens must be identical. The reference generates each clip alone (its batches leak padding into
short clips); we generate the clips together, with prompts of different lengths.
Beam search is compared with a reference whose logits are divided by logits_scaling (transformers
5.x forgets that division; our log-probs are those of the divided logits).
"""

import copy
from collections import Counter

import pytest
import torch

from fms_speech.compile import compile_model
from fms_speech.generation import generate
from fms_speech.testing.graphs import counting_backend
from fms_speech.testing.reference import prompt_ids

# tied tiny models echo the last prompt token; the untied one writes varied text
CONFIG = "untied_window12"
EOS, PAD = 1, 2
MAX_NEW_TOKENS = 24


class Clips:
    """Random clips of different lengths, each with a prompt of a different length."""

    def __init__(self, model, frames: list[int], seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.clips = [torch.randn(n, 160, generator=generator) for n in frames]
        self.features = torch.nn.utils.rnn.pad_sequence(self.clips, batch_first=True)
        self.lengths = torch.tensor(frames)
        self.counts = model.audio_token_counts(self.features, self.lengths).tolist()
        prefixes = [(5,), (5, 6, 7), (5, 6)]
        self.prompts = [prompt_ids(n, prefix=prefixes[i % 3]) for i, n in enumerate(self.counts)]

    def __len__(self) -> int:
        return len(self.clips)

    def ours(self, model, **kwargs):
        return generate(
            model, self.prompts, self.features, self.lengths, pad_token_id=PAD, **kwargs
        )

    def reference_alone(self, reference, row: int, eos_token_id: int = EOS, **kwargs) -> list[int]:
        ids = torch.tensor([self.prompts[row]])
        with torch.no_grad():
            output = reference.generate(
                input_ids=ids,
                input_features=self.clips[row][None],
                input_features_mask=torch.ones(1, self.counts[row], dtype=torch.bool),
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                eos_token_id=eos_token_id,
                pad_token_id=PAD,
                **kwargs,
            )
        tokens = output[0, ids.shape[1] :].tolist()
        return tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens

    def references(self, reference, **kwargs) -> list[list[int]]:
        return [self.reference_alone(reference, row, **kwargs) for row in range(len(self))]


def _scaled(reference):
    """A copy of the reference whose (untied) lm_head gives logits / logits_scaling."""
    scaled = copy.deepcopy(reference)
    model = scaled.get_base_model()
    head = model.lm_head
    scaling = model.config.text_config.logits_scaling
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    model.lm_head.weight = torch.nn.Parameter(head.weight.detach() / scaling)
    return scaled


@pytest.fixture(scope="module")
def setup(checkpoints):
    reference, model, _ = checkpoints[CONFIG]
    return reference, _scaled(reference), model


def _frames(model) -> list[int]:
    """A ragged clip, one shorter than an attention block and an exact multiple."""
    block = model.config.encoder_config.context_size
    return [3 * block + 5, block - 3, 2 * block]


def test_greedy_batch_equals_reference_alone(setup):
    reference, _, model = setup
    clips = Clips(model, _frames(model))
    output = clips.ours(model, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=EOS)
    expected = clips.references(reference, max_new_tokens=MAX_NEW_TOKENS)
    assert output.sequences == expected
    assert len({tuple(s) for s in expected}) == len(expected)  # each clip has its own text
    assert output.decode_steps == MAX_NEW_TOKENS - 1


def test_text_only_prompts_run_without_the_audio_adapter(setup):
    reference, _, model = setup
    prompts = [[5, 17, 40, 9], [5, 6, 88, 120, 33, 8, 9]]
    output = generate(model, prompts, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD)
    with reference.disable_adapter(), torch.no_grad():
        for prompt, ours in zip(prompts, output.sequences, strict=True):
            ids = torch.tensor([prompt])
            expected = reference.generate(
                input_ids=ids,
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=EOS,
                pad_token_id=PAD,
            )[0, len(prompt) :].tolist()
            assert ours == expected


def test_rows_stop_at_eos_like_the_reference(setup):
    reference, _, model = setup
    clips = Clips(model, _frames(model))
    greedy = clips.references(reference, max_new_tokens=MAX_NEW_TOKENS)
    # the eos: a token one row writes first mid-way, so rows stop at different steps
    row, position = 1, MAX_NEW_TOKENS // 3
    eos = next(t for t in greedy[row][position:] if t not in greedy[row][:position])
    stop = greedy[row].index(eos)
    output = clips.ours(model, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos)
    expected = clips.references(reference, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos)
    assert output.sequences == expected
    assert output.sequences[row] == greedy[row][:stop]
    assert len({len(s) for s in output.sequences}) > 1
    # alone, that row stops decoding at its eos
    alone = generate(
        model,
        clips.prompts[row : row + 1],
        clips.features[row : row + 1, : clips.lengths[row]],
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    assert alone.sequences == [greedy[row][:stop]]
    assert alone.decode_steps == stop


def _eos_candidates(greedy: list[list[int]], count: int = 13) -> list[int]:
    """eos 1 (these weights never write it) and tokens the clips write, so beams end early."""
    return [EOS, *list(dict.fromkeys(t for tokens in greedy for t in tokens))[:count]]


@pytest.mark.parametrize("num_beams", [3, 4])
def test_beam_search_equals_reference(setup, num_beams):
    reference, scaled, model = setup
    clips = Clips(model, _frames(model), seed=2)
    greedy = clips.references(reference, max_new_tokens=MAX_NEW_TOKENS)
    scaling_changes_tokens, ended_by_eos, stopped_early = False, False, False
    for eos in _eos_candidates(greedy):
        kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, num_beams=num_beams, eos_token_id=eos)
        output = clips.ours(model, **kwargs)
        expected = clips.references(scaled, **kwargs)
        assert output.sequences == expected, f"eos {eos}"
        unscaled = clips.references(reference, **kwargs)
        scaling_changes_tokens |= unscaled != expected
        ended_by_eos |= any(len(s) < MAX_NEW_TOKENS for s in expected)
        for row in range(len(clips)):  # alone, a row's beams may stop before the length limit
            alone = generate(
                model,
                clips.prompts[row : row + 1],
                clips.features[row : row + 1, : clips.lengths[row]],
                pad_token_id=PAD,
                **kwargs,
            )
            assert alone.sequences == [expected[row]]
            stopped_early |= alone.decode_steps < MAX_NEW_TOKENS - 1
    assert scaling_changes_tokens, "dividing the logits should change some beam result"
    assert ended_by_eos and stopped_early


# (batch, frames) of issue 12: a first call with one clip, then lengths and batch sizes that
# change at different calls
SHAPES = [(1, 53), (1, 80), (1, 131), (2, 200), (4, 377), (1, 1499), (3, 16), (8, 61)]


@pytest.mark.slow
def test_compiled_generation_equals_reference_with_one_graph_per_phase(setup):
    """One graph per phase for every length and batch size from the first call, a batch of 1
    included: compile_model marks the batch unbacked (fms_speech.compile)."""
    reference, scaled, model = setup
    torch._dynamo.reset()  # every model instance shares forward's code object and its cache
    graphs = Counter()
    compiled = compile_model(model, backend=counting_backend(graphs))
    kwargs = dict(max_new_tokens=3, eos_token_id=EOS)
    for batch, frames in SHAPES:  # ragged rows, the first the longest
        clips = Clips(model, [frames - 7 * (row % 3) for row in range(batch)], seed=frames)
        assert clips.ours(compiled, **kwargs).sequences == clips.ours(model, **kwargs).sequences
        assert graphs == {"prefill": 1, "decode": 1}, (batch, frames)

    # against the reference, clip by clip; a batch of head_dim / 2 clips, a dimension of FMS's
    # rotary table (duck sizing would have given the two one symbol and pinned the batch)
    block = model.config.encoder_config.context_size
    assert model.config.text_config.emb_dim // model.config.text_config.nheads // 2 == 4
    one = Clips(model, [2 * block + 7], seed=2)
    four = Clips(model, [block + 1, 4 * block, 5, 2 * block + 3], seed=4)
    three = Clips(model, _frames(model), seed=3)
    kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, eos_token_id=EOS)
    for clips in (one, four, three):
        output = clips.ours(compiled, **kwargs)
        assert output.sequences == clips.references(reference, max_new_tokens=MAX_NEW_TOKENS)
    two = Clips(model, [block + 1, 4 * block], seed=5)
    kwargs["num_beams"] = 3
    assert two.ours(compiled, **kwargs).sequences == two.references(scaled, **kwargs)
    assert graphs == {"prefill": 1, "decode": 1}


def test_mean_logprobs_and_first_eos_probability_are_the_references(setup):
    """What verbose_json reports per segment: the scaled reference's own log-probabilities."""
    _, scaled, model = setup
    clips = Clips(model, _frames(model), seed=6)
    greedy = clips.references(scaled, max_new_tokens=MAX_NEW_TOKENS)
    eos = greedy[1][MAX_NEW_TOKENS // 3]  # row 1 stops early: its eos counts, pads do not
    output = clips.ours(model, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos)
    for row in range(len(clips)):
        ids = torch.tensor([clips.prompts[row]])
        with torch.no_grad():
            reference = scaled.generate(
                input_ids=ids,
                input_features=clips.clips[row][None],
                input_features_mask=torch.ones(1, clips.counts[row], dtype=torch.bool),
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=PAD,
                max_new_tokens=MAX_NEW_TOKENS,
                output_scores=True,
                return_dict_in_generate=True,
            )
        tokens = reference.sequences[0, ids.shape[1] :]
        logprobs = torch.stack(
            [
                torch.log_softmax(s[0].float(), -1)[t]
                for s, t in zip(reference.scores, tokens, strict=True)
            ]
        )
        assert output.mean_logprobs[row] == pytest.approx(logprobs.mean().item(), abs=1e-4)
        first = torch.softmax(reference.scores[0][0].float(), -1)[eos].item()
        assert output.first_eos_probs[row] == pytest.approx(first, abs=1e-5)
    assert len(output.sequences[1]) < MAX_NEW_TOKENS - 1  # the early stop was exercised
