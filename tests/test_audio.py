"""Audio front end: file loading and its errors, log-mel against the reference, splitting."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import torch

from fms_speech.audio import (
    MIN_SAMPLES,
    N_FFT,
    SAMPLE_RATE,
    AudioError,
    load_audio,
    log_mel,
    log_mel_padded,
    prepare_waveform,
    split_audio,
)
from fms_speech.synthesis import synthesize, write_audio

DATA = Path(__file__).parent / "data"
CLIPS = ["hello", "short", "numbers"]
REFERENCE_TOLERANCE = 1e-4  # absolute, vs the reference extractor's fixtures
BATCH_TOLERANCE = 1e-6  # absolute, a clip in a batch vs the same clip alone
DURATION_TOLERANCE = 0.05  # seconds; mp3 encoder delay and padding included


def fixture(name: str) -> dict:
    return dict(np.load(DATA / f"{name}.npz"))


@pytest.fixture(scope="module")
def speech():
    return synthesize("hello world")


@pytest.fixture(scope="module")
def recordings(speech, tmp_path_factory):
    samples, rate = speech
    folder = tmp_path_factory.mktemp("recordings")
    paths = {}
    for format in ["wav", "flac", "ogg", "mp3"]:
        paths[format] = folder / f"hello.{format}"
        write_audio(paths[format], samples, rate, format)
    at_44k = soxr.resample(samples, rate, 44100)
    paths["stereo"] = folder / "stereo.wav"  # right channel at half the level of the left
    write_audio(paths["stereo"], np.stack([at_44k, 0.5 * at_44k], axis=1), 44100, "wav")
    return paths


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n].numpy(), b[:n].numpy())[0, 1])


@pytest.mark.parametrize("format", ["wav", "flac", "ogg", "mp3", "stereo"])
def test_formats_load_as_mono_16k_float32(recordings, speech, format):
    samples, rate = speech
    waveform = load_audio(recordings[format])
    assert waveform.dtype == torch.float32 and waveform.ndim == 1
    assert abs(len(waveform) / SAMPLE_RATE - len(samples) / rate) <= DURATION_TOLERANCE


def test_formats_agree(recordings):
    wav, flac = load_audio(recordings["wav"]), load_audio(recordings["flac"])
    assert torch.equal(wav, flac)  # same 16-bit PCM, same resampler
    for lossy in ["ogg", "mp3"]:
        assert correlation(wav, load_audio(recordings[lossy])) > 0.95


def test_channels_are_averaged(recordings):
    mono, stereo = load_audio(recordings["wav"]), load_audio(recordings["stereo"])
    n = min(len(mono), len(stereo))
    mono, stereo = mono[:n], stereo[:n]
    gain = float(stereo @ mono / (mono @ mono))  # least squares: stereo ~ gain * mono
    assert gain == pytest.approx(0.75, abs=0.01)  # (1 + 0.5) / 2
    assert correlation(mono, stereo) > 0.999


def test_resampling_keeps_a_tone():
    seconds = np.arange(8000) / 8000
    waveform = prepare_waveform(np.sin(2 * np.pi * 440 * seconds), 8000)
    expected = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert waveform.shape == (16000,) and waveform.dtype == torch.float32
    assert np.abs(waveform.numpy() - expected)[1000:-1000].max() < 1e-3  # edges ring


def test_prepare_waveform_scales_integers_and_keeps_16k_floats():
    integers = np.tile(np.array([16384, -32768], np.int16), MIN_SAMPLES)
    assert prepare_waveform(integers, SAMPLE_RATE)[:2].tolist() == [0.5, -1.0]
    floats = torch.rand(MIN_SAMPLES) - 0.5
    assert torch.equal(prepare_waveform(floats, SAMPLE_RATE), floats)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((2, 16000)), r"shape \(2, 16000\) has more channels than samples"),
        (np.zeros((4, 4, 4)), r"expected \(samples,\) or \(samples, channels\)"),
        (np.zeros(0), "it contains no audio samples"),
        (np.zeros(MIN_SAMPLES - 1), f"it is too short .*at least {MIN_SAMPLES} samples"),
        (np.array([0.0] * 1000 + [np.nan]), "it contains NaN or infinite samples"),
    ],
)
def test_prepare_waveform_errors(array, message):
    with pytest.raises(AudioError, match=f"^Cannot load the audio array: {message}"):
        prepare_waveform(array, SAMPLE_RATE)


def _truncated(path: Path, speech, format: str) -> None:
    write_audio(path, *speech, format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _float_wav_with(value):
    def make(path, speech):
        samples = speech[0].copy()
        samples[1000] = value
        write_audio(path, samples, speech[1], "wav-float")

    return make


BAD_FILES = {
    "missing.wav": (lambda path, speech: None, "no such file"),
    "folder.wav": (lambda path, speech: path.mkdir(), "it is a directory"),
    "text.wav": (
        lambda path, speech: path.write_text("not audio\n" * 100),
        r"not audio that libsndfile can read \(Format not recognised\)",
    ),
    "truncated.wav": (lambda path, s: _truncated(path, s, "wav"), "truncated or corrupt"),
    "truncated.flac": (lambda path, s: _truncated(path, s, "flac"), "truncated or corrupt"),
    "truncated.ogg": (lambda path, s: _truncated(path, s, "ogg"), "truncated or corrupt"),
    "truncated.mp3": (lambda path, s: _truncated(path, s, "mp3"), "truncated or corrupt"),
    "empty.wav": (
        lambda path, speech: write_audio(path, np.zeros(0, np.float32), SAMPLE_RATE, "wav"),
        "contains no audio samples",
    ),
    "short.wav": (
        lambda path, speech: write_audio(path, speech[0][:200], SAMPLE_RATE, "wav"),
        r"too short \(0.0125 s; at least 400 samples, 25 ms, are needed\)",
    ),
    "nan.wav": (_float_wav_with(np.nan), "contains NaN or infinite samples"),
    "inf.wav": (_float_wav_with(-np.inf), "contains NaN or infinite samples"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_raise_one_sentence(tmp_path, speech, name):
    make, reason = BAD_FILES[name]
    path = tmp_path / name
    make(path, speech)
    with pytest.raises(AudioError) as error:
        load_audio(path)
    message = str(error.value)
    assert message.startswith(f"Cannot load '{path}': ")
    assert message.endswith(".") and "\n" not in message
    assert re.search(reason, message), message


def test_truncation_check_accepts_complete_files(recordings):
    for path in recordings.values():
        load_audio(path)  # raises if a complete file looked truncated


def _drop_first_mpeg2_frame(data: bytes) -> bytes:
    """An MP3 stream without its first frame, which holds LAME's Xing/Info length tag."""
    kbps = [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160][data[2] >> 4]
    rate = [22050, 24000, 16000][(data[2] >> 2) & 3]
    padding = (data[2] >> 1) & 1
    return data[72 * kbps * 1000 // rate + padding :]


def test_mp3_without_length_tag_is_not_called_truncated(tmp_path, speech):
    """Without a tag libsndfile guesses the length from the first frame's bitrate; with a quiet
    start (low bitrate) it promises several times the samples there are."""
    samples, rate = speech
    path = tmp_path / "untagged.mp3"
    soundfile.write(path, samples, rate, format="MP3", bitrate_mode="VARIABLE")
    path.write_bytes(_drop_first_mpeg2_frame(path.read_bytes()))
    with soundfile.SoundFile(path) as sound:
        assert sound.frames > 2 * len(samples)  # the guess
    seconds = len(load_audio(path)) / SAMPLE_RATE
    # without the tag nothing trims the encoder delay and padding (about 65 ms here)
    assert seconds == pytest.approx(len(samples) / rate, abs=0.1)


@pytest.mark.parametrize("name", CLIPS)
def test_log_mel_matches_reference(name):
    clip = fixture(name)
    features, lengths = log_mel([torch.from_numpy(clip["audio"])])
    expected = torch.from_numpy(clip["input_features"])
    assert features.shape == (1, *expected.shape) and features.dtype == torch.float32
    assert lengths.tolist() == [len(expected)] and lengths.dtype == torch.int64
    assert (features[0] - expected).abs().max() <= REFERENCE_TOLERANCE


def test_log_mel_batch_gives_each_clip_what_it_gets_alone():
    clips = [fixture(name) for name in CLIPS]
    waveforms = [torch.from_numpy(clip["audio"]) for clip in clips]
    features, lengths = log_mel(waveforms)
    assert lengths.tolist() == [(len(w) // 160 + 1) // 2 for w in waveforms]
    for row, (clip, waveform) in enumerate(zip(clips, waveforms, strict=True)):
        n = lengths[row]
        alone = log_mel([waveform])[0][0]
        assert (features[row, :n] - alone).abs().max() <= BATCH_TOLERANCE
        expected = torch.from_numpy(clip["input_features"])
        assert (features[row, :n] - expected).abs().max() <= REFERENCE_TOLERANCE
        assert not features[row, n:].any()


def test_samples_past_a_clip_never_reach_its_features():
    waveforms = [torch.randn(n) for n in (4000, 1234, 999)]
    features, lengths = log_mel(waveforms)
    pad = N_FFT // 2
    garbage = 1e4 * torch.randn(len(waveforms), 4000 + 2 * pad)  # loud, where zeros would be
    for row, waveform in enumerate(waveforms):
        garbage[row, : len(waveform) + 2 * pad] = torch.nn.functional.pad(
            waveform[None], (pad, pad), mode="reflect"
        )[0]
    num_samples = torch.tensor([len(w) for w in waveforms])
    garbage_features, garbage_lengths = log_mel_padded(garbage, num_samples)
    assert torch.equal(garbage_lengths, lengths)
    assert (garbage_features - features).abs().max() <= BATCH_TOLERANCE


def test_reference_batch_leaks_padding_into_short_clips():
    """The reference pads with zeros before its spectrogram; ours is batch invariant."""
    reference = torch.from_numpy(fixture("batch")["input_features"])
    features, lengths = log_mel([torch.from_numpy(fixture(n)["audio"]) for n in CLIPS])
    longest = CLIPS.index("numbers")  # no padding: the reference batch is right for it
    assert (features[longest] - reference[longest]).abs().max() <= 1e-4
    short, n = CLIPS.index("short"), lengths[CLIPS.index("short")]
    alone = torch.from_numpy(fixture("short")["input_features"])
    # its last frames see zeros instead of their reflection
    assert (reference[short, :n] - alone).abs().max() > 1e-2
    assert (features[short, :n] - alone).abs().max() <= REFERENCE_TOLERANCE


def test_log_mel_lengths_at_the_edges():
    sizes = [MIN_SAMPLES, 479, 480, 640, 16000]
    features, lengths = log_mel([torch.randn(n) for n in sizes])
    assert lengths.tolist() == [1, 1, 2, 2, 50]  # (n // 160 + 1) // 2
    assert features.shape == (len(sizes), 50, 160)


def test_log_mel_rejects_clips_shorter_than_a_window():
    with pytest.raises(AudioError, match=f"at least {MIN_SAMPLES} samples, got {MIN_SAMPLES - 1}"):
        log_mel([torch.randn(1000), torch.randn(MIN_SAMPLES - 1)])


def _noise(seconds: float, rate: int = SAMPLE_RATE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(int(seconds * rate), generator=generator)


def check_ranges(ranges, total, window_seconds=30.0, overlap_seconds=1.0, rate=SAMPLE_RATE):
    window, overlap = window_seconds * rate, overlap_seconds * rate
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    for (start, end), (next_start, next_end) in zip(ranges, ranges[1:], strict=False):
        assert start < next_start <= end < next_end
        assert next_start == end - overlap
    for start, end in ranges:
        assert max(MIN_SAMPLES, overlap) <= end - start <= window


def test_split_keeps_short_audio_whole():
    assert split_audio(_noise(30.0)) == [(0, 30 * SAMPLE_RATE)]
    assert split_audio(_noise(0.5)) == [(0, SAMPLE_RATE // 2)]


def test_split_cuts_in_silence():
    waveform = _noise(80.0)
    gaps = [(27.0, 27.3), (53.0, 53.2)]  # inside the last 5 s of the first two windows
    for begin, end in gaps:
        waveform[int(begin * SAMPLE_RATE) : int(end * SAMPLE_RATE)] = 0
    ranges = split_audio(waveform)
    check_ranges(ranges, len(waveform))
    for (_, cut), (begin, end) in zip(ranges, gaps, strict=False):
        assert begin * SAMPLE_RATE < cut < end * SAMPLE_RATE
    assert len(ranges) == 3


@pytest.mark.parametrize("seconds", [30.01, 59.0, 95.3, 301.7])
@pytest.mark.parametrize(
    "window_seconds, overlap_seconds, rate",
    [(30.0, 1.0, SAMPLE_RATE), (10.0, 0.0, SAMPLE_RATE), (4, 1.5, SAMPLE_RATE), (20, 2, 8000)],
)
def test_split_covers_overlaps_and_bounds(seconds, window_seconds, overlap_seconds, rate):
    waveform = _noise(seconds, rate) * torch.linspace(0.1, 2.0, int(seconds * rate))
    ranges = split_audio(waveform, window_seconds, overlap_seconds, sample_rate=rate)
    check_ranges(ranges, len(waveform), window_seconds, overlap_seconds, rate)


def test_split_never_leaves_a_tiny_tail():
    window = 30 * SAMPLE_RATE
    waveform = _noise(30.0 + 100 / SAMPLE_RATE)
    waveform[window - 300 :] = 0  # the quietest spot is right at the end
    ranges = split_audio(waveform, overlap_seconds=0.0)
    check_ranges(ranges, len(waveform), overlap_seconds=0.0)
    assert ranges[-1][1] - ranges[-1][0] >= MIN_SAMPLES


def test_split_rejects_overlap_as_long_as_the_window():
    with pytest.raises(ValueError, match="overlap_seconds < window_seconds"):
        split_audio(_noise(60.0), window_seconds=10.0, overlap_seconds=10.0)


HOUR = """
import json, resource, torch
torch.set_num_threads(1)  # the measurement is of memory; spare the shared cores
from fms_speech.audio import split_audio
waveform = torch.randn(57_600_000)  # an hour at 16 kHz
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ranges = split_audio(waveform)
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(growth, waveform.numel() * waveform.element_size(), json.dumps(ranges))
"""


def test_split_an_hour_without_copying_it():
    result = subprocess.run(
        [sys.executable, "-c", HOUR], capture_output=True, text=True, check=True
    )
    growth, waveform_bytes, ranges = result.stdout.split(maxsplit=2)
    ranges = [tuple(r) for r in json.loads(ranges)]
    check_ranges(ranges, 57_600_000)
    assert 3600 / 30 < len(ranges) < 3600 / 24  # windows of 24 to 30 s
    assert int(growth) < int(waveform_bytes) / 4  # peak memory: less than a quarter copy
