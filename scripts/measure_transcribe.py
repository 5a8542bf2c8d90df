"""Transcription on a small random checkpoint: compilations over mixed-length files, and memory.

    python scripts/measure_transcribe.py               # mixed-length run, eager then compiled
    python scripts/measure_transcribe.py --hour        # also: peak memory, 10 min vs 60 min

Builds a small checkpoint with the reference (as the tests do), synthesises speech with eSpeak
NG, and prints per run: wall time, stage times, graphs compiled (dynamo's unique_graphs counter)
and peak resident memory.
"""

import argparse
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import conftest  # noqa: E402
from reference import save_tokenizer  # noqa: E402

from fms_speech import Transcriber  # noqa: E402
from fms_speech.synthesis import synthesize  # noqa: E402

WORDS = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "hello",
    "world",
    "quick",
    "brown",
    "fox",
]


def _clips(count: int, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    generator = random.Random(seed)
    clips = []
    for _ in range(count):
        text = " ".join(generator.choice(WORDS) for _ in range(generator.randint(2, 40)))
        clips.append(synthesize(text))
    return clips


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _run(transcriber: Transcriber, clips, batch_size: int, max_new_tokens: int) -> dict:
    graphs = _graphs()
    started = time.perf_counter()
    results = transcriber.transcribe(
        [samples for samples, _ in clips],
        sample_rate=clips[0][1],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    wall = time.perf_counter() - started
    stages = {
        stage: sum(r.timings[stage] for r in results) for stage in ("features", "prefill", "decode")
    }
    return {"wall": wall, **stages, "graphs": _graphs() - graphs}


def mixed_lengths(directory: Path, files: int, max_new_tokens: int) -> None:
    clips = _clips(files)
    seconds = [len(samples) / rate for samples, rate in clips]
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


def _peak_rss_during(work) -> float:
    """Peak resident memory (GiB) of this process while `work` runs, sampled every 50 ms."""
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            with open("/proc/self/statm") as statm:
                peak[0] = max(peak[0], int(statm.read().split()[1]) * resource.getpagesize())
            time.sleep(0.05)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        work()
    finally:
        done.set()
        thread.join()
    return peak[0] / 2**30


def hour_memory(directory: Path) -> None:
    transcriber = Transcriber.from_pretrained(directory)
    sentence = np.concatenate([samples for samples, _ in _clips(20, seed=1)])
    rate = 22050
    for minutes in (10, 60):
        repeats = int(np.ceil(minutes * 60 * rate / len(sentence)))
        audio = np.tile(sentence, repeats)[: minutes * 60 * rate]
        started = time.perf_counter()
        peak = _peak_rss_during(
            lambda audio=audio: transcriber.transcribe(
                audio, sample_rate=rate, batch_size=8, max_new_tokens=2
            )
        )
        wall = time.perf_counter() - started
        print(f"{minutes} min of audio: peak RSS {peak:.2f} GiB, {wall:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--hour", action="store_true", help="measure memory on 10 and 60 min")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        directory = Path(root) / conftest.TRANSCRIBE_CONFIG
        conftest._build(conftest.TRANSCRIBE_CONFIG, directory)
        save_tokenizer(directory)
        mixed_lengths(directory, args.files, args.max_new_tokens)
        if args.hour:
            hour_memory(directory)


if __name__ == "__main__":
    main()
