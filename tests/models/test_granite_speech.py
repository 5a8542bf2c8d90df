"""FMS's own model test suites on GraniteSpeech, and the audio LoRA through FMS's transformations.

`TestGraniteSpeech` runs FMS's suites (`fms.testing._internal.model_test_suite`) the way FMS's
`tests/models/test_granite.py` runs them on Granite: config round trip, construction from
keyword arguments, a locked output signature and list of state-dict keys (expectation files in
tests/resources/expectations, written with `--capture_expectation`), the unfused model against
that signature, and a fullgraph compile. The primary correctness tests stay the comparisons with
the reference in tests/test_model_equivalence.py; these guard against drift and check that FMS's
utilities work on the model.

The other tests check, on a checkpoint saved by the reference, that unfusing keeps the audio LoRA
and its per-row gate, and that every FMS transformation that would drop the LoRA refuses.
"""

import copy
import shutil

import pytest
import torch
import torch.distributed as dist
from fms.distributed.strategy import TensorParallelStrategy, UniformModelParallelStrategy
from fms.models import get_model
from fms.models.granite import Granite, GraniteConfig
from fms.testing._internal.model_test_suite import (
    ConfigFixtureMixin,
    ModelCompileTestSuite,
    ModelConfigTestSuite,
    ModelConsistencyTestSuite,
    ModelFixtureMixin,
)
from fms.utils.fusion import apply_unfuse_weights
from fms.utils.tp_wrapping import apply_tp
from safetensors.torch import load_file, save_file

from fms_speech.models.conformer import ConformerConfig
from fms_speech.models.granite_speech import GraniteSpeech, GraniteSpeechConfig
from fms_speech.models.lora import (
    LoRAFusedQKV,
    LoRATPMultiHeadAttention,
    LoRAUnfusedQKV,
    add_lora,
)
from fms_speech.models.qformer import QFormerConfig

# FMS's signature input is torch.arange(16): with audio token 5 and one Q-Former window of one
# query, that prompt holds exactly the one placeholder a clip of up to 8 frames needs. 7 frames
# in blocks of 4: the encoder's ragged last block and the projector's padded window both run.
AUDIO_TOKEN = 5
FRAMES = 7
FEATURES = torch.randn(1, FRAMES, 160, generator=torch.Generator().manual_seed(0))


def small_config() -> GraniteSpeechConfig:
    return GraniteSpeechConfig(
        encoder_config=ConformerConfig(
            num_layers=2,
            hidden_dim=16,
            feedforward_mult=2,
            num_heads=2,
            dim_head=8,
            output_dim=8,
            context_size=4,
            max_pos_emb=8,
            conv_kernel_size=3,
        ),
        projector_config=QFormerConfig(
            hidden_size=16,
            num_layers=2,
            num_heads=2,
            intermediate_size=32,
            cross_attention_frequency=2,
            encoder_hidden_size=16,
            window_size=8,
            downsample_rate=8,
            output_size=16,
        ),
        text_config=GraniteConfig(
            src_vocab_size=64,
            emb_dim=16,
            norm_eps=1e-5,
            nheads=4,
            head_dim=4,
            kvheads=2,
            nlayers=2,
            hidden_grow_factor=2.0,
            multiple_of=2,
            max_expected_seq_len=64,
            p_dropout=0.0,
            tie_heads=True,
            embedding_multiplier=12.0,
            logits_scaling=8.0,
            residual_multiplier=0.22,
            attention_multiplier=0.25,
        ),
        audio_token_index=AUDIO_TOKEN,
        lora_rank=4,
    )


# pytest 9 deprecates class-scoped fixtures written as instance methods, as FMS's suites write
# theirs (model, model_id, signature); ours are class methods
pytestmark = pytest.mark.filterwarnings(
    "ignore:Class-scoped fixtures defined as instance methods:pytest.PytestRemovedIn10Warning"
)


