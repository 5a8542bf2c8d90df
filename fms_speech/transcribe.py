"""Audio in, text out: the Python API.

```python
from fms_speech import Transcriber
transcriber = Transcriber.from_pretrained("granite-speech-3.3-2b", dtype="bfloat16", compile=True)
for result in transcriber.transcribe(["a.wav", "b.flac"], batch_size=8):
    print(result.text)
```

Inputs stream through: each file is loaded, cut into windows (long audio), and its windows join a
queue that runs through the model `batch_size` windows at a time; a file's result is assembled as
soon as its last window is done, so memory stays flat however long or many the inputs are.
"""

import dataclasses
import itertools
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fms.models import get_model

from fms_speech.aot import compiled_runner
from fms_speech.audio import (
    SAMPLE_RATE,
    AudioError,
    load_audio,
    log_mel,
    prepare_waveform,
    split_audio,
)
from fms_speech.checkpoint import CheckpointError, check_checkpoint, index_aware_loading
from fms_speech.generation import generate
from fms_speech.prompts import chat_text, instruction, load_tokenizer, prompt_ids
from fms_speech.stitch import stitch

AudioInput = str | Path | np.ndarray | torch.Tensor
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STAGES = ("load", "features", "prefill", "decode")


@dataclass(frozen=True)
class TranscribeOptions:
    """What to ask of the model and how to run it: built once by the CLI, the server or a user.

    Invalid values raise ValueError with one sentence when the object is made.
    """

    task: str = "transcribe"  # or "translate", into `language`
    language: str | None = None  # target of translate: a name or an ISO 639-1 code (fr)
    prompt: str | None = None  # a free instruction instead of the task's
    num_beams: int = 1  # 1: greedy
    max_new_tokens: int = 200
    batch_size: int = 8  # windows per model call
    window_seconds: float = 30.0  # long audio is cut into windows of at most this
    overlap_seconds: float = 1.0  # shared by consecutive windows, for stitching
    max_audio_seconds: float | None = None  # longer inputs fail; None: no limit

    def __post_init__(self):
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError("batch_size, max_new_tokens and num_beams must be at least 1")
        if self.window_seconds < 1:
            raise ValueError(f"the window must be at least 1 s, not {self.window_seconds:g} s")
        if not 0 <= self.overlap_seconds < self.window_seconds / 2:
            raise ValueError("the overlap must be at least 0 s and below half the window")
        if self.max_audio_seconds is not None and self.max_audio_seconds <= 0:
            raise ValueError("the longest audio allowed must be more than 0 s")
        self.instruction()  # a PromptError (a ValueError) for a bad task or language

    def instruction(self) -> str:
        """The user message for the model, with its one `<|audio|>`."""
        return instruction(self.task, self.language, self.prompt)


@dataclass
class Segment:
    start: float  # seconds
    end: float
    text: str


@dataclass
class Transcription:
    source: str  # the path, or "array N" for an in-memory input
    index: int = 0  # position among the inputs
    text: str = ""
    segments: list[Segment] = field(default_factory=list)
    duration: float = 0.0  # seconds of audio
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    error: str | None = None  # why this input failed; None when it succeeded


@dataclass
class _Window:
    owner: int  # index of its input
    start: int  # samples
    end: int
    waveform: torch.Tensor
    text: str = ""


@dataclass
class _Pending:
    result: Transcription
    windows: list[_Window]
    remaining: int


def _source_name(item: AudioInput, index: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"array {index}"


def resolve_options(options: TranscribeOptions | None, **overrides) -> TranscribeOptions:
    """`options` (or the defaults) with `overrides` applied and checked."""
    return dataclasses.replace(options or TranscribeOptions(), **overrides)


class Transcriber:
    """A loaded checkpoint (model, tokenizer) ready to transcribe or translate audio."""

    def __init__(self, model, tokenizer, device: torch.device, dtype: torch.dtype, compile: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.compile = compile
        # precompiled artifacts when `fms-speech compile` made them, else compiled just in time
        self.runner = compiled_runner(model) if compile else model

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        compile: bool = False,
    ) -> "Transcriber":
        """Load a hub-layout checkpoint directory; CheckpointError (one sentence) if unusable."""
        directory = check_checkpoint(model_dir)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but this machine has no usable GPU")
        tokenizer = load_tokenizer(directory)
        try:
            with index_aware_loading():
                model = get_model(
                    "hf_pretrained",
                    model_path=str(directory),
                    device_type=device.type,
                    data_type=dtype,
                )
        except (ValueError, KeyError, FileNotFoundError, OSError) as error:
            raise CheckpointError(f"cannot load the model in {directory}: {error}") from None
        return cls(model.eval(), tokenizer, device, dtype, compile)

    # ---- the public entry points

    def transcribe(
        self,
        inputs: AudioInput | Iterable[AudioInput],
        options: TranscribeOptions | None = None,
        *,
        errors: str = "raise",
        progress=None,
        sample_rate: int = SAMPLE_RATE,
        **overrides,
    ) -> list[Transcription]:
        """One Transcription per input, in the inputs' order; arguments as for `stream`.

        errors="raise" raises the first bad input's AudioError; errors="record" stores it in
        that input's `error` and goes on. `progress` (e.g. a tqdm bar) advances per input.
        """
        if errors not in ("raise", "record"):
            raise ValueError(f"errors must be 'raise' or 'record', not {errors!r}")
        results = []
        for result in self.stream(inputs, options, sample_rate=sample_rate, **overrides):
            if result.error is not None and errors == "raise":
                raise AudioError(result.error)
            results.append(result)
            if progress is not None:
                progress.update(1)
        return sorted(results, key=lambda result: result.index)

    def stream(
        self,
        inputs: AudioInput | Iterable[AudioInput],
        options: TranscribeOptions | None = None,
        *,
        sample_rate: int = SAMPLE_RATE,
        **overrides,
    ) -> Iterator[Transcription]:
        """Each input's Transcription as soon as it is finished (failed ones at once).

        Inputs are paths or 1-D arrays at `sample_rate`. `options` (default TranscribeOptions())
        with keyword `overrides` of its fields, e.g. `stream(files, batch_size=4)`.
        """
        options = resolve_options(options, **overrides)
        template = chat_text(self.tokenizer, options.instruction())
        single = isinstance(inputs, (str, Path, np.ndarray, torch.Tensor))
        return self._stream([inputs] if single else inputs, options, template, sample_rate)

    # ---- streaming windows through the model

    def _load(self, item: AudioInput, sample_rate: int) -> torch.Tensor:
        if isinstance(item, (str, Path)):
            return load_audio(item)
        return prepare_waveform(item, sample_rate)

    def _stream(
        self,
        items: Iterable[AudioInput],
        options: TranscribeOptions,
        template: str,
        sample_rate: int,
    ) -> Iterator[Transcription]:
        pending: dict[int, _Pending] = {}
        queue: list[_Window] = []
        for index, item in enumerate(items):
            result = Transcription(_source_name(item, index), index)
            result.timings = dict.fromkeys(STAGES, 0.0)
            started = time.perf_counter()
            try:
                waveform = self._load(item, sample_rate)
                result.duration = waveform.numel() / SAMPLE_RATE
                limit = options.max_audio_seconds
                if limit is not None and result.duration > limit:
                    raise AudioError(
                        f"Cannot transcribe '{result.source}': it is {result.duration:.1f} s "
                        f"long, more than the {limit:g} s allowed (--max-audio-seconds)."
                    )
            except AudioError as error:
                result.error = str(error)
                yield result
                continue
            result.timings["load"] = time.perf_counter() - started
            ranges = split_audio(waveform, options.window_seconds, options.overlap_seconds)
            windows = [_Window(index, start, end, waveform[start:end]) for start, end in ranges]
            pending[index] = _Pending(result, windows, len(windows))
            queue.extend(windows)
            while len(queue) >= options.batch_size:
                batch, queue = queue[: options.batch_size], queue[options.batch_size :]
                yield from self._run(batch, pending, options, template)
        while queue:
            batch, queue = queue[: options.batch_size], queue[options.batch_size :]
            yield from self._run(batch, pending, options, template)

    def _run(
        self,
        batch: list[_Window],
        pending: dict[int, _Pending],
        options: TranscribeOptions,
        template: str,
    ) -> Iterator[Transcription]:
        try:
            timings = self._generate(batch, options, template)
        except (RuntimeError, ValueError) as error:  # e.g. out of memory: fail these inputs only
            timings = {}
            for window in batch:
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                pending[
                    window.owner
                ].result.error = (
                    f"{pending[window.owner].result.source}: transcription failed: {message}"
                )
        for window in batch:
            entry = pending[window.owner]
            for stage, seconds in timings.items():
                entry.result.timings[stage] += seconds / len(batch)
            entry.remaining -= 1
            window.waveform = None  # the batch is done with it
            if entry.remaining == 0:
                del pending[window.owner]
                yield _assemble(entry)

    @torch.inference_mode()
    def _generate(
        self, batch: list[_Window], options: TranscribeOptions, template: str
    ) -> dict[str, float]:
        started = time.perf_counter()
        features, feature_lengths = log_mel([window.waveform.to(self.device) for window in batch])
        counts = self.model.audio_token_counts(features, feature_lengths).tolist()
        prompts = [prompt_ids(self.tokenizer, template, n) for n in counts]
        features_seconds = time.perf_counter() - started
        output = generate(
            self.runner,
            prompts,
            features.to(self.dtype),
            feature_lengths,
            max_new_tokens=options.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=_pad_id(self.tokenizer),
            num_beams=options.num_beams,
        )
        for window, sequence in zip(batch, output.sequences, strict=True):
            window.text = self.tokenizer.decode(sequence, skip_special_tokens=True).strip()
        return {
            "features": features_seconds,
            "prefill": output.prefill_seconds,
            "decode": output.decode_seconds,
        }


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _assemble(entry: _Pending) -> Transcription:
    """Join a finished input's windows: stitched text, one segment per window."""
    result, windows = entry.result, entry.windows
    shares = stitch([window.text for window in windows])
    # a segment runs from the middle of one overlap to the middle of the next
    bounds = [windows[0].start]
    bounds += [(left.end + right.start) / 2 for left, right in itertools.pairwise(windows)]
    bounds += [windows[-1].end]
    result.segments = [
        Segment(start / SAMPLE_RATE, end / SAMPLE_RATE, text)
        for start, end, text in zip(bounds[:-1], bounds[1:], shares, strict=True)
        if text
    ]
    result.text = " ".join(segment.text for segment in result.segments)
    result.timings["total"] = math.fsum(result.timings[stage] for stage in STAGES)
    return result
