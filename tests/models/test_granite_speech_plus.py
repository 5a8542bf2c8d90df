"""FMS's own model test suites on GraniteSpeechPlus (as tests/models/test_granite_speech.py on
GraniteSpeech): config round trip, construction from keyword arguments, a locked output
signature and list of state-dict keys (tests/resources/expectations, written with
`--capture_expectation`), the unfused model against that signature, and a fullgraph compile.
Correctness against the reference is tests/test_plus_equivalence.py."""

import copy

import pytest
import torch
from fms.models.granite import GraniteConfig
from fms.testing._internal.model_test_suite import (
    ConfigFixtureMixin,
    ModelCompileTestSuite,
    ModelConfigTestSuite,
    ModelConsistencyTestSuite,
    ModelFixtureMixin,
)

from fms_speech.models.granite_speech_plus import (
    GraniteSpeechPlus,
    GraniteSpeechPlusConfig,
    GraniteSpeechPlusEncoderConfig,
)
from fms_speech.models.qformer import QFormerConfig

# as for GraniteSpeech: with audio token 5 and one Q-Former window of one query, FMS's signature
# input torch.arange(16) holds the one placeholder a clip of up to 8 frames needs
AUDIO_TOKEN = 5
FEATURES = torch.randn(1, 7, 160, generator=torch.Generator().manual_seed(0))
HIDDEN = 16


def small_config() -> GraniteSpeechPlusConfig:
    # 3 layers: index 0 (input_linear) and block 1 (the mid-layer CTC) concatenated with the output
    return GraniteSpeechPlusConfig(
        encoder_config=GraniteSpeechPlusEncoderConfig(
            num_layers=3,
            hidden_dim=HIDDEN,
            feedforward_mult=2,
            num_heads=2,
            dim_head=8,
            output_dim=8,
            context_size=4,
            max_pos_emb=8,
            conv_kernel_size=3,
            cat_hidden_layers=(0, 1),
        ),
        projector_config=QFormerConfig(
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            intermediate_size=32,
            cross_attention_frequency=1,
            encoder_hidden_size=3 * HIDDEN,
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
            tie_heads=False,
            embedding_multiplier=12.0,
            logits_scaling=8.0,
            residual_multiplier=0.22,
            attention_multiplier=0.25,
        ),
        audio_token_index=AUDIO_TOKEN,
        lora_rank=0,
    )


pytestmark = pytest.mark.filterwarnings(
    "ignore:Class-scoped fixtures defined as instance methods:pytest.PytestRemovedIn10Warning"
)


class GraniteSpeechPlusFixtures(ConfigFixtureMixin, ModelFixtureMixin):
    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def uninitialized_model(cls, config: GraniteSpeechPlusConfig):
        return GraniteSpeechPlus(config)

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def config(cls) -> GraniteSpeechPlusConfig:
        return small_config()

    def _maybe_get_initialized_parameter(self, key, parameter):
        if not parameter.is_floating_point():  # BatchNorm's num_batches_tracked
            return parameter
        if key.endswith("running_var"):  # FMS's default init is negative half the time
            return torch.rand_like(parameter) + 0.5
        return None


class TestGraniteSpeechPlus(
    ModelConfigTestSuite,
    ModelConsistencyTestSuite,
    ModelCompileTestSuite,
    GraniteSpeechPlusFixtures,
):
    _get_signature_params = ["input_ids"]

    @property
    def _get_signature_optional_params(self):
        return {"input_features": FEATURES}  # a new dict: the compile suite adds to it

    def test_model_unfused(self, model, signature):
        super().test_model_unfused(copy.deepcopy(model), signature)

    @pytest.mark.slow
    def test_model_compile_no_graph_breaks(self, model):
        super().test_model_compile_no_graph_breaks(model)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"encoder_config": {"cat_hidden_layers": (1, 1)}}, "repeats a layer"),
        ({"encoder_config": {"cat_hidden_layers": (0, 3)}}, r"index 3 is out of range \[0, 3\)"),
        ({"projector_config": {"encoder_hidden_size": 2 * HIDDEN}}, "reads 32 features per frame"),
    ],
)
def test_inconsistent_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        GraniteSpeechPlus(small_config(), **overrides)
