"""Small Granite Speech checkpoints made by the reference implementation (transformers + peft)."""

import json
import shutil
from pathlib import Path

import torch
from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

AUDIO_TOKEN = 250


def reference_config(
    encoder: dict | None = None,
    projector: dict | None = None,
    text: dict | None = None,
    window_size: int = 15,
    downsample_rate: int = 5,
) -> GraniteSpeechConfig:
    """A tiny Granite Speech config; keyword dicts override the defaults of each part."""
    encoder_config = {
        "input_dim": 160,
        "num_layers": 3,
        "hidden_dim": 32,
        "feedforward_mult": 2,
        "num_heads": 2,
        "dim_head": 24,
        "output_dim": 12,
        "context_size": 8,
        "max_pos_emb": 16,
        "conv_kernel_size": 4,
        "conv_expansion_factor": 2,
        "dropout": 0.0,
    }
    projector_config = {
        "model_type": "blip_2_qformer",
        "hidden_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 48,
        "cross_attention_frequency": 2,
        "encoder_hidden_size": 32,
        "layer_norm_eps": 1e-12,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    text_config = {
        "model_type": "granite",
        "vocab_size": 256,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.125,
        "logits_scaling": 8.0,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }
    encoder_config.update(encoder or {})
    projector_config.update(projector or {})
    text_config.update(text or {})
    return GraniteSpeechConfig(
        encoder_config=encoder_config,
        projector_config=projector_config,
        text_config=text_config,
        audio_token_index=AUDIO_TOKEN,
        window_size=window_size,
        downsample_rate=downsample_rate,
        has_lora_adapter=True,
        tie_word_embeddings=text_config["tie_word_embeddings"],
    )


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every weight and BatchNorm statistic a non-trivial random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith(("norm.weight", "LayerNorm.weight", "layernorm.weight")):
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))


def make_reference(
    config: GraniteSpeechConfig, seed: int = 0, lora_rank: int = 4, lora_alpha: int = 8
):
    """The reference model with random weights and a random PEFT LoRA on q_proj/v_proj."""
    import peft

    torch.manual_seed(seed)
    model = GraniteSpeechForConditionalGeneration(config).eval()
    randomize(model, seed)
    lora = peft.LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=["q_proj", "v_proj"])
    peft_model = peft.get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return peft_model


def save_reference(peft_model, directory: Path, max_shard_size: str = "50KB") -> Path:
    """Hub layout: sharded base weights (save_pretrained) + the PEFT adapter beside them."""
    directory = Path(directory)
    base = peft_model.get_base_model()
    # the base weights without the LoRA layers, under their plain names
    state = {
        k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k
    }
    plain = GraniteSpeechForConditionalGeneration(base.config).eval()
    plain.load_state_dict(state, strict=False)
    plain.save_pretrained(directory, max_shard_size=max_shard_size)
    adapter_dir = directory.with_name(directory.name + "_adapter")
    peft_model.save_pretrained(adapter_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter_dir / name, directory / name)
    shutil.rmtree(adapter_dir)
    return directory


def index_shards(directory: Path) -> list[str]:
    index = json.loads((Path(directory) / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def prompt_ids(num_audio: int, prefix=(5, 6, 7), suffix=(8, 9, 10, 11)) -> list[int]:
    return [*prefix, *([AUDIO_TOKEN] * num_audio), *suffix]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the tolerance measure of the tests)."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


# ---- a small tokenizer with a Granite-style chat template, matched to reference_config's ids

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content']"
    " + '<|end_of_text|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)
SPECIAL_TOKENS = {
    "<|begin_of_text|>": 0,
    "<|end_of_text|>": 1,  # eos, as in reference_config
    "<|pad|>": 2,
    "<|start_of_role|>": 3,
    "<|end_of_role|>": 4,
    "<|unk|>": 5,
    "<|audio|>": AUDIO_TOKEN,
}
PROMPT_TEXT = (
    "user assistant can you transcribe the speech into a written format ? translate to French "
    "German Spanish English hello world one two three four five six seven eight nine ten quick "
    "brown fox jumps over lazy dog and of in is it that for on with as at by this from or an be "
    "are was were not but all we when your there which their will each about how up out them "
    "then she many some so these would other its who now people my made over did down only way "
    "find use may water long little very after words called just where most know . , !"
)


def save_tokenizer(directory: Path, vocab_size: int = 256) -> Path:
    """A word-level tokenizer whose every id decodes to a token, saved in the hub's layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL_TOKENS)
    words = iter(dict.fromkeys(PROMPT_TEXT.split()))  # unique, in order
    for token_id in range(vocab_size):
        if token_id not in vocab.values():
            vocab[next(words, f"w{token_id}")] = token_id
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|start_of_role|>", "<|end_of_role|>", "<|audio|>"],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return Path(directory)
