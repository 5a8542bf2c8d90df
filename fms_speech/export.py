"""Saving a GraniteSpeech in the hub layout that both FMS and transformers (+ peft) load.

A directory written by `save_pretrained` holds config.json (transformers' GraniteSpeechConfig),
model.safetensors (the base weights under transformers 5.x names), adapter_config.json and
adapter_model.safetensors (the audio LoRA as PEFT saves it), the tokenizer files with their chat
template, and preprocessor_config.json (the feature extractor's settings). Loading it with
`fms.models.get_model("hf_pretrained", model_path=DIR)` or with
`GraniteSpeechForConditionalGeneration.from_pretrained(DIR)` + `peft.PeftModel` gives the same
logits (tests/test_train.py).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fms_speech.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from fms_speech.models.granite_speech import GraniteSpeech, fms_to_hf, hf_config

WEIGHTS = "model.safetensors"
ARCHITECTURE = "GraniteSpeechForConditionalGeneration"


def save_pretrained(
    model: GraniteSpeech, tokenizer, directory: str | Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Write `model` and `tokenizer` into `directory` (created if needed); weights in `dtype`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    base, adapter = fms_to_hf(model.state_dict(), config)
    hf = hf_config(config)
    hf.architectures = [ARCHITECTURE]
    text = hf.text_config
    text.bos_token_id = tokenizer.bos_token_id
    text.eos_token_id = tokenizer.eos_token_id
    text.pad_token_id = tokenizer.pad_token_id
    hf.save_pretrained(directory)
    _write_safetensors(directory / WEIGHTS, base, dtype)
    if adapter:
        _write_safetensors(directory / ADAPTER_WEIGHTS, adapter, dtype)
        (directory / ADAPTER_CONFIG).write_text(
            json.dumps(_adapter_config(config), indent=2, sort_keys=True) + "\n"
        )
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(
        json.dumps(_preprocessor_config(config), indent=2, sort_keys=True) + "\n"
    )
    return directory


def _write_safetensors(path: Path, tensors: dict, dtype: torch.dtype) -> None:
    temporary = path.with_suffix(".tmp")
    cast = {
        name: (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous().cpu()
        for name, tensor in tensors.items()
    }
    save_file(cast, str(temporary), metadata={"format": "pt"})
    temporary.chmod(0o644)  # safetensors creates it private; a checkpoint is to be shared
    temporary.replace(path)


def _adapter_config(config) -> dict:
    """PEFT's LoraConfig for the audio adapter on the LLM's q_proj and v_proj."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def _preprocessor_config(config) -> dict:
    """transformers' GraniteSpeechFeatureExtractor settings (what fms_speech.audio computes)."""
    from fms_speech.audio import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, WIN_LENGTH

    projector = config.projector_config
    return {
        "feature_extractor_type": "GraniteSpeechFeatureExtractor",
        "processor_class": "GraniteSpeechProcessor",
        "sampling_rate": SAMPLE_RATE,
        "n_fft": N_FFT,
        "win_length": WIN_LENGTH,
        "hop_length": HOP_LENGTH,
        "n_mels": N_MELS,
        "projector_window_size": projector.window_size,
        "projector_downsample_rate": projector.downsample_rate,
    }