class GraniteSpeechFixtures(ConfigFixtureMixin, ModelFixtureMixin):
    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def uninitialized_model(cls, config: GraniteSpeechConfig):
        return GraniteSpeech(config)

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def config(cls) -> GraniteSpeechConfig:
        return small_config()

    def _maybe_get_initialized_parameter(self, key, parameter):
        if not parameter.is_floating_point():  # BatchNorm's num_batches_tracked
            return parameter
        if key.endswith("running_var"):  # FMS's default init is negative half the time
            return torch.rand_like(parameter) + 0.5
        if ".lora_" in key:
            # at FMS's default scale (about 0.05) the LoRA moves the signature by ~1e-6, inside
            # assert_close's tolerance: a dropped LoRA would pass the unfused test unseen
            return 0.5 * torch.randn_like(parameter)
        return None


class TestGraniteSpeech(
    ModelConfigTestSuite,
    ModelConsistencyTestSuite,
    ModelCompileTestSuite,
    GraniteSpeechFixtures,
):
    _get_signature_params = ["input_ids"]

    @property
    def _get_signature_optional_params(self):
        return {"input_features": FEATURES}  # a new dict: the compile suite adds to it

    def test_config_passed_to_model_and_updated(self, model, config):
        """keyword arguments override the config, without changing the caller's config"""
        model = type(model)(config=config, audio_token_index=config.audio_token_index + 1)
        assert model.get_config() is not config
        config.audio_token_index += 1
        assert model.get_config().as_dict() == config.as_dict()
        config.audio_token_index -= 1

    def test_model_unfused(self, model, signature):
        # FMS's test unfuses the class's model in place; a copy keeps the later tests on the
        # fused model that fms-speech runs
        super().test_model_unfused(copy.deepcopy(model), signature)

    @pytest.mark.slow
    def test_model_compile_no_graph_breaks(self, model):
        super().test_model_compile_no_graph_breaks(model)


# ---- the audio LoRA through FMS's module transformations, on a reference-saved checkpoint

# the unfused projections multiply by row blocks of the same fused weight: fp32 rounding at most
UNFUSED_TOLERANCE = 1e-6


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _audio_batch(model, rows: int):
    """`rows` copies of one audio prompt: 3 text tokens, the placeholders, 4 text tokens."""
    features = torch.randn(1, 40, 160, generator=torch.Generator().manual_seed(1))
    count = int(model.audio_token_counts(features).item())
    ids = [7, 8, 9, *[model.config.audio_token_index] * count, 10, 11, 12, 13]
    return torch.tensor([ids] * rows), features.repeat(rows, 1, 1)


def test_unfused_model_keeps_the_lora_and_its_gate(checkpoints):
    _, fused, _ = checkpoints["odd_layers_even_kernel"]
    assert all(type(m.attn.in_proj) is LoRAFusedQKV for m in fused.language_model.base_model.layers)
    unfused = apply_unfuse_weights(copy.deepcopy(fused))
    projections = [m.attn.in_proj for m in unfused.language_model.base_model.layers]
    assert all(type(p) is LoRAUnfusedQKV for p in projections)
    assert all(p.gate is unfused._adapter_gate for p in projections)

    ids, features = _audio_batch(fused, rows=2)
    gates = {"on": [1.0, 1.0], "off": [0.0, 0.0], "mixed": [1.0, 0.0]}
    with torch.no_grad():
        expected = {k: fused(ids, features, lora_gate=torch.tensor(g)) for k, g in gates.items()}
        actual = {k: unfused(ids, features, lora_gate=torch.tensor(g)) for k, g in gates.items()}
    # the comparison can fail: the LoRA changes the logits by far more than the tolerance
    assert _relative_error(expected["off"], expected["on"]) > 1e-3
    for name in gates:
        assert _relative_error(actual[name], expected[name]) <= UNFUSED_TOLERANCE, name
    # per row: the gated row gives the LoRA-on logits, the other the LoRA-off ones
    assert _relative_error(actual["mixed"][0], expected["on"][0]) <= UNFUSED_TOLERANCE
    assert _relative_error(actual["mixed"][1], expected["off"][1]) <= UNFUSED_TOLERANCE
    # and the default gate (on with audio, off without) reaches the unfused projections too
    with torch.no_grad():
        assert _relative_error(unfused(ids, features), expected["on"]) <= UNFUSED_TOLERANCE
        assert _relative_error(unfused(ids[:, :3]), fused(ids[:, :3])) <= UNFUSED_TOLERANCE


