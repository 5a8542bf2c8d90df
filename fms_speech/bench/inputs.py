"""The bench's inputs: synthesised speech clips, prompt ids, batches and the whole workload."""

from dataclasses import dataclass

import numpy as np
import torch

from fms_speech.audio import HOP_LENGTH, SAMPLE_RATE, log_mel, prepare_waveform
from fms_speech.bench.checkpoints import PAD_TOKEN
from fms_speech.bench.settings import ClipShape, Settings
from fms_speech.prompts import chat_text, instruction, load_tokenizer, prompt_ids
from fms_speech.synthesis import synthesize

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


@dataclass
class Batch:
    waveforms: list[torch.Tensor]  # 16 kHz mono
    prompts: list[list[int]]  # <|audio|> already expanded per clip
    audio_seconds: float


def speech_clip(seconds: float, seed: int) -> torch.Tensor:
    """`seconds` of eSpeak NG speech at 16 kHz: sentences in a seeded order, looped, cut."""
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
            self.template = chat_text(tokenizer, instruction("transcribe"))

    @classmethod
    def for_model(cls, fms_model, tokenizer_dir: str | None) -> "Prompter":
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        projector = fms_model.config.projector_config
        return cls(
            fms_model.config.audio_token_index,
            projector.window_size,
            projector.downsample_rate,
            tokenizer,
        )

    @property
    def eos(self) -> int | None:
        return self.tokenizer.eos_token_id if self.tokenizer is not None else None

    def audio_tokens(self, num_samples: int) -> int:
        frames = (num_samples // HOP_LENGTH + 1) // 2
        return -(-frames // self.window) * (self.window // self.downsample)

    def __call__(self, num_samples: int) -> list[int]:
        count = self.audio_tokens(num_samples)
        if self.tokenizer is None:
            return [1, 2, 3, *([self.audio_token] * count), 4, 5, 6, 7]
        return prompt_ids(self.tokenizer, self.template, count)


def make_batch(waveforms: list[torch.Tensor], prompter: Prompter) -> Batch:
    prompts = [prompter(w.shape[0]) for w in waveforms]
    seconds = sum(w.shape[0] for w in waveforms) / SAMPLE_RATE
    return Batch(waveforms, prompts, seconds)


def features_of(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fms-speech's log-mel for every system (the reference's extractor needs torchaudio)."""
    return log_mel([w.to(device) for w in batch.waveforms])


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of prompts padded on the left, as transformers' generate wants."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD_TOKEN, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def audio_features_mask(ids: torch.Tensor, audio_token: int) -> torch.Tensor:
    """The reference's input_features_mask: each row's audio placeholders, left-aligned."""
    counts = (ids == audio_token).sum(dim=1)
    positions = torch.arange(int(counts.max()), device=ids.device)
    return positions[None, :] < counts[:, None]


@dataclass
class Workload:
    shapes: dict[ClipShape, Batch]  # a batch of equal-length clips per shape
    mixed: list[Batch]
    eos: int | None
    agreement_shape: ClipShape


def make_workload(settings: Settings, prompter: Prompter) -> Workload:
    shapes = {}
    for shape in settings.shapes():
        clips = [speech_clip(shape.seconds, seed=100 * i + 7) for i in range(shape.batch)]
        shapes[shape] = make_batch(clips, prompter)
    mixed = []
    if "mixed" in settings.parts:
        low, high = settings.mixed_range
        generator = torch.Generator().manual_seed(2024)
        lengths = low + (high - low) * torch.rand(settings.mixed_clips, generator=generator)
        clips = [speech_clip(float(s), seed=i) for i, s in enumerate(lengths.tolist())]
        for start in range(0, len(clips), settings.mixed_batch):
            mixed.append(make_batch(clips[start : start + settings.mixed_batch], prompter))
    return Workload(shapes, mixed, prompter.eos, settings.agreement_shape())
