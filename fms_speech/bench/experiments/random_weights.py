"""Models with random weights at a published variant's shapes, and audio prompts for them."""

import torch
from fms.models import get_model

from fms_speech.audio import FEATURE_DIM, FRAMES_PER_SECOND
from fms_speech.models.granite_speech import build_granite_speech_params
from fms_speech.testing.reference import reference_config


def variant_model(
    variant: str = "3.3-2b",
    encoder_layers: int | None = None,
    llm_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> torch.nn.Module:
    """fms-speech's model of `variant` (random weights, seed 0), optionally with fewer layers."""
    if encoder_layers:
        overrides["encoder_config"] = {"num_layers": encoder_layers}
    if llm_layers:
        overrides["text_config"] = {"nlayers": llm_layers}
    torch.manual_seed(0)
    return get_model("granite_speech", variant, data_type=dtype, **overrides).eval()


def tiny_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The tests' default checkpoint size (`reference_config()`), with random weights."""
    params = build_granite_speech_params(reference_config())
    return variant_model(dtype=dtype, **{**params, "lora_rank": 4})


def audio_prompts(model, batch: int, seconds: float, ragged: bool = False, seed: int = 0):
    """(prompts, features, lengths): random features of `seconds` and prompts holding each
    clip's audio placeholders. `ragged`: each row 37 frames shorter than the one before, and one
    more prefix token, so that the batch is padded on both sides."""
    frames = int(seconds * FRAMES_PER_SECOND)
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, frames, FEATURE_DIM, generator=generator)
    shorter = 37 if ragged else 0
    lengths = torch.tensor([frames - shorter * row for row in range(batch)])
    counts = model.audio_token_counts(features, lengths).tolist()
    token = model.config.audio_token_index
    prefix = [[5] * (1 + row) if ragged else [5] for row in range(batch)]
    prompts = [[*prefix[row], *[token] * n, 6, 7] for row, n in enumerate(counts)]
    dtype = next(model.parameters()).dtype
    return prompts, features.to(dtype), lengths
