"""One graph, no breaks, and a bounded number of compilations over many shapes."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from fms_speech._compat import cpu_has_bf16_matmul, fx_config
from fms_speech.compile import (
    FLOAT32_MIN_ROWS,
    Bf16ProductsInFloat32,
    bf16_mm,
    bf16_mm_op,
    compile_model,
)
from fms_speech.generation import generate
from fms_speech.testing.reference import prompt_ids, relative_error

# plain torch.compile specialises a first batch of 1 (compile_model does not: one graph,
# tests/test_generation.py counts it)
MAX_PLAIN_GRAPHS = 2
# (batch, frames) of issue 12: lengths and batch sizes change at different calls
SHAPES = [(1, 53), (1, 80), (1, 131), (2, 200), (4, 377), (1, 1499), (3, 16), (8, 61)]


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


def _symbolic_inputs(graph_module) -> dict[str, tuple]:
    """Each tensor input of a traced graph: its sizes as sympy expressions."""
    shapes = {}
    for node in graph_module.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            shapes[node.name] = tuple(
                size.node.expr if isinstance(size, torch.SymInt) else size for size in value.shape
            )
    return shapes


def test_equal_sizes_share_one_symbol(checkpoints):
    """Sizes that are always equal have one symbol in the compiled graphs (duck sizing is off):
    the positions' and the tokens' length, every cache's length, the mask's sides. With two
    symbols, inductor's CUDA code generation failed on the decode graph (docs/
    compile-efficiency.md, "The run on an H200"). Traced only, not compiled by inductor."""
    _, model, _ = checkpoints["odd_layers_even_kernel"]
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(_symbolic_inputs(graph_module))
        return graph_module.forward

    torch._dynamo.reset()
    compiled = compile_model(model, backend=record)
    ids, features, lengths = _inputs(model, 3, 90, torch.Generator().manual_seed(0))
    eager = generate(model, ids.tolist(), features, lengths, max_new_tokens=3, eos_token_id=-1)
    traced = generate(compiled, ids.tolist(), features, lengths, max_new_tokens=3, eos_token_id=-1)
    assert traced.sequences == eager.sequences
    assert len(graphs) == 2  # prefill, decode
    for shapes in graphs:
        (batch, length) = shapes["l_input_ids_"]
        assert shapes["l_position_ids_"] == (batch, length)
        caches = [shape for name, shape in shapes.items() if "past_key_value_states" in name]
        past = caches[0][2] if caches else 0
        assert all(shape[0] == batch and shape[2] == past for shape in caches)
        mask = shapes["l_attn_kwargs_mask_"]
        assert (mask[0], mask[-2], mask[-1]) == (batch, length, past + length)
        for name in ("l_input_features_", "l_feature_lengths_", "l_lora_gate_"):
            if name in shapes:  # the prefill's audio inputs, every step's gate
                assert shapes[name][0] == batch, name
    assert len(caches) == 2 * len(model.language_model.base_model.layers)


def test_unequal_sizes_fail_before_the_encoder_runs(checkpoints):
    _, model, _ = checkpoints["odd_layers_even_kernel"]
    ids, features, lengths = _inputs(model, 2, 37, torch.Generator().manual_seed(0))
    length = ids.shape[1]
    positions = torch.arange(length + 1).expand(2, -1)
    with pytest.raises(
        ValueError, match=f"position_ids' length is {length + 1}, expected {length}"
    ):
        model(ids, input_features=features[:, :0], feature_lengths=lengths, position_ids=positions)


def test_unequal_batches_fail_before_the_encoder_runs(checkpoints, monkeypatch):
    _, model, _ = checkpoints["odd_layers_even_kernel"]
    ids, features, lengths = _inputs(model, 2, 37, torch.Generator().manual_seed(0))
    # the forward's own check (with an unbacked batch the pre-hook's check comes first)
    monkeypatch.setattr(model, "unbacked_batch", False)
    with pytest.raises(ValueError, match="an input's batch is 1, expected 2"):
        model(ids, input_features=features[:1], feature_lengths=lengths[:1])


def test_batch_stays_backed_where_torch_cannot_bound_an_unbacked_one(checkpoints, monkeypatch):
    """torch 2.11 (the GPU image's): compile_model leaves the batch a backed dynamic size."""
    _, model, _ = checkpoints["odd_layers_even_kernel"]
    monkeypatch.setattr(model, "unbacked_batch", False)
    monkeypatch.setattr("fms_speech.compile.UNBACKED_BATCH_WORKS", False)
    compile_model(model, backend="eager")
    assert model.unbacked_batch is False
    monkeypatch.setattr("fms_speech.compile.UNBACKED_BATCH_WORKS", True)
    compile_model(model, backend="eager")
    assert model.unbacked_batch is True


@pytest.mark.slow
def test_plain_torch_compile_needs_at_most_two_graphs(checkpoints, monkeypatch):
    """What an FMS user writes, with torch's default shape settings: the model's forward
    pre-hook marks batch and lengths dynamic, so the first graph already has a symbolic length
    (a first batch of 1 is still specialised: one more graph at the first larger batch)."""
    _, model, _ = checkpoints["odd_layers_even_kernel"]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    before = counters["stats"]["unique_graphs"]
    defaults = {"backed_size_oblivious": False, "use_duck_shape": True}  # compile_model's undone
    monkeypatch.setattr(model, "unbacked_batch", False)  # (set by compile_model)
    with fx_config.patch(defaults), torch.no_grad():
        for batch, frames in SHAPES:
            ids, features, lengths = _inputs(model, batch, frames, generator)
            actual = compiled(ids, input_features=features, feature_lengths=lengths)
            expected = model(ids, input_features=features, feature_lengths=lengths)
            assert relative_error(actual, expected) <= 1e-4, (batch, frames)
    graphs = counters["stats"]["unique_graphs"] - before
    assert 1 <= graphs <= MAX_PLAIN_GRAPHS, f"{graphs} compilations for {len(SHAPES)} shapes"


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


# --- bf16 matrix products on a CPU without bf16 instructions (fms_speech.compile) -----------


@pytest.mark.parametrize("rows", [1, FLOAT32_MIN_ROWS - 1, FLOAT32_MIN_ROWS, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_mm_is_a_float32_product_rounded_once(rows, with_bias):
    """From FLOAT32_MIN_ROWS rows, bit-equal to the float32 product rounded to bf16 once (what a
    bf16 GEMM computes); below, ATen's own bf16 product. Either way within a bf16 rounding of
    the exact product."""
    generator = torch.Generator().manual_seed(rows)
    a = torch.randn(rows, 96, generator=generator).bfloat16()
    w = torch.randn(48, 96, generator=generator).bfloat16().t()  # a linear's transposed weight
    bias = torch.randn(48, generator=generator).bfloat16() if with_bias else None
    got = bf16_mm(a, w, bias)
    exact = a.double() @ w.double() + (0 if bias is None else bias.double())
    if rows >= FLOAT32_MIN_ROWS:
        f32 = a.float() @ w.float() + (0 if bias is None else bias.float())
        assert torch.equal(got, f32.bfloat16())
    else:
        aten = torch.mm(a, w) if bias is None else torch.addmm(bias, a, w)
        assert torch.equal(got, aten)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 48)
    # bf16 keeps 8 bits: half an ulp of the largest output, plus the float32 sum's own error
    assert (got.double() - exact).abs().max() <= exact.abs().max() * 2**-8


def test_bf16_pass_replaces_only_cpu_bf16_products():
    """The pass on a traced graph: bf16 mm and addmm become fms_speech::bf16_mm, float32 ones
    stay ATen's, and the graph's outputs do not change beyond bf16 rounding."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def products(x16, w16, b16, x32, w32):
        # the last bf16 product multiplies the output of another (a LoRA's two products)
        chained = F.linear(F.linear(x16, w16), w16.t())
        return F.linear(x16, w16, b16), x16 @ w16.t(), F.linear(x32, w32), chained

    generator = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(64, 32, generator=generator), torch.randn(16, 32, generator=generator)
    b16 = torch.randn(16, generator=generator).bfloat16()
    inputs = (x32.bfloat16(), w32.bfloat16(), b16, x32, w32)
    graph_module = make_fx(products)(*inputs)
    expected = graph_module(*inputs)
    Bf16ProductsInFloat32()(graph_module.graph)
    graph_module.graph.lint()  # every node's inputs defined before it
    graph_module.recompile()
    targets = [node.target for node in graph_module.graph.nodes if node.op == "call_function"]
    assert targets.count(bf16_mm_op) == 4
    assert targets.count(torch.ops.aten.mm.default) == 1  # the float32 one
    assert torch.ops.aten.addmm.default not in targets
    for got, want in zip(graph_module(*inputs), expected, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7)


@pytest.mark.skipif(cpu_has_bf16_matmul(), reason="this CPU multiplies bf16 natively")
def test_compile_model_routes_bf16_products_through_float32_on_this_cpu():
    """A real inductor compile of a bf16 stack: the generated code calls the op, and the output
    matches eager within bf16 rounding (2**-7 relative: one to two bf16 ulp)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    stack = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.SiLU(), torch.nn.Linear(64, 8))
    stack = stack.bfloat16().eval()
    x = torch.randn(50, 40).bfloat16()
    with torch.no_grad():
        got, code = run_and_get_code(compile_model(stack), x)
        want = stack(x)
    assert "fms_speech.bf16_mm" in "".join(code)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7)
