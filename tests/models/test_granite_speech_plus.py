"""FMS's own model test suites on GraniteSpeechPlus (as tests/models/test_granite_speech.py on
GraniteSpeech): config round trip, construction from keyword arguments, a locked output
signature and list of state-dict keys (tests/resources/expectations, written with
`--capture_expectation`), the unfused model against that signature, and a fullgraph compile.
Correctness against the reference is tests/test_plus_equivalence.py."""

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

from fms_speech.models.granite_speech_plus import (
    GraniteSpeechPlus,
    GraniteSpeechPlusConfig,
    GraniteSpeechPlusEncoderConfig,
)
from models.test_granite_speech import AUDIO_TOKEN, FEATURES
from models.test_granite_speech import small_config as granite_speech_config

HIDDEN = 16


def small_config() -> GraniteSpeechPlusConfig:
    """GraniteSpeech's small config (tests/models/test_granite_speech.py), with 3 encoder
    layers of which index 0 (input_linear) and block 1 (the mid-layer CTC) are concatenated with
    the output, an untied LM head and no LoRA."""
    base = granite_speech_config()
    encoder = {**base.encoder_config.as_dict(), "num_layers": 3, "cat_hidden_layers": (0, 1)}
    assert encoder["hidden_dim"] == HIDDEN
    return GraniteSpeechPlusConfig(
        encoder_config=GraniteSpeechPlusEncoderConfig(**encoder),
        projector_config=base.projector_config.updated(encoder_hidden_size=3 * HIDDEN),
        text_config=base.text_config.updated(tie_heads=False),
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