def test_unfused_state_dict_keeps_the_lora_keys(checkpoints):
    _, fused, _ = checkpoints["odd_layers_even_kernel"]
    unfused = apply_unfuse_weights(copy.deepcopy(fused))
    lora_keys = {k for k in fused.state_dict() if ".lora_" in k}
    assert lora_keys and lora_keys <= set(unfused.state_dict())
    for key in lora_keys:
        assert torch.equal(unfused.state_dict()[key], fused.state_dict()[key]), key


# ---- FMS transformations that would drop the LoRA refuse, with a reason


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-process gloo group: FMS's tensor-parallel modules need an initialised one."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    store = tmp_path_factory.mktemp("process_group") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _meta_model(**overrides) -> GraniteSpeech:
    with torch.device("meta"):
        return GraniteSpeech(small_config(), **overrides)


def test_model_parallel_strategy_is_refused(process_group):
    with pytest.raises(NotImplementedError, match="does not support UniformModelParallelStrategy"):
        _meta_model(distributed_strategy=UniformModelParallelStrategy([0], 2))


def test_apply_tp_refuses_an_attention_with_the_lora(process_group):
    model = _meta_model()
    with pytest.raises(NotImplementedError, match="already carries the audio LoRA cannot be made"):
        apply_tp(model.language_model, process_group)


def test_add_lora_after_the_tensor_parallel_swap(process_group):
    with torch.device("meta"):
        llm = Granite(small_config().text_config, distributed_strategy=TensorParallelStrategy())
        add_lora(llm, rank=4)
    attentions = [layer.attn for layer in llm.base_model.layers]
    assert all(type(a) is LoRATPMultiHeadAttention for a in attentions)
    assert all(type(a.in_proj) is LoRAFusedQKV for a in attentions)
    with pytest.raises(ValueError, match="already carries an audio LoRA"):
        add_lora(llm, rank=4)


def _without_adapter_key(directory, target, dropped: str):
    """A copy of the checkpoint whose PEFT adapter lacks the key `dropped`."""
    shutil.copytree(directory, target)
    adapter = load_file(target / "adapter_model.safetensors")
    del adapter[dropped]
    save_file(adapter, target / "adapter_model.safetensors")
    return target


@pytest.mark.parametrize("strategy", [None, "tp"], ids=["one_device", "tensor_parallel"])
def test_a_lora_weight_missing_from_the_adapter_is_named(
    process_group, checkpoints, tmp_path, strategy
):
    """Under tensor parallelism FMS gives the LoRA torch.empty memory, not meta, before its
    load_weights runs: the load record, not a meta check, must catch it (world size 1)."""
    _, _, directory = checkpoints["odd_layers_even_kernel"]
    dropped = "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight"
    target = _without_adapter_key(directory, tmp_path / "partial", dropped)
    with pytest.raises(
        ValueError, match=r"language_model\.base_model\.layers\.1\.attn\.in_proj\.lora_q_a"
    ):
        get_model("hf_pretrained", model_path=str(target), distributed_strategy=strategy)


@pytest.mark.parametrize(
    "linear_type", ["gptq_cpu", lambda module_name: None], ids=["gptq", "by_name"]
)
def test_add_lora_refuses_other_linear_types(linear_type):
    # GPTQ packs 32 weights per int32: the widths must be multiples of 32
    text_config = GraniteConfig(src_vocab_size=64, emb_dim=64, nheads=4, kvheads=2, nlayers=1)
    with torch.device("meta"):
        llm = Granite(text_config, linear_config={"linear_type": linear_type})
    with pytest.raises(NotImplementedError, match="plain torch linear QKV projections"):
        add_lora(llm, rank=4)


@pytest.mark.parametrize(
    "overrides", [{"fused_weights": False}, {"text_config": {"fused_weights": False}}]
)
def test_unfused_construction_is_refused(overrides):
    with pytest.raises(ValueError, match="fused_weights=True"):
        _meta_model(**overrides)
