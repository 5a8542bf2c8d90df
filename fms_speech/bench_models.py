"""The checkpoint, the inputs and the four systems that `fms-speech bench` compares.

One checkpoint serves both implementations: the reference (transformers'
`GraniteSpeechForConditionalGeneration` with a PEFT LoRA on q_proj/v_proj) is built with random
weights and saved in the hub layout, and fms-speech loads that directory with `get_model`. Both
then hold the same weights and see the same features and prompt ids.

Random weights give degenerate but deterministic text (the published Granite multipliers make
the current token's embedding dominate the logits), so every system and dtype must agree on it;
with a real checkpoint (`--model DIR`) the tokens are real ones.
"""

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    GraniteSpeechForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
)
from transformers import GraniteSpeechConfig as HFGraniteSpeechConfig

from fms_speech.audio import SAMPLE_RATE, log_mel, prepare_waveform
from fms_speech.compile import compile_model
from fms_speech.generation import generate
from fms_speech.models.granite_speech import GraniteSpeechConfig

SYSTEMS = ("reference eager", "reference compiled", "fms eager", "fms compiled")
SYSTEM_SLUGS = {name.replace("reference", "ref").replace(" ", "-"): name for name in SYSTEMS}

# The embedded default: every part of the published architecture (mid-layer CTC, several
# attention blocks at 30 s, windowed Q-Former, grouped-query LLM with the audio LoRA), narrow.
# head_dim 64 like 3.3-2b; no size of a rotary table equals a batch size of the default run.
EMBEDDED = {
    "encoder": {
        "input_dim": 160,
        "num_layers": 4,
        "hidden_dim": 256,
        "feedforward_mult": 4,
        "num_heads": 4,
        "dim_head": 64,
        "output_dim": 42,
        "context_size": 200,
        "max_pos_emb": 512,
        "conv_kernel_size": 15,
        "conv_expansion_factor": 2,
        "dropout": 0.0,
    },
    "projector": {
        "model_type": "blip_2_qformer",
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
        "cross_attention_frequency": 1,
        "encoder_hidden_size": 256,
        "layer_norm_eps": 1e-12,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
    "text": {
        "model_type": "granite",
        "vocab_size": 1024,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e7,
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.015625,
        "logits_scaling": 8.0,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    },
}
EMBEDDED_LORA = (8, 16)  # rank, alpha
PUBLISHED_LORA = (64, 32)
PAD_TOKEN = 0

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "granite speech turns spoken words into written text",
    "she sells sea shells by the sea shore every summer morning",
    "one two three four five six seven eight nine ten",
    "the weather today is cloudy with a chance of rain in the evening",
    "please transcribe this recording as accurately as you can",
    "a compiled model runs the same arithmetic with fewer trips to memory",
    "long audio is cut into windows of thirty seconds with one second of overlap",
]


# ---- configurations


def embedded_config() -> HFGraniteSpeechConfig:
    text = EMBEDDED["text"]
    return HFGraniteSpeechConfig(
        encoder_config=dict(EMBEDDED["encoder"]),
        projector_config=dict(EMBEDDED["projector"]),
        text_config=dict(text),
        audio_token_index=text["vocab_size"] - 1,
        window_size=15,
        downsample_rate=5,
        has_lora_adapter=True,
        tie_word_embeddings=True,
    )


def hf_config_from_fms(config: GraniteSpeechConfig) -> HFGraniteSpeechConfig:
    """transformers' config for an fms-speech config (the inverse of the hf_pretrained mapping)."""
    enc, proj, text = config.encoder_config, config.projector_config, config.text_config
    encoder = {k: getattr(enc, k) for k in EMBEDDED["encoder"] if k != "dropout"}
    projector = {
        **EMBEDDED["projector"],
        "hidden_size": proj.hidden_size,
        "num_hidden_layers": proj.num_layers,
        "num_attention_heads": proj.num_heads,
        "intermediate_size": proj.intermediate_size,
        "cross_attention_frequency": proj.cross_attention_frequency,
        "encoder_hidden_size": proj.encoder_hidden_size,
        "layer_norm_eps": proj.layer_norm_eps,
    }
    text_config = {
        **EMBEDDED["text"],
        "vocab_size": text.src_vocab_size,
        "hidden_size": text.emb_dim,
        "intermediate_size": int(text.emb_dim * text.hidden_grow_factor),
        "num_hidden_layers": text.nlayers,
        "num_attention_heads": text.nheads,
        "num_key_value_heads": text.kvheads,
        "max_position_embeddings": text.max_expected_seq_len,
        "rms_norm_eps": text.norm_eps,
        "rope_theta": text.rope_theta,
        "embedding_multiplier": text.embedding_multiplier,
        "residual_multiplier": text.residual_multiplier,
        "attention_multiplier": text.attention_multiplier,
        "logits_scaling": text.logits_scaling,
        "tie_word_embeddings": text.tie_heads,
    }
    return HFGraniteSpeechConfig(
        encoder_config={**encoder, "dropout": 0.0},
        projector_config=projector,
        text_config=text_config,
        audio_token_index=config.audio_token_index,
        window_size=proj.window_size,
        downsample_rate=proj.downsample_rate,
        has_lora_adapter=config.lora_rank > 0,
        tie_word_embeddings=text.tie_heads,
    )


