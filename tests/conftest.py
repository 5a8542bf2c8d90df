"""Session fixtures: small checkpoints saved by the reference, loaded once per session."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import fms.models  # noqa: E402
from reference import make_reference, reference_config, save_reference  # noqa: E402

import fms_speech  # noqa: E402, F401  (registers granite_speech)

# Each differs from the published defaults in several of the ways the reference allows.
CONFIGS = {
    # odd layer count, even conv kernel, dim_head != hidden / heads, cross-attention every 2nd
    # layer, projector hidden != encoder hidden, grouped-query attention in the LLM
    "odd_layers_even_kernel": {},
    # window/downsample 10/2, context 5, single Q-Former layer, multi-head (not grouped) LLM
    "window10_context5": dict(
        encoder=dict(num_layers=2, context_size=5, conv_kernel_size=3, dim_head=16),
        projector=dict(num_hidden_layers=1, cross_attention_frequency=1),
        text=dict(num_key_value_heads=4),
        window_size=10,
        downsample_rate=2,
    ),
    # four heads of 8, kernel 5, three Q-Former layers with cross-attention in each
    "deep_projector": dict(
        encoder=dict(num_layers=4, num_heads=4, dim_head=8, conv_kernel_size=5, context_size=16),
        projector=dict(num_hidden_layers=3, cross_attention_frequency=1, num_attention_heads=4),
    ),
    # one encoder layer (no mid-layer CTC), window 12/4, untied LM head, three LLM layers
    "untied_window12": dict(
        encoder=dict(num_layers=1, context_size=12, conv_kernel_size=6),
        text=dict(num_hidden_layers=3, tie_word_embeddings=False, num_key_value_heads=1),
        window_size=12,
        downsample_rate=4,
    ),
}


def _build(name: str, directory: Path):
    overrides = dict(CONFIGS[name])
    window = overrides.pop("window_size", 15)
    downsample = overrides.pop("downsample_rate", 5)
    config = reference_config(**overrides, window_size=window, downsample_rate=downsample)
    reference = make_reference(config, seed=len(name))
    save_reference(reference, directory)
    model = fms.models.get_model("hf_pretrained", model_path=str(directory)).eval()
    return reference, model


class Checkpoints:
    """Lazily saves each named config once per session; (reference, fms model, directory)."""

    def __init__(self, root: Path):
        self.root = root
        self._cache = {}

    def __getitem__(self, name: str):
        if name not in self._cache:
            directory = self.root / name
            reference, model = _build(name, directory)
            self._cache[name] = (reference, model, directory)
        return self._cache[name]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    torch.manual_seed(0)
    return Checkpoints(tmp_path_factory.mktemp("checkpoints"))


# tied tiny models echo the last prompt token; the untied one writes text that follows the audio
TRANSCRIBE_CONFIG = "untied_window12"


@pytest.fixture(scope="session")
def speech_checkpoint(checkpoints):
    """(peft reference, checkpoint directory with a tokenizer and chat template) for the CLI."""
    from reference import save_tokenizer

    reference, _, directory = checkpoints[TRANSCRIBE_CONFIG]
    if not (directory / "tokenizer.json").exists():
        save_tokenizer(directory)
    return reference, directory
