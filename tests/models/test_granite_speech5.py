"""FMS's own model test suites on GraniteSpeech5 (the CTC model), as on GraniteSpeech: config
round trip, construction from keyword arguments, a locked output signature and list of
state-dict keys (tests/resources/expectations, `--capture_expectation`), the unfused model
(nothing to unfuse: the same output) and a fullgraph compile. Correctness against the reference
is tests/test_speech5_equivalence.py."""

import copy

import pytest
import torch
from fms.testing._internal.model_test_suite import (
    ConfigFixtureMixin,
    ModelCompileTestSuite,
    ModelConfigTestSuite,
    ModelConsistencyTestSuite,
    ModelFixtureMixin,
)
from fms.testing.comparison import get_signature
from torch._dynamo.testing import CompileCounterWithBackend

from fms_speech.models.conformer import ConformerConfig
from fms_speech.models.granite_speech5 import GraniteSpeech5, GraniteSpeech5Config

# 19 rows: odd, padded to 20 for the two halvings, blocks of 4 ragged at every rate
FEATURES = torch.randn(1, 19, 320, generator=torch.Generator().manual_seed(0))


def small_config() -> GraniteSpeech5Config:
    return GraniteSpeech5Config(
        encoder_config=ConformerConfig(
            input_dim=320,
            num_layers=3,
            hidden_dim=16,
            feedforward_mult=2,
            num_heads=2,
            dim_head=8,
            output_dim=24,
            context_size=4,
            max_pos_emb=8,
            conv_kernel_size=5,
            subsample_layers=(0, 1),
            float32_batch_norm=True,
        ),
        tie_ctc_head=False,
    )


pytestmark = pytest.mark.filterwarnings(
    "ignore:Class-scoped fixtures defined as instance methods:pytest.PytestRemovedIn10Warning"
)


class GraniteSpeech5Fixtures(ConfigFixtureMixin, ModelFixtureMixin):
    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def uninitialized_model(cls, config: GraniteSpeech5Config):
        return GraniteSpeech5(config)

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def config(cls) -> GraniteSpeech5Config:
        return small_config()

    def _maybe_get_initialized_parameter(self, key, parameter):
        if not parameter.is_floating_point():  # BatchNorm's num_batches_tracked
            return parameter
        if key.endswith("running_var"):
            return torch.rand_like(parameter) + 0.5
        return None


class TestGraniteSpeech5(
    ModelConfigTestSuite,
    ModelConsistencyTestSuite,
    ModelCompileTestSuite,
    GraniteSpeech5Fixtures,
):
    _get_signature_params = ["input_features"]

    @property
    def _get_signature_input_ids(self):
        return FEATURES  # the signature's input: features, not token ids

    def test_model_unfused(self, model, signature):
        super().test_model_unfused(copy.deepcopy(model), signature)

    @pytest.mark.slow
    def test_model_compile_no_graph_breaks(self, model):
        """FMS's compile suite, without the `attn_algorithm` option it passes to FMS's own
        attention: the Conformer's block attention takes none."""
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model=model, backend=counter, fullgraph=True)
        signature = get_signature(compiled, params=["input_features"], inp=FEATURES)
        assert counter.frame_count == 1
        assert signature == pytest.approx(
            get_signature(model, params=["input_features"], inp=FEATURES), abs=1e-4
        )


def test_float32_batch_norm_survives_the_load_dtype_and_casts():
    """The BatchNorm stays float32 when FMS builds the model in bf16 and after .to(bf16)."""
    from fms.models import get_model

    model = get_model("granite_speech5", "5.0-470m", device_type="meta", data_type=torch.bfloat16)
    norm = model.encoder.layers[0].conv.batch_norm
    assert norm.weight.dtype == norm.running_var.dtype == torch.float32
    assert model.encoder.layers[0].conv.up_conv.weight.dtype == torch.bfloat16
    small = GraniteSpeech5(small_config()).to(torch.bfloat16)
    norm = small.encoder.layers[1].conv.batch_norm
    assert norm.weight.dtype == norm.running_mean.dtype == torch.float32
    with torch.no_grad():
        logits = small(FEATURES.to(torch.bfloat16))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"encoder_config": {"subsample_layers": ()}}, "at least one subsampling block"),
        ({"encoder_config": {"subsample_layers": (0, 0)}}, "must be distinct block indices"),
        ({"encoder_config": {"subsample_layers": (3,)}}, r"in \[0, 3\)"),
        ({"encoder_config": {"conv_kernel_size": 4}}, "need an odd conv_kernel_size"),
        ({"blank_token_id": 24}, "outside the vocabulary of 24"),
    ],
)
def test_inconsistent_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        GraniteSpeech5(small_config(), **overrides)
