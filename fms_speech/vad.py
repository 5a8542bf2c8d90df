"""Speech regions of long audio with silero-vad: where to cut, at the speaker's pauses.

`speech_regions` returns (start, end) sample ranges, each at most the window length, covering
the speech of a 16 kHz waveform; silence between them is left out. A region longer than the
window is split at its longest inner pause (silero-vad's own rule), or hard at the window when
there is none. The model ships in the silero-vad wheel (TorchScript, run on CPU); audio comes
from fms_speech.audio (soundfile), never from silero's torchaudio reader.
"""

import functools
import threading

import torch

from fms_speech.audio import MIN_SAMPLES, SAMPLE_RATE

# silence shorter than this stays inside a region (eSpeak NG pauses ~0.1-0.2 s at commas)
MIN_SILENCE_MS = 300
# speech kept around each region, so that onsets and fades are not cut
SPEECH_PAD_MS = 100
MIN_SPEECH_MS = 150


@functools.cache
def _model():
    from silero_vad import load_silero_vad

    return load_silero_vad(onnx=False)


# the model keeps per-stream state between chunks: one caller at a time
_lock = threading.Lock()


def speech_regions(
    waveform: torch.Tensor, window_seconds: float, sample_rate: int = SAMPLE_RATE
) -> list[tuple[int, int]]:
    """(start, end) sample ranges of speech, each at most window_seconds and at least
    MIN_SAMPLES long, in order and disjoint; [] when there is no speech."""
    from silero_vad import get_speech_timestamps

    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"speech_regions takes {SAMPLE_RATE} Hz audio, not {sample_rate} Hz")
    window = int(window_seconds * sample_rate)
    pad = SPEECH_PAD_MS * sample_rate // 1000
    with _lock, torch.inference_mode():
        timestamps = get_speech_timestamps(
            waveform.to(torch.float32).cpu(),
            _model(),
            sampling_rate=sample_rate,
            min_speech_duration_ms=MIN_SPEECH_MS,
            min_silence_duration_ms=MIN_SILENCE_MS,
            speech_pad_ms=SPEECH_PAD_MS,
            # the padding is added after the split: leave room for it within the window
            max_speech_duration_s=(window - 2 * pad) / sample_rate,
        )
    regions = []
    for stamp in timestamps:
        start, end = int(stamp["start"]), min(int(stamp["end"]), waveform.shape[0])
        if regions and start < regions[-1][1]:  # padding of neighbours may overlap: meet halfway
            middle = (regions[-1][1] + start) // 2
            regions[-1] = (regions[-1][0], middle)
            start = middle
        regions.append((start, end))
    return [
        (start, min(end, start + window)) for start, end in regions if end - start >= MIN_SAMPLES
    ]