def variant_config(variant: str, encoder_layers=None, llm_layers=None) -> HFGraniteSpeechConfig:
    """A published variant's shapes (fms-speech's registry), optionally with fewer layers."""
    from fms.models import get_model

    overrides = {}
    if encoder_layers:
        overrides["encoder_config"] = {"num_layers": encoder_layers}
    if llm_layers:
        overrides["text_config"] = {"nlayers": llm_layers}
    with torch.device("meta"):
        model = get_model("granite_speech", variant, device_type="meta", **overrides)
    return hf_config_from_fms(model.config)


# ---- the checkpoint


def build_checkpoint(
    config: HFGraniteSpeechConfig, directory: Path, dtype: torch.dtype, lora: tuple[int, int]
):
    """Random reference weights (transformers' init) + a random LoRA, saved in the hub layout.

    Returns the reference model (the LoRA injected, active) in `dtype`.
    """
    import peft

    torch.manual_seed(0)
    model = GraniteSpeechForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.save_pretrained(directory)
    rank, alpha = lora
    lora_config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
    peft_model = peft.get_peft_model(model, lora_config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the adapter do something
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_(0.02 * noise)
    with tempfile.TemporaryDirectory() as adapter_dir:
        peft_model.save_pretrained(adapter_dir)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(Path(adapter_dir) / name, Path(directory) / name)
    return peft_model.get_base_model().eval()


def load_reference(directory: Path, dtype: torch.dtype):
    """The reference from a hub-style directory, with its PEFT adapter if it has one."""
    import peft

    model = GraniteSpeechForConditionalGeneration.from_pretrained(str(directory), dtype=dtype)
    if (Path(directory) / "adapter_config.json").is_file():
        model = peft.PeftModel.from_pretrained(model, str(directory)).get_base_model()
    return model.eval()


def load_fms(directory: Path, dtype: torch.dtype, device: torch.device):
    from fms.models import get_model

    model = get_model(
        "hf_pretrained", model_path=str(directory), device_type=device.type, data_type=dtype
    )
    return model.eval()


# ---- inputs


@dataclass
class Batch:
    waveforms: list[torch.Tensor]  # 16 kHz mono
    prompts: list[list[int]]  # <|audio|> already expanded per clip
    audio_seconds: float


def speech_clip(seconds: float, seed: int) -> torch.Tensor:
    """`seconds` of eSpeak NG speech at 16 kHz: sentences in a seeded order, looped, cut."""
    from fms_speech.synthesis import synthesize

    order = np.random.default_rng(seed).permutation(len(SENTENCES))
    needed = int(seconds * SAMPLE_RATE)
    pieces, total, index = [], 0, 0
    while total < needed:
        samples, rate = synthesize(SENTENCES[order[index % len(order)]])
        piece = prepare_waveform(samples, rate)
        pieces.append(piece)
        total += piece.shape[0]
        index += 1
    return torch.cat(pieces)[:needed]


class Prompter:
    """Prompt ids for a clip: the checkpoint's chat template, or fixed ids for random weights."""

    def __init__(self, audio_token: int, window: int, downsample: int, tokenizer=None):
        self.audio_token, self.window, self.downsample = audio_token, window, downsample
        self.tokenizer = tokenizer
        if tokenizer is not None:
            from fms_speech.prompts import chat_text, instruction

            self.template = chat_text(tokenizer, instruction("transcribe"))

    def audio_tokens(self, num_samples: int) -> int:
        frames = (num_samples // 160 + 1) // 2
        return -(-frames // self.window) * (self.window // self.downsample)

    def __call__(self, num_samples: int) -> list[int]:
        count = self.audio_tokens(num_samples)
        if self.tokenizer is None:
            return [1, 2, 3, *([self.audio_token] * count), 4, 5, 6, 7]
        from fms_speech.prompts import prompt_ids

        return prompt_ids(self.tokenizer, self.template, count)


def make_batch(waveforms: list[torch.Tensor], prompter: Prompter) -> Batch:
    prompts = [prompter(w.shape[0]) for w in waveforms]
    seconds = sum(w.shape[0] for w in waveforms) / SAMPLE_RATE
    return Batch(waveforms, prompts, seconds)


# ---- the systems


@dataclass
class Generated:
    sequences: list[list[int]]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    features_seconds: float = 0.0
    first_logits: torch.Tensor | None = None  # (B, vocab) float32, divided by logits_scaling


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def features_of(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fms-speech's log-mel for every system (the reference's extractor needs torchaudio)."""
    features, lengths = log_mel([w.to(device) for w in batch.waveforms])
    return features, lengths


class _StepClock(LogitsProcessor):
    """Timestamps every generation step of transformers' generate and keeps the first logits."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self.first_scores: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        _synchronize(self.device)
        self.times.append(time.perf_counter())
        if self.first_scores is None:
            self.first_scores = scores.detach().float().clone()
        return scores


class ReferenceSystem:
    """transformers' model: eager, or with its forward under torch.compile (transformers' recipe)."""

    def __init__(self, model, compiled: bool, device: torch.device, compile_options: dict):
        self.model, self.compiled, self.device = model, compiled, device
        self.name = "reference compiled" if compiled else "reference eager"
        self.compile_options = compile_options
        self.logits_scaling = model.config.text_config.logits_scaling
        self.encoder, self.projector = model.model.encoder, model.model.projector

    def __enter__(self):
        if self.compiled:
            self.model.forward = torch.compile(self.model.forward, **self.compile_options)
        return self

    def __exit__(self, *exc):
        if self.compiled:
            del self.model.forward  # back to the class's method

    def compile_modules(self):
        self.encoder = torch.compile(self.model.model.encoder, **self.compile_options)
        self.projector = torch.compile(self.model.model.projector, **self.compile_options)

    def encode(self, features, lengths):
        return self.encoder(features).last_hidden_state

    def project(self, encoder_states, lengths):
        return self.projector(encoder_states)

    def generate(self, batch: Batch, max_new_tokens: int, eos: int | None) -> Generated:
        start = time.perf_counter()
        features, lengths = features_of(batch, self.device)
        _synchronize(self.device)
        features_seconds = time.perf_counter() - start
        input_ids, attention_mask = _left_pad(batch.prompts, self.device)
        audio_token = self.model.config.audio_token_index
        counts = (input_ids == audio_token).sum(dim=1)
        positions = torch.arange(int(counts.max()), device=self.device)
        features_mask = positions[None, :] < counts[:, None]
        clock = _StepClock(self.device)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=PAD_TOKEN,
        )
        start = time.perf_counter()
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                input_features=features.to(self.model.dtype),
                input_features_mask=features_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([clock]),
            )
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        sequences = [_until_eos(row, eos) for row in new_tokens]
        return Generated(
            sequences,
            prefill_seconds=clock.times[0] - start,
            decode_seconds=clock.times[-1] - clock.times[0],
            decode_steps=len(clock.times) - 1,
            features_seconds=features_seconds,
            first_logits=clock.first_scores / self.logits_scaling,
        )


class FmsSystem:
    """fms-speech's model, eager or under `compile_model`, driven by `fms_speech.generation`."""

    def __init__(self, model, compiled: bool, device: torch.device, compile_options: dict):
        self.model, self.compiled, self.device = model, compiled, device
        self.name = "fms compiled" if compiled else "fms eager"
        self.compile_options = compile_options
        self.runner = model
        self.encoder, self.projector = model.encoder, model.projector

    def __enter__(self):
        if self.compiled:
            self.runner = compile_model(self.model, **self.compile_options)
        return self

    def __exit__(self, *exc):
        self.runner = self.model

    def compile_modules(self):
        self.encoder = compile_model(self.model.encoder, **self.compile_options)
        self.projector = compile_model(self.model.projector, **self.compile_options)

    def encode(self, features, lengths):
        return self.encoder(features, lengths)

    def project(self, encoder_states, lengths):
        frames = torch.arange(encoder_states.shape[1], device=lengths.device)
        return self.projector(encoder_states, frames[None, :] < lengths[:, None])

    def generate(self, batch: Batch, max_new_tokens: int, eos: int | None) -> Generated:
        start = time.perf_counter()
        features, lengths = features_of(batch, self.device)
        _synchronize(self.device)
        features_seconds = time.perf_counter() - start
        output = generate(
            self.runner,
            batch.prompts,
            features.to(_dtype(self.model)),
            lengths,
            max_new_tokens=max_new_tokens,
            eos_token_id=-1 if eos is None else eos,  # -1: no token ends a sequence
            pad_token_id=PAD_TOKEN,
        )
        return Generated(
            output.sequences,
            output.prefill_seconds,
            output.decode_seconds,
            output.decode_steps,
            features_seconds,
        )

    def first_logits(self, batch: Batch) -> torch.Tensor:
        """Last-position logits of the prefill, called exactly as `generate` calls it."""
        from fms.utils import generation as fms_generation

        features, lengths = features_of(batch, self.device)
        prompts = [torch.tensor(p, device=self.device) for p in batch.prompts]
        input_ids, padding = fms_generation.pad_input_ids(prompts, pad_token_id=PAD_TOKEN)
        gate = torch.ones(len(prompts), device=self.device)
        with torch.no_grad():
            logits, _ = self.runner(
                input_ids,
                input_features=features.to(_dtype(self.model)),
                feature_lengths=lengths,
                past_key_value_states=None,
                use_cache=True,
                lora_gate=gate,
                last_n_tokens=1,
                **padding,
            )
        return logits[:, -1].float()


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD_TOKEN, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens
