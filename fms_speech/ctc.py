"""The CTC path of the Transcriber (granite_speech5): features, model, greedy decoding, words.

- `greedy_decode`: argmax per frame, frames past a clip's end made blank, repeats merged, blanks
  dropped, on tensors; each emitted token keeps the first and last frame of its run. One
  transfer to the host per batch.
- `WordSplitter`: tokens -> words with timestamps: a word runs from its first token's first
  emitting frame to its last token's last emitting frame (one frame is 80 ms for the published
  model: 4 feature rows of 20 ms).
- `join_windows`: a long recording's windows joined at word boundaries (below).
- `segments_from_words`: subtitle segments, split at pauses between words.
- `CTCRunner`: what `Transcriber` runs for a CTC checkpoint.

Joining windows: consecutive windows share `overlap_seconds` of audio. Word timestamps place
every word on the recording's clock, so the seam is cut exactly rather than by matching text:
the earlier window keeps its words whose midpoint is before the middle of the overlap (where
both windows have half the overlap of context), and the later one keeps its words whose midpoint
is at or after the end of the last word kept. A word heard by both windows is kept once, from
the earlier one if its midpoint falls before the seam, else from the later one; a word that
only the later window heard whole is not lost.
"""

import inspect
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fms_speech.audio import FRAMES_PER_SECOND, log_mel_deltas

# a pause at least this long between words starts a new segment
PAUSE_SECONDS = 0.5
# a segment longer than this is split at its longest pause
MAX_SEGMENT_SECONDS = 10.0
# tokens that start a word: SentencePiece's metaspace and byte-level BPE's space
WORD_START_MARKERS = ("▁", "Ġ")


@dataclass
class Word:
    start: float  # seconds, the first emitting frame's start
    end: float  # seconds, the last emitting frame's end
    text: str


@dataclass
class EmittedToken:
    token_id: int
    first_frame: int  # first and last frame of the token's run (inclusive)
    last_frame: int


def greedy_decode(
    logits: torch.Tensor, output_lengths: torch.Tensor, blank: int
) -> list[list[EmittedToken]]:
    """Each clip's emitted tokens: (B, T, vocab) logits, (B,) valid frames per clip."""
    best = logits.argmax(dim=-1)
    frames = torch.arange(best.shape[1], device=best.device)
    best = best.masked_fill(frames[None, :] >= output_lengths.to(best.device)[:, None], blank)
    changes = best[:, 1:] != best[:, :-1]
    run_starts = F.pad(changes, (1, 0), value=True)
    run_ends = F.pad(changes, (0, 1), value=True)
    emitting = best != blank
    rows, first = (run_starts & emitting).nonzero(as_tuple=True)
    last = (run_ends & emitting).nonzero(as_tuple=True)[1]  # the same runs, in the same order
    packed = torch.stack([rows, best[rows, first], first, last]).tolist()  # the host transfer
    decoded: list[list[EmittedToken]] = [[] for _ in range(best.shape[0])]
    for row, token_id, first_frame, last_frame in zip(*packed, strict=True):
        decoded[row].append(EmittedToken(token_id, first_frame, last_frame))
    return decoded


@dataclass
class WindowWords:
    """One window's decoding: its token ids and its words (seconds from the window's start)."""

    token_ids: list[int]
    words: list[Word]
    word_tokens: list[tuple[int, int]]  # each word's token index range [first, last + 1)


class WordSplitter:
    """Groups a tokenizer's emitted tokens into timed words and decodes text."""

    def __init__(self, tokenizer, frame_seconds: float):
        self.tokenizer = tokenizer
        self.frame_seconds = frame_seconds
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.starts_word = [str(piece).startswith(WORD_START_MARKERS) for piece in pieces]
        # a vocabulary without word markers (whole words): every token is a word
        self.marked = any(self.starts_word)
        # transformers' CTC tokenizer (ParakeetTokenizer) merges repeats again when decoding;
        # the ids given here are already merged, and a repeat left between blanks is real
        self.decode_kwargs = {"skip_special_tokens": True}
        if "group_tokens" in inspect.signature(tokenizer._decode).parameters:
            self.decode_kwargs["group_tokens"] = False

    def text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, **self.decode_kwargs).strip()

    def window_words(self, tokens: list[EmittedToken]) -> WindowWords:
        ids = [token.token_id for token in tokens]
        spans: list[tuple[int, int]] = []
        for index, token_id in enumerate(ids):
            starts = not self.marked or not spans or self.starts_word[token_id]
            if starts:
                spans.append((index, index + 1))
            else:
                spans[-1] = (spans[-1][0], index + 1)
        words, word_tokens = [], []
        for first, stop in spans:
            text = self.text(ids[first:stop])
            if not text:  # special tokens only
                continue
            start = tokens[first].first_frame * self.frame_seconds
            end = (tokens[stop - 1].last_frame + 1) * self.frame_seconds
            words.append(Word(start, end, text))
            word_tokens.append((first, stop))
        return WindowWords(ids, words, word_tokens)


