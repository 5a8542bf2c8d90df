"""Transcription on a small random checkpoint: compilations over mixed-length files, and memory.

    python -m fms_speech.bench.experiments.transcribe            # mixed lengths, eager, compiled
    python -m fms_speech.bench.experiments.transcribe --hour     # also: memory, 10 vs 60 min

Builds the tests' transcription checkpoint with the reference (`fms_speech.testing`),
synthesises speech with eSpeak NG (the bench's clips), and prints per run: wall time, stage
times, graphs compiled and, with --hour, peak resident memory.
"""

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from fms_speech import Transcriber
from fms_speech.audio import SAMPLE_RATE
from fms_speech.bench.inputs import speech_clip
from fms_speech.bench.measure import PeakMemory, compile_counts, timed
from fms_speech.testing.reference import TRANSCRIBE_CONFIG, save_named, save_tokenizer

CPU = torch.device("cpu")


def _clips(count: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` clips of 1–15 s."""
    generator = random.Random(seed)
    return [speech_clip(generator.uniform(1, 15), seed=seed + i) for i in range(count)]


def _run(transcriber: Transcriber, clips, batch_size: int, max_new_tokens: int) -> dict:
    graphs = compile_counts()["graphs"]
    wall, results = timed(
        lambda: transcriber.transcribe(
            [clip.numpy() for clip in clips],
            sample_rate=SAMPLE_RATE,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        ),
        CPU,
    )
    stages = {
        stage: sum(r.timings[stage] for r in results) for stage in ("features", "prefill", "decode")
    }
    return {"wall": wall, **stages, "graphs": compile_counts()["graphs"] - graphs}


def mixed_lengths(directory: Path, files: int, max_new_tokens: int) -> None:
    clips = _clips(files)
    seconds = [len(clip) / SAMPLE_RATE for clip in clips]
    print(f"{files} clips, {min(seconds):.1f}-{max(seconds):.1f} s, {sum(seconds):.0f} s in all")
    for compiled in (False, True):
        torch._dynamo.reset()
        transcriber = Transcriber.from_pretrained(directory, compile=compiled)
        for attempt, batch_size in enumerate((1, 4, 3)):
            run = _run(transcriber, clips, batch_size, max_new_tokens)
            print(
                f"{'compiled' if compiled else 'eager   '} run {attempt} batch {batch_size}: "
                + ", ".join(
                    f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in run.items()
                )
            )


def hour_memory(directory: Path) -> None:
    transcriber = Transcriber.from_pretrained(directory)
    minute = speech_clip(60, seed=1).numpy()
    for minutes in (10, 60):
        audio = np.tile(minute, minutes)
        with PeakMemory(CPU) as memory:
            wall, _ = timed(
                lambda audio=audio: transcriber.transcribe(
                    audio, sample_rate=SAMPLE_RATE, batch_size=8, max_new_tokens=2
                ),
                CPU,
            )
        peak = memory.result["peak_bytes"] / 2**30
        print(f"{minutes} min of audio: peak RSS {peak:.2f} GiB, {wall:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--hour", action="store_true", help="measure memory on 10 and 60 min")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        directory = Path(root) / TRANSCRIBE_CONFIG
        save_named(TRANSCRIBE_CONFIG, directory)
        save_tokenizer(directory)
        mixed_lengths(directory, args.files, args.max_new_tokens)
        if args.hour:
            hour_memory(directory)


if __name__ == "__main__":
    main()
