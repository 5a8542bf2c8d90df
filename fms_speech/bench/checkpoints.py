"""The checkpoint that both implementations of a bench run load.

One checkpoint serves both: the reference (transformers' `GraniteSpeechForConditionalGeneration`
with a PEFT LoRA on q_proj/v_proj) is built with random weights and saved in the hub layout
(`fms_speech.testing.reference`), and fms-speech loads that directory with `get_model`. Both then
hold the same weights and see the same features and prompt ids.

Random weights give degenerate but deterministic text (the published Granite multipliers make
the current token's embedding dominate the logits), so every system and dtype must agree on it;
with a real checkpoint (`--model DIR`) the tokens are real ones.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from fms.models import get_model, list_variants

from fms_speech.testing.reference import (
    hf_config_from_fms,
    load_reference,
    make_reference,
    reference_config,
    save_reference,
)

PAD_TOKEN = 0
# random weights: no token ends a sequence early on the reference's side either
SPECIAL_IDS = {"bos_token_id": PAD_TOKEN, "eos_token_id": PAD_TOKEN, "pad_token_id": PAD_TOKEN}

# The embedded default: every part of the published architecture (mid-layer CTC, several
# attention blocks at 30 s, windowed Q-Former, grouped-query LLM with the audio LoRA), narrow.
# head_dim 64 like 3.3-2b; no size of a rotary table equals a batch size of the default run.
# Overrides of the tiny reference config:
EMBEDDED_ENCODER = {
    "num_layers": 4,
    "hidden_dim": 256,
    "feedforward_mult": 4,
    "num_heads": 4,
    "dim_head": 64,
    "output_dim": 42,
    "context_size": 200,
    "max_pos_emb": 512,
    "conv_kernel_size": 15,
}
EMBEDDED_PROJECTOR = {
    "hidden_size": 256,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "cross_attention_frequency": 1,
    "encoder_hidden_size": 256,
}
EMBEDDED_VOCAB = 1024
EMBEDDED_TEXT = {
    "vocab_size": EMBEDDED_VOCAB,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_attention_heads": 4,
    "max_position_embeddings": 4096,
    "rope_theta": 1e7,
    "attention_multiplier": 0.015625,
    **SPECIAL_IDS,
}
EMBEDDED_LORA = (8, 16)  # rank, alpha
PUBLISHED_LORA = (64, 32)


def embedded_config():
    """transformers' config of the embedded default model."""
    return reference_config(
        encoder=EMBEDDED_ENCODER,
        projector=EMBEDDED_PROJECTOR,
        text=EMBEDDED_TEXT,
        audio_token_index=EMBEDDED_VOCAB - 1,
    )


def variant_config(variant: str, encoder_layers: int | None = None, llm_layers: int | None = None):
    """transformers' config of a published variant's shapes (granite_speech or
    granite_speech_plus), optionally with fewer layers."""
    overrides = {}
    if encoder_layers:
        overrides["encoder_config"] = {"num_layers": encoder_layers}
    if llm_layers:
        overrides["text_config"] = {"nlayers": llm_layers}
    architecture = (
        "granite_speech_plus"
        if variant in list_variants("granite_speech_plus")
        else ("granite_speech")
    )
    with torch.device("meta"):
        model = get_model(architecture, variant, device_type="meta", **overrides)
    return hf_config_from_fms(model.config, text=SPECIAL_IDS)


def build_checkpoint(config, directory: Path, dtype: torch.dtype, lora: tuple[int, int]):
    """Reference weights (transformers' init) and a random LoRA, saved in the hub layout.

    Returns the reference model (the LoRA injected, active) in `dtype`.
    """
    rank, alpha = lora
    reference = make_reference(config, 0, rank, alpha, weight_scale=None, dtype=dtype)
    save_reference(reference, directory, max_shard_size="50GB")  # one file at these sizes
    base = reference.get_base_model() if hasattr(reference, "get_base_model") else reference
    return base.eval()


def load_fms(directory: Path, dtype: torch.dtype, device: torch.device):
    model = get_model(
        "hf_pretrained", model_path=str(directory), device_type=device.type, data_type=dtype
    )
    return model.eval()


@dataclass
class Models:
    reference: torch.nn.Module
    fms: torch.nn.Module
    checkpoint: Path
    described: str  # for the report
    tokenizer_dir: str | None  # a real checkpoint's tokenizer, else fixed prompt ids


def load_models(args: argparse.Namespace, work: Path, dtype: torch.dtype, device) -> Models:
    """Both implementations from --model DIR, or from a checkpoint built in `work`."""
    if args.model:
        directory = Path(args.model)
        has_tokenizer = (directory / "tokenizer_config.json").is_file()
        return Models(
            load_reference(directory, dtype).to(device),
            load_fms(directory, dtype, device),
            directory,
            f"checkpoint {directory}",
            str(directory) if has_tokenizer else None,
        )
    directory = work / "checkpoint"
    if args.variant:
        config = variant_config(args.variant, args.encoder_layers, args.llm_layers)
        lora = PUBLISHED_LORA
        described = f"{args.variant} shapes, random weights"
    else:
        config = embedded_config()
        lora = EMBEDDED_LORA
        described = "embedded default (small, random weights)"
    # drawn where it runs: transformers' initialisation is slow on a CPU (27 s on this project's
    # 2-core VM for the 3.3-2b shapes with 8 of the 40 LLM layers), and the GPU check's model
    # step took 111 s of its 540 s; the weights then differ by device, as the RNGs do
    with torch.device(device):
        reference = build_checkpoint(config, directory, dtype, lora)
    return Models(reference, load_fms(directory, dtype, device), directory, described, None)
