"""One graph, no breaks, and a bounded number of compilations over many shapes."""

import pytest
import torch
from torch._dynamo.utils import counters

from fms_speech.compile import compile_model
from fms_speech.testing.reference import prompt_ids, relative_error

# dynamo specialises a dimension that is 1 on the first call: a first call with one clip gives a
# batch-1 graph, the next batch size one dynamic graph that serves everything else
MAX_GRAPHS = 2


def _inputs(model, batch, frames, generator):
    features = torch.randn(batch, frames, 160, generator=generator)
    feature_lengths = torch.randint(1, frames + 1, (batch,), generator=generator)
    feature_lengths[0] = frames
    counts = model.audio_token_counts(features, feature_lengths).tolist()
    prompts = [prompt_ids(n) for n in counts]
    width = max(map(len, prompts))
    ids = torch.tensor([p + [3] * (width - len(p)) for p in prompts])
    return ids, features, feature_lengths


def test_full_forward_is_one_graph_without_breaks(checkpoints):
    _, model, _ = checkpoints["odd_layers_even_kernel"]
    ids, features, lengths = _inputs(model, 2, 37, torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(model)(
        ids, input_features=features, feature_lengths=lengths
    )
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    text = torch._dynamo.explain(model)(ids[:, :5])
    assert text.graph_break_count == 0 and text.graph_count == 1


@pytest.mark.slow
def test_compilations_over_many_shapes(checkpoints):
    _, model, _ = checkpoints["window10_context5"]
    torch._dynamo.reset()
    compiled = compile_model(model)
    generator = torch.Generator().manual_seed(0)
    shapes = [(1, 20), (2, 37), (8, 4), (3, 50), (1, 300), (4, 101), (1, 3), (6, 250), (5, 5)]
    before = counters["stats"]["unique_graphs"]
    for batch, frames in shapes:
        ids, features, lengths = _inputs(model, batch, frames, generator)
        with torch.no_grad():
            actual = compiled(ids, input_features=features, feature_lengths=lengths)
            expected = model(ids, input_features=features, feature_lengths=lengths)
        assert relative_error(actual, expected) <= 1e-4, (batch, frames)
    graphs = counters["stats"]["unique_graphs"] - before
    assert 1 <= graphs <= MAX_GRAPHS, f"{graphs} compilations for {len(shapes)} shapes"


@pytest.mark.slow
def test_decode_steps_switch_lora_without_recompiling(checkpoints):
    _, model, _ = checkpoints["window10_context5"]
    torch._dynamo.reset()
    compiled = compile_model(model)
    generator = torch.Generator().manual_seed(1)
    ids, features, lengths = _inputs(model, 2, 30, generator)
    with torch.no_grad():
        _, cache = model(ids, input_features=features, feature_lengths=lengths, use_cache=True)
        step = torch.randint(3, 200, (2, 1), generator=generator)
        position_ids = torch.full((2, 1), ids.shape[1])
        before = counters["stats"]["unique_graphs"]
        outputs = {}
        for gate in ([1.0, 1.0], [0.0, 0.0], [1.0, 0.0]):
            gate = torch.tensor(gate)
            outputs[tuple(gate.tolist())] = compiled(
                step,
                position_ids=position_ids,
                past_key_value_states=cache,
                use_cache=True,
                lora_gate=gate,
            )[0]
            expected = model(
                step,
                position_ids=position_ids,
                past_key_value_states=cache,
                use_cache=True,
                lora_gate=gate,
            )[0]
            assert relative_error(outputs[tuple(gate.tolist())], expected) <= 1e-4
        assert counters["stats"]["unique_graphs"] - before == 1
    on, off, mixed = outputs.values()
    assert (on - off).abs().max() > 1e-3
    torch.testing.assert_close(mixed[0], on[0])
    torch.testing.assert_close(mixed[1], off[1])


def test_plus_forward_is_one_graph_without_breaks(checkpoints):
    _, model, _ = checkpoints["plus_three_layers"]
    ids, features, lengths = _inputs(model, 2, 29, torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(model)(
        ids, input_features=features, feature_lengths=lengths
    )
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_ctc_forward_is_one_graph_without_breaks(ctc_checkpoints):
    _, model, _ = ctc_checkpoints["ctc_tiny"]
    features = torch.randn(3, 45, 320, generator=torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(model)(features, torch.tensor([45, 30, 7]))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
