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

A CTC checkpoint (granite_speech5) runs through `fms_speech.ctc.CTCRunner` instead of prompt and
generation: its windows are joined at word boundaries, its segments carry word timestamps.
"""

import contextlib
import dataclasses
import io
import itertools
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from fms.models import get_model
from transformers import AutoTokenizer

from fms_speech.aot import compiled_runner
from fms_speech.audio import (
    SAMPLE_RATE,
    AudioError,
    load_audio,
    log_mel,
    prepare_waveform,
    split_audio,
)
from fms_speech.checkpoint import (
    CTC_MODEL_TYPES,
    CheckpointError,
    check_checkpoint,
    checkpoint_model_type,
    index_aware_loading,
)
from fms_speech.compile import compile_model
from fms_speech.ctc import (
    CTCRunner,
    TimedWindow,
    WindowWords,
    Word,
    join_windows,
    segments_from_words,
)
from fms_speech.distributed import DistributedError, GenerationBatch, Lockstep, single_rank_group
from fms_speech.generation import GenerationOutput
from fms_speech.models.granite_speech import GraniteSpeech
from fms_speech.models.granite_speech5 import GraniteSpeech5
from fms_speech.prompts import chat_text, instruction, load_tokenizer, prompt_ids
from fms_speech.stitch import stitch

AudioInput = str | Path | np.ndarray | torch.Tensor
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARALLEL_MODES = ("tp", "data")  # one model over the ranks; a model per rank
STAGES = ("load", "features", "prefill", "decode")
SEGMENTATIONS = ("fixed", "vad")


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
    # fixed: overlapping windows cut at quiet points, texts stitched; vad: speech regions
    # found by silero-vad, each its own segment (fms_speech.vad)
    segmentation: str = "fixed"

    def __post_init__(self):
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError("batch_size, max_new_tokens and num_beams must be at least 1")
        if self.window_seconds < 1:
            raise ValueError(f"the window must be at least 1 s, not {self.window_seconds:g} s")
        if not 0 <= self.overlap_seconds < self.window_seconds / 2:
            raise ValueError("the overlap must be at least 0 s and below half the window")
        if self.max_audio_seconds is not None and self.max_audio_seconds <= 0:
            raise ValueError("the longest audio allowed must be more than 0 s")
        if self.segmentation not in SEGMENTATIONS:
            raise ValueError(
                f"unknown segmentation {self.segmentation!r}: choose {' or '.join(SEGMENTATIONS)}"
            )
        self.instruction()  # a PromptError (a ValueError) for a bad task or language

    def instruction(self) -> str:
        """The user message for the model, with its one `<|audio|>`."""
        return instruction(self.task, self.language, self.prompt)


@dataclass
class Segment:
    start: float  # seconds
    end: float
    text: str
    # what the model generated for the segment's window (its seam words included)
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float = 0.0  # per generated token, eos included
    no_speech_prob: float = 0.0  # the model's probability of an empty answer (eos first)
    words: list[Word] = field(default_factory=list)  # with timestamps (CTC models)


@dataclass
class Transcription:
    source: str  # the path, or "array N" for an in-memory input
    index: int = 0  # position among the inputs
    text: str = ""
    segments: list[Segment] = field(default_factory=list)
    duration: float = 0.0  # seconds of audio
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    error: str | None = None  # why this input failed; None when it succeeded

    @property
    def words(self) -> list[Word]:
        """Every word with its start and end (CTC models; empty for the LLM types)."""
        return [word for segment in self.segments for word in segment.words]


@dataclass
class _Window:
    owner: "_Pending"  # the input it is a part of
    start: int  # samples
    end: int
    waveform: torch.Tensor | None  # None once it has run
    text: str = ""
    tokens: list[int] = field(default_factory=list)  # generated ids, eos excluded
    mean_logprob: float = 0.0  # per generated token, eos included
    first_eos_prob: float = 0.0  # the model's probability of an empty answer
    decoded: WindowWords | None = None  # CTC models


@dataclass
class _Pending:
    """An input cut into windows, waiting for them to run: windows of different inputs (with
    different options and prompts) may share a model call if num_beams and max_new_tokens agree.
    """

    result: Transcription
    options: TranscribeOptions
    template: str  # the chat-templated prompt of every window of this input
    windows: list[_Window] = field(default_factory=list)
    remaining: int = 0
    ctc: CTCRunner | None = None  # a CTC model's decoder: its windows join at word boundaries

    @property
    def stitched(self) -> bool:
        """Overlapping windows whose texts are stitched (fixed segmentation)."""
        return self.options.segmentation == "fixed"


def _source_name(item: AudioInput, index: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"array {index}"


def segment_ranges(waveform: torch.Tensor, options: TranscribeOptions) -> list[tuple[int, int]]:
    """The (start, end) sample ranges of `waveform` that run through the model as windows."""
    if options.segmentation == "vad":
        from fms_speech.vad import speech_regions

        return speech_regions(waveform, options.window_seconds)
    return split_audio(waveform, options.window_seconds, options.overlap_seconds)


def resolve_options(options: TranscribeOptions | None, **overrides) -> TranscribeOptions:
    """`options` (or the defaults) with `overrides` applied and checked."""
    return dataclasses.replace(options or TranscribeOptions(), **overrides)


class Transcriber:
    """A loaded checkpoint (model, tokenizer) ready to transcribe or translate audio.

    Tensor-parallel (`from_pretrained(..., parallel="tp")` under torchrun): rank 0 calls
    `transcribe`/`stream` as usual and `close()` when done; every other rank calls `follow()`,
    which runs each batch rank 0 runs (fms_speech.distributed.Lockstep) until rank 0 closes.
    """

    def __init__(
        self,
        model,
        tokenizer,
        device: torch.device,
        dtype: torch.dtype,
        compile: bool,
        tensor_parallel: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.compile = compile
        if compile and not tensor_parallel and type(model) is GraniteSpeech:
            # precompiled artifacts when `fms-speech compile` made them, else just in time
            # (artifacts hold the whole model's kernels, not a rank's shard; the other model
            # types are compiled just in time: `fms-speech compile` refuses them)
            self.runner = compiled_runner(model)
        else:
            self.runner = compile_model(model) if compile else model
        # the model's path: a CTC model has no prompt and no generation
        self.ctc = CTCRunner(model, tokenizer) if isinstance(model, GraniteSpeech5) else None
        self.stages = self.ctc.stages if self.ctc is not None else STAGES
        self.lockstep = Lockstep(self.runner, device) if tensor_parallel else None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        compile: bool = False,
        parallel: str | None = None,
    ) -> "Transcriber":
        """Load a hub-layout checkpoint directory; CheckpointError (one sentence) if unusable.

        In a torchrun process group (fms_speech.distributed.start), `parallel` is "tp" (one
        model split over every rank by FMS's tensor parallelism) or "data" (a whole model on
        each rank); every rank calls this. Without a process group it must be None.
        """
        load_options = _parallel_load_options(parallel)
        directory = check_checkpoint(model_dir)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but this machine has no usable GPU")
        if checkpoint_model_type(directory) in CTC_MODEL_TYPES:
            if parallel == "tp":
                raise ValueError(
                    f"{directory} is a CTC model (granite_speech5): it has no LLM to split over "
                    "the ranks; run it in one process per rank (transcribe --parallel data)"
                )
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        else:
            tokenizer = load_tokenizer(directory)
        try:
            # FMS prints its choices ("using tensor parallel") to stdout, where the text goes
            with index_aware_loading(), contextlib.redirect_stdout(io.StringIO()):
                model = get_model(
                    "hf_pretrained",
                    model_path=str(directory),
                    device_type=device.type,
                    data_type=dtype,
                    **load_options,
                )
        except (ValueError, KeyError, FileNotFoundError, OSError) as error:
            raise CheckpointError(f"cannot load the model in {directory}: {error}") from None
        return cls(model.eval(), tokenizer, device, dtype, compile, parallel == "tp")

    # ---- tensor parallelism: the ranks other than 0

    def follow(self) -> int:
        """Ranks other than 0 of a tensor-parallel Transcriber: run rank 0's batches until it
        calls `close()`; the number of batches run."""
        if self.lockstep is None:
            raise RuntimeError("follow() is for the ranks of a tensor-parallel Transcriber")
        return self.lockstep.follow()

    def close(self) -> None:
        """Rank 0 of a tensor-parallel Transcriber: release the other ranks (no-op otherwise)."""
        if self.lockstep is not None and self.lockstep.leads:
            self.lockstep.close()

    def heartbeat(self) -> None:
        """Rank 0 of a tensor-parallel Transcriber, while idle: keep the other ranks waiting
        (call more often than the process group's timeout; no-op otherwise)."""
        if self.lockstep is not None and self.lockstep.leads:
            self.lockstep.heartbeat()

    def run_generation(self, batch: GenerationBatch, on_tokens=None) -> GenerationOutput:
        """One `generate` call on this rank's model, or on every rank's (tensor parallel)."""
        if self.lockstep is not None:
            return self.lockstep.run(batch, on_tokens)
        return batch.generate(self.runner, on_tokens)

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
        if self.ctc is not None:
            self.ctc.check_options(options)
        single = isinstance(inputs, (str, Path, np.ndarray, torch.Tensor))
        return self._stream([inputs] if single else inputs, options, sample_rate)

    # ---- streaming windows through the model

    def _load(self, item: AudioInput, sample_rate: int) -> torch.Tensor:
        if isinstance(item, (str, Path)):
            return load_audio(item)
        return prepare_waveform(item, sample_rate)

    def prepare(
        self, result: Transcription, waveform: torch.Tensor, options: TranscribeOptions
    ) -> _Pending:
        """Cut a loaded input into windows for `run_windows`; AudioError if it is too long."""
        result.duration = waveform.numel() / SAMPLE_RATE
        limit = options.max_audio_seconds
        if limit is not None and result.duration > limit:
            raise AudioError(
                f"Cannot transcribe '{result.source}': it is {result.duration:.1f} s "
                f"long, more than the {limit:g} s allowed (--max-audio-seconds)."
            )
        # a CTC model has no prompt
        template = "" if self.ctc is not None else chat_text(self.tokenizer, options.instruction())
        entry = _Pending(result, options, template, ctc=self.ctc)
        ranges = segment_ranges(waveform, options)  # none when VAD finds no speech
        entry.windows = [_Window(entry, start, end, waveform[start:end]) for start, end in ranges]
        entry.remaining = len(entry.windows)
        return entry

    def run_windows(self, batch: list[_Window], on_tokens=None) -> list[_Pending]:
        """Run windows (of any inputs) in one model call; return the inputs this batch finished.

        A failed call (e.g. out of memory) records its error in the inputs it touched only.
        on_tokens: see `generate` (greedy only; rows in the order of `batch`).
        """
        try:
            timings = self._generate(batch, on_tokens)
        except DistributedError:  # the ranks are out of step: nothing more can run
            raise
        except (RuntimeError, ValueError) as error:  # e.g. out of memory
            timings = {}
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            for window in batch:
                result = window.owner.result
                result.error = f"{result.source}: transcription failed: {message}"
        finished = []
        for window in batch:
            entry = window.owner
            for stage, seconds in timings.items():
                entry.result.timings[stage] += seconds / len(batch)
            entry.remaining -= 1
            window.waveform = None  # the batch is done with it
            if entry.remaining == 0:
                finished.append(entry)
        return finished

    def _stream(
        self,
        items: Iterable[AudioInput],
        options: TranscribeOptions,
        sample_rate: int,
    ) -> Iterator[Transcription]:
        queue: list[_Window] = []
        for index, item in enumerate(items):
            result = Transcription(_source_name(item, index), index)
            result.timings = dict.fromkeys(self.stages, 0.0)
            started = time.perf_counter()
            try:
                entry = self.prepare(result, self._load(item, sample_rate), options)
            except AudioError as error:
                result.error = str(error)
                yield result
                continue
            result.timings["load"] = time.perf_counter() - started
            if not entry.windows:  # no speech found: an empty transcript
                yield assemble(entry)
                continue
            queue.extend(entry.windows)
            while len(queue) >= options.batch_size:
                batch, queue = queue[: options.batch_size], queue[options.batch_size :]
                yield from map(assemble, self.run_windows(batch))
        while queue:
            batch, queue = queue[: options.batch_size], queue[options.batch_size :]
            yield from map(assemble, self.run_windows(batch))

    def generation_batch(
        self,
        waveforms: list[torch.Tensor],
        templates: list[str],
        num_beams: int,
        max_new_tokens: int,
        eos_token_id: int | None = None,
    ) -> GenerationBatch:
        """One model call's inputs: features, each chat template with its window's audio
        tokens, and the decoding settings (`eos_token_id` -1 disables the end of text)."""
        features, feature_lengths = log_mel([waveform.to(self.device) for waveform in waveforms])
        counts = self.model.audio_token_counts(features, feature_lengths).tolist()
        prompts = [
            prompt_ids(self.tokenizer, template, count)
            for template, count in zip(templates, counts, strict=True)
        ]
        settings = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
            "pad_token_id": _pad_id(self.tokenizer),
            "num_beams": num_beams,
        }
        return GenerationBatch(prompts, features.to(self.dtype), feature_lengths, settings)

    @torch.inference_mode()
    def _generate(self, batch: list[_Window], on_tokens=None) -> dict[str, float]:
        if self.ctc is not None:
            waveforms = [window.waveform for window in batch]
            decoded, timings = self.ctc.run(self.runner, waveforms, self.device, self.dtype)
            for window, window_words in zip(batch, decoded, strict=True):
                window.decoded = window_words
            return timings
        options = batch[0].owner.options
        if any(
            (w.owner.options.num_beams, w.owner.options.max_new_tokens)
            != (options.num_beams, options.max_new_tokens)
            for w in batch
        ):
            raise ValueError("windows of one model call must share num_beams and max_new_tokens")
        started = time.perf_counter()
        batch_inputs = self.generation_batch(
            [window.waveform for window in batch],
            [window.owner.template for window in batch],
            num_beams=options.num_beams,
            max_new_tokens=options.max_new_tokens,
        )
        features_seconds = time.perf_counter() - started
        output = self.run_generation(batch_inputs, on_tokens)
        for window, sequence, mean_logprob, first_eos_prob in zip(
            batch, output.sequences, output.mean_logprobs, output.first_eos_probs, strict=True
        ):
            window.text = self.tokenizer.decode(sequence, skip_special_tokens=True).strip()
            window.tokens = sequence
            window.mean_logprob = mean_logprob
            window.first_eos_prob = first_eos_prob
        return {
            "features": features_seconds,
            "prefill": output.prefill_seconds,
            "decode": output.decode_seconds,
        }


