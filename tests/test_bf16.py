"""bf16 against fp32 on the same checkpoint, measured against what bf16 does to the reference."""

import copy

import fms.models
import torch

from fms_speech.testing.reference import prompt_ids, relative_error

# bf16 keeps 8 bits of mantissa and errors compound over the layers, so the bound is not a fixed
# number: ours in bf16 may be at most 1.5x as far from fp32 as the reference in bf16 is, on the
# same inputs (on these random weights the reference's own bf16 error is 1.3e-2 to 1.6e-2).
BF16_VS_REFERENCE_BF16 = 1.5


def test_bf16_logits_close_to_fp32_with_same_argmax(checkpoints):
    reference, model, directory = checkpoints["deep_projector"]
    reference_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    scaling = reference.config.text_config.logits_scaling
    bf16 = fms.models.get_model(
        "hf_pretrained", model_path=str(directory), data_type=torch.bfloat16
    ).eval()
    generator = torch.Generator().manual_seed(0)
    agree, total = 0, 0
    for frames in (20, 64, 90):
        features = torch.randn(2, frames, 160, generator=generator)
        count = int(model.audio_token_counts(features[:1]).item())
        body = torch.randint(3, 200, (2, 40), generator=generator)
        ids = torch.cat([torch.tensor([prompt_ids(count)]).repeat(2, 1), body], dim=1)
        with torch.no_grad():
            expected = model(ids, input_features=features)
            low = bf16(ids, input_features=features.to(torch.bfloat16))
            theirs = reference_bf16(input_ids=ids, input_features=features.to(torch.bfloat16))
        assert low.dtype == torch.bfloat16
        error, their_error = (
            relative_error(low, expected),
            relative_error(theirs.logits / scaling, expected),
        )
        assert error <= BF16_VS_REFERENCE_BF16 * their_error, (
            f"frames {frames}: ours bf16 {error:.4f}, reference bf16 {their_error:.4f}"
        )
        agree += (low.float().argmax(-1) == expected.argmax(-1)).sum().item()
        total += expected.shape[0] * expected.shape[1]
    assert agree / total >= 0.99, f"argmax agrees on {agree}/{total} positions"
