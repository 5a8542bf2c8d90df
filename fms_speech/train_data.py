"""Training data: (audio, text) pairs as length-bucketed batches ready for the training step.

Two sources give examples as (waveform at 16 kHz, text):
- `SynthesizedSpeech`: eSpeak NG speaking texts from a text source, with a voice, rate and pitch
  drawn per example, then noise and gain augmentation;
- `ManifestSpeech`: a JSON-lines manifest, one `{"audio": path, "text": ...}` per line.

Example i of a source is drawn from (seed, i) alone (its text, voice, rate, pitch, noise and
gain), and so is the order of batches: a run resumed at step s sees the batches an
uninterrupted run would have seen from step s on. Not to the last bit: eSpeak NG's output for
the same text and settings varies slightly with what the engine spoke before (its pitch jitter
and timing keep state), so resumed audio differs a little; a fresh run in a fresh process
repeats the same history.
Examples are drawn in pools; a pool is sorted by length and cut into batches (similar lengths
pad little), whose order is then shuffled.
"""

import json
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fms_speech.audio import (
    FRAMES_PER_SECOND,
    SAMPLE_RATE,
    load_audio,
    log_mel,
    prepare_waveform,
)
from fms_speech.models.qformer import num_audio_tokens
from fms_speech.prompts import AUDIO_PLACEHOLDER, prompt_ids

# The characters the encoder's CTC head emits: index 0 is the CTC blank
CTC_ALPHABET = " abcdefghijklmnopqrstuvwxyz'"
CTC_BLANK = 0
IGNORE_INDEX = -100


def ctc_targets(text: str) -> list[int]:
    """Lower-cased characters of `text` as CTC classes (1..); anything else becomes a space."""
    spaced = re.sub(f"[^{re.escape(CTC_ALPHABET)}]+", " ", text.lower())
    return [CTC_ALPHABET.index(char) + 1 for char in " ".join(spaced.split())]


@dataclass(frozen=True)
class Augmentation:
    """Per-example noise and gain; probabilities and ranges are drawn uniformly."""

    noise_probability: float = 0.8
    snr_db: tuple[float, float] = (5.0, 40.0)
    gain_db: tuple[float, float] = (-25.0, 5.0)
    pad_seconds: tuple[float, float] = (0.0, 0.3)  # silence before and after the speech

    def apply(self, samples: np.ndarray, rng: random.Random) -> np.ndarray:
        return self.apply_with_offset(samples, rng)[0]

    def apply_with_offset(self, samples: np.ndarray, rng: random.Random):
        """(augmented samples, seconds of silence put before the speech)."""
        pad = [int(rng.uniform(*self.pad_seconds) * SAMPLE_RATE) for _ in range(2)]
        samples = np.pad(samples, pad)
        if rng.random() < self.noise_probability:
            power = float(np.mean(samples**2)) + 1e-12
            snr = rng.uniform(*self.snr_db)
            noise = np.random.default_rng(rng.getrandbits(32)).standard_normal(len(samples))
            if rng.random() < 0.5:  # pink-ish: white noise through a one-pole low-pass
                noise = _low_pass(noise, rng.uniform(0.5, 0.95))
            noise *= math.sqrt(power / 10 ** (snr / 10) / (np.mean(noise**2) + 1e-12))
            samples = samples + noise.astype(np.float32)
        samples = samples * 10 ** (rng.uniform(*self.gain_db) / 20)
        return np.clip(samples, -1.0, 1.0).astype(np.float32), pad[0] / SAMPLE_RATE


def _low_pass(noise: np.ndarray, pole: float) -> np.ndarray:
    # y[n] = (1 - p) x[n] + p y[n-1], via the closed form over a short impulse response
    taps = (1 - pole) * pole ** np.arange(64)
    return np.convolve(noise, taps)[: len(noise)]


@dataclass(frozen=True)
class Voices:
    """eSpeak NG voices (language + optional variant) and the ranges of rate and pitch."""

    voices: tuple[str, ...]
    rate: tuple[int, int] = (150, 230)  # words per minute
    pitch: tuple[int, int] = (30, 70)
    pitch_range: tuple[int, int] = (30, 80)


