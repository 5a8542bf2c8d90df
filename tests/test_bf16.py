"""bf16 against fp32 on the same checkpoint."""

import fms.models
import torch

from fms_speech.testing.reference import prompt_ids, relative_error


def test_bf16_logits_close_to_fp32_with_same_argmax(checkpoints):
    _, model, directory = checkpoints["deep_projector"]
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
            reference = model(ids, input_features=features)
            low = bf16(ids, input_features=features.to(torch.bfloat16))
        assert low.dtype == torch.bfloat16
        # bf16 keeps 8 bits of mantissa; errors compound over the layers
        assert relative_error(low, reference) <= 5e-2
        agree += (low.float().argmax(-1) == reference.argmax(-1)).sum().item()
        total += reference.shape[0] * reference.shape[1]
    assert agree / total >= 0.99, f"argmax agrees on {agree}/{total} positions"