@dataclass
class TimedWindow:
    """A window on the recording's clock (seconds) with its decoding."""

    start: float
    end: float
    decoded: WindowWords


def join_windows(
    windows: list[TimedWindow], splitter: WordSplitter, duration: float
) -> tuple[str, list[Word]]:
    """The recording's text and words (ending inside its `duration`), each window's share cut
    at word boundaries."""
    texts, all_words = [], []
    kept_until = None  # end of the last word kept so far
    for index, window in enumerate(windows):
        decoded = window.decoded
        words = [
            Word(window.start + w.start, min(window.start + w.end, duration), w.text)
            for w in decoded.words
        ]
        seam = None
        if index + 1 < len(windows):  # the middle of the overlap with the next window
            seam = (window.end + windows[index + 1].start) / 2
        keep = [
            i
            for i, word in enumerate(words)
            if (kept_until is None or _middle(word) >= kept_until)
            and (seam is None or _middle(word) < seam)
        ]
        if not keep:
            continue
        first_token = 0 if keep[0] == 0 else decoded.word_tokens[keep[0]][0]
        last_word = keep[-1] == len(words) - 1
        stop_token = len(decoded.token_ids) if last_word else decoded.word_tokens[keep[-1]][1]
        texts.append(splitter.text(decoded.token_ids[first_token:stop_token]))
        all_words.extend(words[i] for i in keep)
        kept_until = words[keep[-1]].end
    return " ".join(text for text in texts if text), all_words


def _middle(word: Word) -> float:
    return (word.start + word.end) / 2


def segments_from_words(words: list[Word]) -> list[list[Word]]:
    """Words grouped into segments: split at pauses of PAUSE_SECONDS or more, and segments
    longer than MAX_SEGMENT_SECONDS split again at their longest pause."""
    groups: list[list[Word]] = []
    for word in words:
        if groups and word.start - groups[-1][-1].end < PAUSE_SECONDS:
            groups[-1].append(word)
        else:
            groups.append([word])
    return [piece for group in groups for piece in _split_long(group)]


def _split_long(words: list[Word]) -> list[list[Word]]:
    if len(words) < 2 or words[-1].end - words[0].start <= MAX_SEGMENT_SECONDS:
        return [words]
    gaps = [words[i + 1].start - words[i].end for i in range(len(words) - 1)]
    cut = max(range(len(gaps)), key=lambda i: (gaps[i], -abs(i - len(gaps) / 2))) + 1
    return _split_long(words[:cut]) + _split_long(words[cut:])


class UnsupportedOption(ValueError):
    """An option a CTC model cannot honour: `option` names it, `reason` says why."""

    def __init__(self, option: str, reason: str):
        super().__init__(f"a CTC model {reason}")
        self.option, self.reason = option, reason


class CTCRunner:
    """What the Transcriber runs for a CTC checkpoint (granite_speech5)."""

    stages = ("load", "features", "encoder", "decode")

    def __init__(self, model, tokenizer):
        self.model = model
        subsampling = 2 ** len(model.config.encoder_config.subsample_layers)
        self.splitter = WordSplitter(tokenizer, subsampling / FRAMES_PER_SECOND)

    @staticmethod
    def check_options(options) -> None:
        """UnsupportedOption, one sentence, for an option a CTC model cannot honour."""
        if options.task != "transcribe":
            raise UnsupportedOption("task", "only transcribes (translation needs an LLM)")
        if options.prompt is not None:
            raise UnsupportedOption("prompt", "takes no prompt (prompts need an LLM)")
        if options.num_beams != 1:
            raise UnsupportedOption("num_beams", "decodes greedily (num_beams must be 1)")

    @torch.inference_mode()
    def run(
        self, runner, waveforms: list[torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> tuple[list[WindowWords], dict[str, float]]:
        """Each waveform's decoding, and the seconds spent per stage."""
        started = time.perf_counter()
        features, feature_lengths = log_mel_deltas([w.to(device) for w in waveforms])
        features_done = time.perf_counter()
        logits = runner(features.to(dtype), feature_lengths)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        encoder_done = time.perf_counter()
        output_lengths = self.model.output_lengths(feature_lengths)
        tokens = greedy_decode(logits, output_lengths, self.model.config.blank_token_id)
        decoded = [self.splitter.window_words(clip) for clip in tokens]
        timings = {
            "features": features_done - started,
            "encoder": encoder_done - features_done,
            "decode": time.perf_counter() - encoder_done,
        }
        return decoded, timings
