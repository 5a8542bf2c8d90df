"""The Python API: Transcriber.from_pretrained(...).transcribe(...), long audio included."""

import itertools

import numpy as np
import pytest
import torch

from fms_speech import Transcriber
from fms_speech.audio import AudioError, load_audio, prepare_waveform, split_audio
from fms_speech.synthesis import synthesize, write_audio

MAX_NEW_TOKENS = 4
SENTENCES = [
    "hello world",
    "one two three four five six seven eight nine ten",
    "the quick brown fox jumps over the lazy dog",
]


@pytest.fixture(scope="module")
def transcriber(speech_checkpoint):
    return Transcriber.from_pretrained(speech_checkpoint[1])


@pytest.fixture(scope="module")
def clips():
    return [synthesize(text) for text in SENTENCES]


def _texts(results) -> list[str]:
    return [result.text for result in results]


def test_batching_does_not_change_the_text(transcriber, clips):
    arrays = [samples for samples, _ in clips]
    rate = clips[0][1]
    # enough tokens for the random model's texts to tell the clips apart
    one_by_one = transcriber.transcribe(arrays, batch_size=1, sample_rate=rate, max_new_tokens=10)
    together = transcriber.transcribe(arrays, batch_size=3, sample_rate=rate, max_new_tokens=10)
    assert _texts(together) == _texts(one_by_one)
    assert len(set(_texts(together))) > 1  # a text that depends on the clip
    assert [result.source for result in together] == ["array 0", "array 1", "array 2"]


def test_paths_and_arrays_mix_and_results_keep_the_input_order(transcriber, clips, tmp_path):
    samples, rate = clips[1]
    path = tmp_path / "numbers.flac"
    write_audio(path, samples, rate, "flac")
    results = transcriber.transcribe(
        [load_audio(path), str(path)], batch_size=2, max_new_tokens=MAX_NEW_TOKENS
    )
    assert results[0].text == results[1].text
    assert results[1].source == str(path)
    assert results[1].duration == pytest.approx(len(samples) / rate, abs=0.01)


def test_bad_input_raises_or_is_recorded(transcriber, clips, tmp_path):
    good = clips[0][0]
    with pytest.raises(AudioError, match="no such file"):
        transcriber.transcribe([tmp_path / "absent.wav"])
    results = transcriber.transcribe(
        [tmp_path / "absent.wav", good],
        errors="record",
        sample_rate=clips[0][1],
        max_new_tokens=MAX_NEW_TOKENS,
    )
    assert "no such file" in results[0].error and results[0].text == ""
    assert results[1].error is None and results[1].text


def test_results_stream_out_before_all_inputs_are_read(transcriber, clips):
    """What keeps memory flat: an input is finished and released before later ones load."""
    consumed = []

    def inputs():
        for index, (samples, _) in enumerate(clips):
            consumed.append(index)
            yield samples

    stream = transcriber.stream(
        inputs(), batch_size=1, sample_rate=clips[0][1], max_new_tokens=MAX_NEW_TOKENS
    )
    first = next(stream)
    assert first.index == 0 and consumed == [0]
    assert [result.index for result in stream] == [1, 2]


@pytest.fixture(scope="module")
def long_speech():
    """About three minutes of speech with pauses between sentences, at 16 kHz."""
    pieces = []
    for repeat in range(20):
        for text in SENTENCES:
            samples, rate = synthesize(f"{text} {repeat}")
            pieces += [samples, np.zeros(rate // 2, np.float32)]
    samples = np.concatenate(pieces)
    return torch.from_numpy(samples), rate


def test_long_audio_is_transcribed_in_windows_with_segments(transcriber, long_speech):
    samples, rate = long_speech
    result = transcriber.transcribe(
        samples, sample_rate=rate, batch_size=4, max_new_tokens=MAX_NEW_TOKENS
    )[0]
    assert result.duration > 150
    windows = split_audio(prepare_waveform(samples, rate), 30.0, 1.0)
    assert len(windows) >= 6
    # one segment per window that said something; they tile the recording in order
    assert 1 < len(result.segments) <= len(windows)
    assert result.segments[0].start == 0.0
    assert result.segments[-1].end == pytest.approx(result.duration, abs=1e-3)
    for left, right in itertools.pairwise(result.segments):
        assert left.start < left.end <= right.start < right.end
    assert all(segment.end - segment.start <= 30.0 for segment in result.segments)
    assert result.text == " ".join(segment.text for segment in result.segments)
