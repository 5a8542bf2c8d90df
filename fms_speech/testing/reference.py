"""Granite Speech checkpoints made by the reference implementation (transformers + peft).

- `reference_config`: a tiny transformers config with every part of the architecture; keyword
  dicts override each part, so one builder serves the tests' named configurations (`CONFIGS`,
  and `PLUS_CONFIGS` for granite_speech_plus: `cat_hidden_layers` makes it one), the bench's
  embedded model and a published variant's shapes (`hf_config_from_fms`);
- `make_reference`: the reference model with random weights and a random PEFT LoRA on
  q_proj/v_proj; `save_reference` writes it in the hub layout (base weights by
  `save_pretrained`, the adapter beside them); `load_reference` reads such a directory back;
- `save_tokenizer`: a word-level tokenizer with a Granite-style chat template, matched to the
  ids of `reference_config`;
- `prompt_ids`, `relative_error`, `index_shards`: the tests' inputs and measures;
- granite_speech5 (CTC): `speech5_config` / `SPEECH5_CONFIGS`, `make_speech5_reference`,
  `save_speech5_reference` (sharded `save_pretrained`), `save_ctc_tokenizer` (a small
  tokenizer of the reference's class, `ParakeetTokenizer`, with SentencePiece-style pieces).

`peft` and `tokenizers` (test/bench dependencies) are imported by the functions that use them.
"""

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    GraniteSpeech5CTCConfig,
    GraniteSpeech5ForCTC,
    GraniteSpeechConfig,
    GraniteSpeechForConditionalGeneration,
    GraniteSpeechPlusConfig,
    GraniteSpeechPlusForConditionalGeneration,
)
from transformers.models.granite_speech.modeling_granite_speech import GraniteSpeechCTCEncoder

from fms_speech.models import GraniteSpeech5Config as FmsGraniteSpeech5Config
from fms_speech.models import GraniteSpeechConfig as FmsGraniteSpeechConfig
from fms_speech.models import GraniteSpeechPlusConfig as FmsGraniteSpeechPlusConfig
from fms_speech.models import granite_speech, granite_speech5, granite_speech_plus
from fms_speech.models.conformer import ConformerEncoder
from fms_speech.prompts import CHAT_TEMPLATE

AUDIO_TOKEN = 250

# the tiny defaults: odd encoder depth, even conv kernel, dim_head != hidden / heads,
# cross-attention every 2nd Q-Former layer, grouped-query attention in the LLM
TINY_ENCODER = {
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
TINY_PROJECTOR = {
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
TINY_TEXT = {
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

# The tests' configurations; each differs from the published defaults in several of the ways
# the reference allows. Keys: reference_config's arguments.
CONFIGS = {
    # the tiny defaults
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
# tied tiny models echo the last prompt token; the untied one writes text that follows the audio
TRANSCRIBE_CONFIG = "untied_window12"

# granite_speech_plus: the concatenated layers cover the mid-layer CTC block (num_layers // 2,
# whose exported copy carries the CTC update), index 0 (input_linear) and several layers
PLUS_CONFIGS = {
    # 3 layers: the mid-layer CTC block is 1; index 0 with it
    "plus_input_and_mid": dict(cat_hidden_layers=[0, 1]),
    # 4 layers, blocks 1, 2 (mid) and 3, listed out of order, no LoRA adapter
    "plus_three_layers": dict(
        cat_hidden_layers=[3, 1, 2],
        encoder=dict(num_layers=4, conv_kernel_size=5, context_size=6),
        has_lora_adapter=False,
    ),
    # the published shape in small: one layer (3) of 5, window 10/2, untied LM head
    "plus_one_layer": dict(
        cat_hidden_layers=[3],
        encoder=dict(num_layers=5, context_size=5, conv_kernel_size=3, dim_head=16),
        text=dict(tie_word_embeddings=False, num_key_value_heads=4),
        window_size=10,
        downsample_rate=2,
    ),
}


def reference_config(
    encoder: dict | None = None,
    projector: dict | None = None,
    text: dict | None = None,
    window_size: int = 15,
    downsample_rate: int = 5,
    audio_token_index: int = AUDIO_TOKEN,
    has_lora_adapter: bool = True,
    cat_hidden_layers: list[int] | None = None,
) -> GraniteSpeechConfig:
    """A tiny Granite Speech config; keyword dicts override the defaults of each part.

    With `cat_hidden_layers` it is a granite_speech_plus config (the projector's input width
    follows from it)."""
    text_config = {**TINY_TEXT, **(text or {})}
    encoder_config = {**TINY_ENCODER, **(encoder or {})}
    projector_config = {**TINY_PROJECTOR, **(projector or {})}
    config_class = GraniteSpeechConfig
    if cat_hidden_layers is not None:
        config_class = GraniteSpeechPlusConfig
        encoder_config["cat_hidden_layers"] = list(cat_hidden_layers)
        width = encoder_config["hidden_dim"] * (len(cat_hidden_layers) + 1)
        projector_config["encoder_hidden_size"] = width
    return config_class(
        encoder_config=encoder_config,
        projector_config=projector_config,
        text_config=text_config,
        audio_token_index=audio_token_index,
        window_size=window_size,
        downsample_rate=downsample_rate,
        has_lora_adapter=has_lora_adapter,
        tie_word_embeddings=text_config["tie_word_embeddings"],
    )


def reference_class(config) -> type:
    """transformers' model class for a config of the family."""
    if isinstance(config, GraniteSpeech5CTCConfig):
        return GraniteSpeech5ForCTC
    if isinstance(config, GraniteSpeechPlusConfig):
        return GraniteSpeechPlusForConditionalGeneration
    return GraniteSpeechForConditionalGeneration


def hf_config_from_fms(config, text: dict | None = None):
    """transformers' config for an fms-speech config (the model's own `hf_config`).

    For the two LLM types, the tiny defaults' special token ids, then `text`, are set on its LLM
    config (the fms-speech config does not hold them).
    """
    if isinstance(config, FmsGraniteSpeech5Config):
        return granite_speech5.hf_config(config)
    if isinstance(config, FmsGraniteSpeechPlusConfig):
        hf = granite_speech_plus.hf_config(config)
    elif isinstance(config, FmsGraniteSpeechConfig):
        hf = granite_speech.hf_config(config)
    else:
        raise TypeError(f"not a config of the Granite Speech family: {type(config).__name__}")
    special_ids = {k: v for k, v in TINY_TEXT.items() if k.endswith("_token_id")}
    for key, value in {**special_ids, **(text or {})}.items():
        setattr(hf.text_config, key, value)
    return hf


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Give every weight and BatchNorm statistic a non-trivial random value."""
    generator = torch.Generator().manual_seed(seed)
    # drawn on the generator's CPU whatever the default device (the bench builds its checkpoint
    # under `torch.device("cuda")`, where a CPU generator would be refused), then copied over
    cpu = generator.device
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator, device=cpu) + 0.5)
            elif _NORM_WEIGHT.search(name):
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=generator, device=cpu))
            else:
                tensor.copy_(scale * torch.randn(tensor.shape, generator=generator, device=cpu))


# LayerNorm/BatchNorm scales: near 1 (norm.weight, LayerNorm.weight, norm_out.weight, ...)
_NORM_WEIGHT = re.compile(r"(norm|LayerNorm)[^.]*\.weight$")


def make_reference(
    config: GraniteSpeechConfig,
    seed: int = 0,
    lora_rank: int = 4,
    lora_alpha: int = 8,
    weight_scale: float | None = 0.3,
    dtype: torch.dtype = torch.float32,
):
    """The reference model (a peft model) with random weights and a random LoRA on q_proj/v_proj;
    with lora_rank=0 (or a config without an adapter) the plain transformers model.

    `weight_scale`: every weight and LoRA matrix drawn at this scale (`randomize`), so that a
    wrong mapping of any tensor shows in the outputs; None keeps transformers' initialisation
    (magnitudes that stay finite at the published widths) and draws only LoRA B, which peft
    starts at zero, at 0.02.
    """
    import peft

    torch.manual_seed(seed)
    model = reference_class(config)._from_config(config, dtype=dtype).eval()
    if weight_scale is not None:
        randomize(model, seed, weight_scale)
    if lora_rank == 0 or not config.has_lora_adapter:
        return model
    lora = peft.LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=["q_proj", "v_proj"])
    peft_model = peft.get_peft_model(model, lora)
    drawn, scale = ("lora_B", 0.02) if weight_scale is None else ("lora_", weight_scale)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if drawn in name:
                noise = torch.randn(
                    param.shape, generator=generator, dtype=torch.float32, device=generator.device
                )
                param.copy_(scale * noise)  # (on the CPU: see randomize)
    return peft_model


def save_reference(peft_model, directory: Path, max_shard_size: str = "50KB") -> Path:
    """Hub layout: base weights by save_pretrained + the PEFT adapter beside them (if any).

    The default shard size is tiny, so that loading goes through the shard index.
    """
    directory = Path(directory)
    if not hasattr(peft_model, "get_base_model"):  # no adapter
        peft_model.save_pretrained(directory, max_shard_size=max_shard_size)
        return directory
    base = peft_model.get_base_model()
    # the base weights without the LoRA layers, under their plain names
    state = {
        k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k
    }
    with torch.device("meta"):  # the plain architecture (no memory): the index counts its size
        plain = reference_class(base.config)._from_config(base.config, dtype=base.dtype)
    plain.save_pretrained(directory, state_dict=state, max_shard_size=max_shard_size)
    with tempfile.TemporaryDirectory() as adapter_dir:
        peft_model.save_pretrained(adapter_dir)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(Path(adapter_dir) / name, directory / name)
    return directory


def save_named(name: str, directory: Path):
    """One of the tests' `CONFIGS` or `PLUS_CONFIGS`, made and saved; returns the reference
    (a peft model; its adapter is saved only when the config has one)."""
    overrides = dict({**CONFIGS, **PLUS_CONFIGS}[name])
    config = reference_config(**overrides)
    reference = make_reference(config, seed=len(name))
    save_reference(reference, directory)
    return reference


def load_reference(directory: Path, dtype: torch.dtype = torch.float32):
    """The reference from a hub-style directory, with its PEFT adapter (injected) if it has one."""
    config = json.loads((Path(directory) / "config.json").read_text())
    if config.get("model_type") == granite_speech5.HF_MODEL_TYPE:
        return GraniteSpeech5ForCTC.from_pretrained(str(directory), dtype=dtype).eval()
    model_class = (
        GraniteSpeechPlusForConditionalGeneration
        if config.get("model_type") == "granite_speech_plus"
        else GraniteSpeechForConditionalGeneration
    )
    model = model_class.from_pretrained(str(directory), dtype=dtype)
    if (Path(directory) / "adapter_config.json").is_file():
        import peft

        model = peft.PeftModel.from_pretrained(model, str(directory)).get_base_model()
    return model.eval()


def index_shards(directory: Path) -> list[str]:
    index = json.loads((Path(directory) / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def prompt_ids(num_audio: int, prefix=(5, 6, 7), suffix=(8, 9, 10, 11)) -> list[int]:
    return [*prefix, *([AUDIO_TOKEN] * num_audio), *suffix]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the tolerance measure of the tests)."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


# ---- a small tokenizer with a Granite-style chat template, matched to reference_config's ids

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


# ---- granite_speech5: the CTC model, its configurations and a small CTC tokenizer

BLANK = 0  # pad = blank, as published
SPEECH5_VOCAB = 96
# the tiny defaults: 3 blocks (the first two subsample, block 1 carries the mid-layer CTC),
# context 8, kernel 5, head_dim != hidden / heads
SPEECH5_TINY_ENCODER = {
    "vocab_size": SPEECH5_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "head_dim": 24,
    "num_mel_bins": 80,
    "max_position_embeddings": 16,
    "context_size": 8,
    "conv_kernel_size": 5,
    "conv_expansion_factor": 2,
    "subsample_layers": [0, 1],
}
# Keys: speech5_config's arguments. Lengths are chosen by the tests (odd ones, shorter than a
# block); these differ in what the reference allows of the architecture.
SPEECH5_CONFIGS = {
    "ctc_tiny": {},
    # three subsampling blocks (time / 8) of five, context 5, kernel 3, four heads of 8
    "ctc_three_subsamplings": dict(
        encoder=dict(
            num_hidden_layers=5,
            subsample_layers=[0, 1, 3],
            context_size=5,
            conv_kernel_size=3,
            num_attention_heads=4,
            head_dim=8,
        ),
    ),
    # one subsampling block, not the first; untied CTC head; no feed-forward biases; context 7
    "ctc_untied_late_subsampling": dict(
        encoder=dict(
            num_hidden_layers=4,
            subsample_layers=[2],
            context_size=7,
            conv_kernel_size=7,
            attention_bias=False,
        ),
        tie_word_embeddings=False,
    ),
}


def speech5_config(
    encoder: dict | None = None, tie_word_embeddings: bool = True
) -> GraniteSpeech5CTCConfig:
    """A tiny granite_speech5 config; `encoder` overrides the encoder's defaults."""
    encoder_config = {**SPEECH5_TINY_ENCODER, **(encoder or {})}
    return GraniteSpeech5CTCConfig(
        vocab_size=encoder_config["vocab_size"],
        pad_token_id=BLANK,
        tie_word_embeddings=tie_word_embeddings,
        encoder_config=encoder_config,
    )


def make_speech5_reference(
    config: GraniteSpeech5CTCConfig,
    seed: int = 0,
    weight_scale: float | None = 0.3,
    dtype: torch.dtype = torch.float32,
) -> GraniteSpeech5ForCTC:
    """The reference CTC model with random weights (see `make_reference`'s `weight_scale`)."""
    torch.manual_seed(seed)
    model = GraniteSpeech5ForCTC._from_config(config, dtype=dtype).eval()
    if weight_scale is not None:
        randomize(model, seed, weight_scale)
        if config.tie_word_embeddings:
            model.tie_weights()  # randomize copied into both; keep the tie explicit
    return model


def save_speech5_named(name: str, directory: Path, max_shard_size: str = "20KB"):
    """One of `SPEECH5_CONFIGS`, made and saved by `save_pretrained` (sharded); the reference."""
    reference = make_speech5_reference(speech5_config(**SPEECH5_CONFIGS[name]), seed=len(name))
    reference.save_pretrained(directory, max_shard_size=max_shard_size)
    return reference


# SentencePiece-style pieces: "▁" starts a word; the others continue one
CTC_PIECES = [
    "▁hello",
    "▁world",
    "▁one",
    "▁two",
    "▁three",
    "▁four",
    "▁five",
    "▁six",
    "▁seven",
    "▁eight",
    "▁nine",
    "▁ten",
    "▁the",
    "▁quick",
    "▁brown",
    "▁fox",
    "▁jumps",
    "▁over",
    "▁lazy",
    "▁dog",
    "▁a",
    "▁granite",
    "▁speech",
    "▁model",
    "▁runs",
    "▁fast",
    "▁and",
    "▁well",
    "s",
    "ing",
    "ed",
    "er",
    "ly",
    "▁re",
    "▁un",
    "▁.",
    "▁,",
    "▁?",
]


def save_ctc_tokenizer(directory: Path, vocab_size: int = SPEECH5_VOCAB) -> Path:
    """A `ParakeetTokenizer` (the reference's class for granite_speech5) with `vocab_size` ids:
    <pad> (the blank) = 0, <unk> = 1, then word and sub-word pieces, saved in the hub layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.models.parakeet.tokenization_parakeet import ParakeetTokenizer

    vocab = {"<pad>": BLANK, "<unk>": 1}
    pieces = iter(CTC_PIECES)
    for token_id in range(2, vocab_size):
        vocab[next(pieces, f"▁w{token_id}")] = token_id
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = ParakeetTokenizer(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(directory)
    return Path(directory)


def reference_encoder(fms_encoder: ConformerEncoder, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' encoder holding the same weights (through the checkpoint key mapping)."""
    config = hf_config_from_fms(FmsGraniteSpeechConfig(encoder_config=fms_encoder.config))
    encoder = GraniteSpeechCTCEncoder(config.encoder_config).to(dtype).eval()
    ours = fms_encoder.state_dict()
    renamed = {}
    for name in encoder.state_dict():
        source = (
            name.replace("up_proj", "mlp.w1")
            .replace("down_proj", "mlp.w2")
            .replace("depth_conv.conv", "depth_conv")
        )
        if source in ours:
            renamed[name] = ours[source]
    missing = set(encoder.state_dict()) - set(renamed)
    if missing:
        raise ValueError(f"no fms-speech weight for {sorted(missing)[:3]}")
    encoder.load_state_dict(renamed)
    return encoder
