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

import itertools
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fms.models import get_model

from fms_speech.audio import (
    SAMPLE_RATE,
    AudioError,
    load_audio,
    log_mel,
    prepare_waveform,
    split_audio,
)
from fms_speech.compile import compile_model
from fms_speech.generation import generate
from fms_speech.prompts import chat_text, instruction, load_tokenizer, prompt_ids
from fms_speech.stitch import stitch

AudioInput = str | Path | np.ndarray | torch.Tensor
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STAGES = ("load", "features", "prefill", "decode")


class CheckpointError(ValueError):
    """A checkpoint directory that fms-speech cannot run."""


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
class _Request:
    template: str  # the chat-templated prompt with one <|audio|>
    batch_size: int
    max_new_tokens: int
    num_beams: int
    window_seconds: float
    overlap_seconds: float
    max_audio_seconds: float | None
    sample_rate: int


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


def check_checkpoint(model_dir: str | Path) -> Path:
    """The directory, if it holds a Granite Speech config, weights and a tokenizer."""
    directory = Path(model_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json: not a checkpoint directory")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise CheckpointError(f"{config_path} is not a valid JSON config") from None
    if model_type != "granite_speech":
        raise CheckpointError(
            f"{directory} holds a {model_type!r} model; fms-speech runs 'granite_speech' ones"
        )
    weights = [p for p in directory.glob("*.safetensors") if not p.name.startswith("adapter")]
    if not weights:
        raise CheckpointError(f"{directory} has no model weights (*.safetensors)")
    if not any(
        (directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        raise CheckpointError(f"{directory} has no tokenizer (tokenizer.json)")
    return directory


def _source_name(item: AudioInput, index: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"array {index}"


class Transcriber:
    """A loaded checkpoint (model, tokenizer) ready to transcribe or translate audio."""

    def __init__(self, model, tokenizer, device: torch.device, dtype: torch.dtype, compile: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.compile = compile
        self.runner = compile_model(model) if compile else model

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        compile: bool = False,
    ) -> "Transcriber":
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
            model = get_model(
                "hf_pretrained", model_path=str(directory), device_type=device.type, data_type=dtype
            )
        except (ValueError, KeyError, FileNotFoundError, OSError) as error:
            raise CheckpointError(f"cannot load the model in {directory}: {error}") from None
        return cls(model.eval(), tokenizer, device, dtype, compile)

    # ---- the public entry point

    def transcribe(
        self,
        inputs: AudioInput | Iterable[AudioInput],
        *,
        errors: str = "raise",
        progress=None,
        **options,
    ) -> list[Transcription]:
        """One Transcription per input, in the inputs' order; `options` as for `stream`.

        errors="raise" raises the first bad input's AudioError; errors="record" stores it in
        that input's `error` and goes on. `progress` (e.g. a tqdm bar) advances per input.
        """
        if errors not in ("raise", "record"):
            raise ValueError(f"errors must be 'raise' or 'record', not {errors!r}")
        results = []
        for result in self.stream(inputs, **options):
            if result.error is not None and errors == "raise":
                raise AudioError(result.error)
            results.append(result)
            if progress is not None:
                progress.update(1)
        return sorted(results, key=lambda result: result.index)

    def stream(
        self,
        inputs: AudioInput | Iterable[AudioInput],
        *,
        batch_size: int = 8,
        task: str = "transcribe",
        language: str | None = None,
        prompt: str | None = None,
        max_new_tokens: int = 200,
        num_beams: int = 1,
        window_seconds: float = 30.0,
        overlap_seconds: float = 1.0,
        max_audio_seconds: float | None = None,
        sample_rate: int = SAMPLE_RATE,
    ) -> Iterator[Transcription]:
        """Each input's Transcription as soon as it is finished (failed ones at once).

        Inputs are paths or 1-D arrays at `sample_rate`. Audio longer than `window_seconds` is
        cut into windows that overlap by `overlap_seconds`; `batch_size` windows run together.
        """
        if batch_size < 1 or max_new_tokens < 1 or num_beams < 1:
            raise ValueError("batch_size, max_new_tokens and num_beams must be at least 1")
        if not 0 <= overlap_seconds < window_seconds / 2:
            raise ValueError("the overlap must be at least 0 s and below half the window")
        if max_audio_seconds is not None and max_audio_seconds <= 0:
            raise ValueError("the longest audio allowed must be more than 0 s")
        request = _Request(
            chat_text(self.tokenizer, instruction(task, language, prompt)),
            batch_size,
            max_new_tokens,
            num_beams,
            window_seconds,
            overlap_seconds,
            max_audio_seconds,
            sample_rate,
        )
        single = isinstance(inputs, (str, Path, np.ndarray, torch.Tensor))
        return self._stream([inputs] if single else inputs, request)

    # ---- streaming windows through the model

    def _load(self, item: AudioInput, sample_rate: int) -> torch.Tensor:
        if isinstance(item, (str, Path)):
            return load_audio(item)
        return prepare_waveform(item, sample_rate)

    def _stream(self, items: Iterable[AudioInput], request: _Request) -> Iterator[Transcription]:
        pending: dict[int, _Pending] = {}
        queue: list[_Window] = []
        for index, item in enumerate(items):
            result = Transcription(_source_name(item, index), index)
            result.timings = dict.fromkeys(STAGES, 0.0)
            started = time.perf_counter()
            try:
                waveform = self._load(item, request.sample_rate)
                result.duration = waveform.numel() / SAMPLE_RATE
                limit = request.max_audio_seconds
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
            ranges = split_audio(waveform, request.window_seconds, request.overlap_seconds)
            windows = [_Window(index, start, end, waveform[start:end]) for start, end in ranges]
            pending[index] = _Pending(result, windows, len(windows))
            queue.extend(windows)
            while len(queue) >= request.batch_size:
                batch, queue = queue[: request.batch_size], queue[request.batch_size :]
                yield from self._run(batch, pending, request)
        while queue:
            batch, queue = queue[: request.batch_size], queue[request.batch_size :]
            yield from self._run(batch, pending, request)

    def _run(
        self, batch: list[_Window], pending: dict[int, _Pending], request: _Request
    ) -> Iterator[Transcription]:
        try:
            timings = self._generate(batch, request)
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
    def _generate(self, batch: list[_Window], request: _Request) -> dict[str, float]:
        started = time.perf_counter()
        features, feature_lengths = log_mel([window.waveform.to(self.device) for window in batch])
        counts = self.model.audio_token_counts(features, feature_lengths).tolist()
        prompts = [prompt_ids(self.tokenizer, request.template, n) for n in counts]
        features_seconds = time.perf_counter() - started
        output = generate(
            self.runner,
            prompts,
            features.to(self.dtype),
            feature_lengths,
            max_new_tokens=request.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=_pad_id(self.tokenizer),
            num_beams=request.num_beams,
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