class SynthesizedSpeech:
    """eSpeak NG speech of texts from `text_source(rng)`, augmented; example i from (seed, i).

    An example is (waveform, text, (each word's start, the speech's end) in seconds): the
    synthesiser's word timing, which `BatchMaker` turns into the word spoken at each audio
    vector's time."""

    def __init__(
        self,
        text_source: Callable[[random.Random], str],
        voices: Voices,
        augmentation: Augmentation | None = Augmentation(),
        seed: int = 0,
    ):
        self.text_source, self.voices, self.augmentation = text_source, voices, augmentation
        self.seed = seed

    def example(self, index: int) -> tuple[torch.Tensor, str, tuple[list[float], float]]:
        from fms_speech.synthesis import synthesize, word_timing

        rng = random.Random(f"{self.seed}/{index}")
        text = self.text_source(rng)
        v = self.voices
        samples, sample_rate = synthesize(
            text,
            rng.choice(v.voices),
            rate=rng.randint(*v.rate),
            pitch=rng.randint(*v.pitch),
            pitch_range=rng.randint(*v.pitch_range),
        )
        starts, end = word_timing()
        waveform, offset = prepare_waveform(samples, sample_rate).numpy(), 0.0
        if self.augmentation is not None:
            waveform, offset = self.augmentation.apply_with_offset(waveform, rng)
        timing = ([start + offset for start in starts], end + offset)
        return torch.from_numpy(waveform), text, timing

    def __len__(self) -> int:
        return 2**62  # endless


class ManifestSpeech:
    """A JSON-lines manifest of `{"audio": path, "text": ...}`; relative paths from its folder.

    Example i is entry i mod N of epoch i // N's shuffled order (seeded), so epochs differ.
    """

    def __init__(
        self, manifest: str | Path, seed: int = 0, augmentation: Augmentation | None = None
    ):
        self.path = Path(manifest)
        self.entries = read_manifest(self.path)
        self.seed, self.augmentation = seed, augmentation
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.entries)))
            random.Random(f"{self.seed}/epoch{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def example(self, index: int) -> tuple[torch.Tensor, str]:
        epoch, position = divmod(index, len(self.entries))
        audio, text = self.entries[self._order(epoch)[position]]
        waveform = load_audio(audio)
        if self.augmentation is not None:
            rng = random.Random(f"{self.seed}/{index}")
            waveform = torch.from_numpy(self.augmentation.apply(waveform.numpy(), rng))
        return waveform, text

    def __len__(self) -> int:
        return len(self.entries)


class ManifestError(ValueError):
    """A manifest that cannot be used; the message is one sentence naming the line."""


def read_manifest(path: Path) -> list[tuple[Path, str]]:
    """(audio path, text) per line of a JSON-lines manifest; ManifestError for a bad line."""
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            audio, text = entry["audio"], entry["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ManifestError(
                f"{path}:{number}: expected a JSON object with 'audio' and 'text'"
            ) from None
        if not isinstance(audio, str) or not isinstance(text, str):
            raise ManifestError(f"{path}:{number}: 'audio' and 'text' must be strings")
        audio_path = Path(audio) if Path(audio).is_absolute() else path.parent / audio
        entries.append((audio_path, text))
    if not entries:
        raise ManifestError(f"manifest {path} has no entries")
    return entries


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) prompt + transcript + eos, right-padded
    labels: torch.Tensor  # (B, L) the next token where it is a transcript token, else -100
    features: torch.Tensor  # (B, T, 160)
    feature_lengths: torch.Tensor  # (B,)
    ctc_targets: torch.Tensor  # (B, S) character classes, 0-padded
    ctc_lengths: torch.Tensor  # (B,)
    texts: list[str]
    pad_id: int = 0  # the tokenizer's pad token
    audio_token_index: int = -1  # the tokenizer's <|audio|>
    # (B, audio vectors): the token being spoken at each audio vector's time, the pad token in
    # silence, -100 where unknown (no word timing) and past the row's audio vectors
    slot_tokens: torch.Tensor | None = None