def _parallel_load_options(parallel: str | None) -> dict:
    """get_model's arguments for a `parallel` mode; ValueError if the process group does not
    fit it (checked before anything is read)."""
    if parallel is not None and parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, not {parallel!r}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if parallel is None:
        if world > 1:  # FMS would silently pick tensor parallelism, with no rank following
            raise ValueError(f"a process group of {world} ranks is running: choose parallel")
        return {}
    if not dist.is_initialized():
        raise ValueError(
            f"parallel={parallel!r} needs a process group: launch with torchrun and call "
            "fms_speech.distributed.start first"
        )
    if parallel == "tp":
        return {"distributed_strategy": "tp"}
    return {"group": single_rank_group()}


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def assemble(entry: _Pending) -> Transcription:
    """Join a finished input's windows: stitched text, one segment per window that says something."""
    if entry.ctc is not None:
        return _assemble_ctc(entry, entry.ctc)
    result, windows = entry.result, entry.windows
    if not windows:
        shares, spans = [], []
    elif entry.stitched:
        shares = stitch([window.text for window in windows])
        # a segment runs from the middle of one overlap to the middle of the next
        bounds = [windows[0].start]
        bounds += [(left.end + right.start) / 2 for left, right in itertools.pairwise(windows)]
        bounds += [windows[-1].end]
        spans = list(itertools.pairwise(bounds))
    else:  # disjoint speech regions: each is its own segment, where it really is
        shares = [window.text for window in windows]
        spans = [(window.start, window.end) for window in windows]
    result.segments = [
        Segment(
            start / SAMPLE_RATE,
            end / SAMPLE_RATE,
            text,
            window.tokens,
            window.mean_logprob,
            window.first_eos_prob,
        )
        for (start, end), text, window in zip(spans, shares, windows, strict=True)
        if text
    ]
    result.text = " ".join(segment.text for segment in result.segments)
    result.timings["total"] = math.fsum(result.timings[stage] for stage in STAGES)
    return result


def _assemble_ctc(entry: _Pending, ctc: CTCRunner) -> Transcription:
    """Join a finished input's windows at word boundaries: text, segments split at pauses."""
    result = entry.result
    timed = [
        TimedWindow(window.start / SAMPLE_RATE, window.end / SAMPLE_RATE, window.decoded)
        for window in entry.windows
        if window.decoded is not None  # None: its batch failed (result.error says why)
    ]
    result.text, words = join_windows(timed, ctc.splitter, result.duration)
    result.segments = [
        Segment(group[0].start, group[-1].end, " ".join(word.text for word in group), words=group)
        for group in segments_from_words(words)
    ]
    result.timings["total"] = math.fsum(result.timings[stage] for stage in ctc.stages)
    return result