def padded_rows(rows: list[list[int]], label_rows: list[list[int]], pad_id: int):
    """(input ids, labels) as right-padded tensors: pad_id and -100 past each row's end."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(label_row)] = torch.tensor(label_row)
    return input_ids, labels


class BatchMaker:
    """Turns (waveform, text) examples into a `Batch` for a model with this projector and prompt."""

    def __init__(self, tokenizer, template: str, window_size: int, downsample_rate: int):
        self.tokenizer, self.template = tokenizer, template
        self.window_size, self.downsample_rate = window_size, downsample_rate
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id

    def __call__(self, examples: Sequence[tuple]) -> Batch:
        """examples: (waveform, text) or (waveform, text, word timing) (`SynthesizedSpeech`)."""
        features, lengths = log_mel([example[0] for example in examples])
        counts = num_audio_tokens(lengths, self.window_size, self.downsample_rate).tolist()
        rows, label_rows = [], []
        slot_tokens = torch.full((len(examples), max(counts)), IGNORE_INDEX, dtype=torch.long)
        for row, (example, count) in enumerate(zip(examples, counts, strict=True)):
            text = example[1]
            if len(example) > 2:
                slot_tokens[row, :count] = self.spoken_tokens(text, *example[2], count)
            prompt = prompt_ids(self.tokenizer, self.template, count)
            answer = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]
            rows.append(prompt + answer)
            # position j predicts token j + 1: the answer's tokens, from the prompt's last on
            label_rows.append([IGNORE_INDEX] * (len(prompt) - 1) + answer + [IGNORE_INDEX])
        input_ids, labels = padded_rows(rows, label_rows, self.pad_id)
        characters = [ctc_targets(example[1]) for example in examples]
        ctc = torch.zeros(len(characters), max(1, *map(len, characters)), dtype=torch.long)
        for i, row in enumerate(characters):
            ctc[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return Batch(
            input_ids,
            labels,
            features,
            lengths,
            ctc,
            torch.tensor([len(row) for row in characters]),
            [example[1] for example in examples],
            self.pad_id,
            self.tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER),
            slot_tokens,
        )

    def spoken_tokens(self, text: str, starts: list[float], end: float, count: int):
        """(count,): the token spoken at each audio vector's middle, pad in silence; a word of
        several tokens shares its time among them. All -100 if the timing has another number of
        words than the text."""
        words = text.split()
        tokens = torch.full((count,), IGNORE_INDEX, dtype=torch.long)
        if len(words) != len(starts) or not words:
            return tokens
        # vector s sums up encoder frames [s, s + 1) * downsample_rate (50 per second)
        times = (torch.arange(count) + 0.5) * self.downsample_rate / FRAMES_PER_SECOND
        tokens.fill_(self.pad_id)
        bounds = [*starts, end]
        for k, word in enumerate(words):
            pieces = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            inside = ((times >= bounds[k]) & (times < bounds[k + 1])).nonzero().flatten()
            for j, piece in enumerate(pieces):
                share = inside[
                    j * len(inside) // len(pieces) : (j + 1) * len(inside) // len(pieces)
                ]
                tokens[share] = piece
        return tokens


class BucketedBatches(torch.utils.data.IterableDataset):
    """Batches from step `start` on: pools of `pool_batches` batches sorted by audio length.

    Batch s is a pure function of (source, batch_size, pool_batches, seed, s).
    """

    def __init__(
        self,
        source,
        make_batch: BatchMaker,
        batch_size: int,
        start: int = 0,
        stop: int | None = None,
        pool_batches: int = 16,
        seed: int = 0,
    ):
        super().__init__()
        self.source, self.make_batch = source, make_batch
        self.batch_size, self.pool_batches = batch_size, pool_batches
        self.start, self.stop, self.seed = start, stop, seed

    def __iter__(self) -> Iterator[Batch]:
        step = self.start
        while self.stop is None or step < self.stop:
            pool, first = divmod(step, self.pool_batches)
            for batch in self._pool(pool)[first:]:
                if self.stop is not None and step >= self.stop:
                    return
                yield self.make_batch(batch)
                step += 1

    def _pool(self, pool: int) -> list[list[tuple[torch.Tensor, str]]]:
        size = self.batch_size * self.pool_batches
        examples = [self.source.example(pool * size + i) for i in range(size)]
        examples.sort(key=lambda example: example[0].numel())
        batches = [examples[i : i + self.batch_size] for i in range(0, size, self.batch_size)]
        random.Random(f"{self.seed}/pool{pool}").shuffle(batches)
        return batches


def batch_loader(dataset: BucketedBatches, workers: int = 1):
    """Batches made in `workers` background processes (synthesis overlaps training)."""
    if workers == 0:
        return iter(dataset)
    if workers != 1:  # each worker would replay the same stream
        raise ValueError("the batch stream is made by one background worker (or none)")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=1,
        prefetch_factor=4,
        worker_init_fn=lambda _: torch.set_num_threads(1),
        persistent_workers=False,
    )
    return iter(loader)
