"""Audio front end: loading, log-mel features and splitting long recordings.

`load_audio` turns a file into the model's input signal (mono float32 at 16 kHz) and raises
`AudioError`, with one sentence naming the file, for anything it cannot use. `log_mel` computes
the reference extractor's features (transformers `GraniteSpeechFeatureExtractor`) in torch, one
clip at a time in spirit: unlike the reference, a clip in a padded batch gets exactly the features
it gets alone. `log_mel_deltas` does the same for granite_speech5 (`GraniteSpeech5FeatureExtractor`:
log-mel and its deltas). `split_audio` cuts recordings longer than a window at quiet points.
"""

import math
import os
import re
from collections.abc import Sequence

import numpy as np
import soundfile
import soxr
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
HOP_LENGTH = 160
N_FFT = 512
WIN_LENGTH = 400
N_MELS = 80
# The model's input: two 10 ms log-mel frames stacked per row, so 160 values at 50 rows/s
FEATURE_DIM = 2 * N_MELS
FRAMES_PER_SECOND = SAMPLE_RATE // (2 * HOP_LENGTH)
# granite_speech5's input: each 10 ms frame's log-mel and its delta, two frames stacked per row
DELTA_FEATURE_DIM = 4 * N_MELS
# One analysis window (25 ms): the shortest clip that yields a feature row. Anything shorter
# would also be shorter than the reflect padding (N_FFT // 2) that the spectrogram needs.
MIN_SAMPLES = WIN_LENGTH
# The per-clip dynamic range kept by the reference: 8 decades of power below the loudest bin.
DYNAMIC_RANGE = 8.0
# Placeholder sizes that streaming writers put in a WAV header before they know the length.
_UNKNOWN_WAV_SIZES = (0xFFFFFFFF, 0x7FFFFFFF)


class AudioError(ValueError):
    """Audio that cannot be used; the message is one sentence naming the source."""


def load_audio(path: str | os.PathLike) -> torch.Tensor:
    """Read an audio file (wav, flac, ogg, mp3, ...) as mono float32 at 16 kHz, shape (samples,)."""
    name = f"'{os.fspath(path)}'"
    if not os.path.exists(path):
        raise AudioError(f"Cannot load {name}: no such file.")
    if os.path.isdir(path):
        raise AudioError(f"Cannot load {name}: it is a directory, not an audio file.")
    samples, sample_rate = _read(path, name)
    return prepare_waveform(samples, sample_rate, source=name)


def prepare_waveform(
    array: np.ndarray | torch.Tensor, sample_rate: int, *, source: str = "the audio array"
) -> torch.Tensor:
    """Check audio given as (samples,) or (samples, channels) and make it mono float32 at 16 kHz.

    Integer samples are scaled to [-1, 1]. `source` names the audio in error messages.
    """
    samples = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if samples.ndim not in (1, 2):
        raise AudioError(
            f"Cannot load {source}: expected (samples,) or (samples, channels), "
            f"got shape {tuple(samples.shape)}."
        )
    if samples.shape[0] == 0:
        raise AudioError(f"Cannot load {source}: it contains no audio samples.")
    if samples.ndim == 2 and samples.shape[1] > samples.shape[0]:
        raise AudioError(
            f"Cannot load {source}: shape {tuple(samples.shape)} has more channels than samples "
            "(expected (samples, channels))."
        )
    samples = _to_float32(samples)
    if not np.isfinite(samples).all():
        raise AudioError(f"Cannot load {source}: it contains NaN or infinite samples.")
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float32)
    if sample_rate != SAMPLE_RATE:
        samples = soxr.resample(samples, sample_rate, SAMPLE_RATE, quality="HQ")
    if samples.shape[0] < MIN_SAMPLES:
        raise AudioError(
            f"Cannot load {source}: it is too short ({samples.shape[0] / SAMPLE_RATE:.4f} s; "
            f"at least {MIN_SAMPLES} samples, {1000 * MIN_SAMPLES // SAMPLE_RATE} ms, are needed)."
        )
    return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))


def _to_float32(samples: np.ndarray) -> np.ndarray:
    if np.issubdtype(samples.dtype, np.integer):
        full_scale = 2 ** (8 * samples.dtype.itemsize - 1)
        if np.issubdtype(samples.dtype, np.unsignedinteger):  # 8-bit PCM is unsigned, mid 128
            return (samples.astype(np.float64) / full_scale - 1.0).astype(np.float32)
        return (samples.astype(np.float64) / full_scale).astype(np.float32)
    return samples.astype(np.float32, copy=False)


def _read(path: str | os.PathLike, name: str) -> tuple[np.ndarray, int]:
    try:
        sound = soundfile.SoundFile(path)
    except soundfile.LibsndfileError as error:
        reason = f"it is not audio that libsndfile can read ({_libsndfile_reason(error)})"
        raise AudioError(f"Cannot load {name}: {reason}.") from None
    with sound:
        try:
            samples = sound.read(dtype="float32", always_2d=True)
        except soundfile.LibsndfileError as error:
            reason = f"the file is truncated or corrupt ({_libsndfile_reason(error)})"
            raise AudioError(f"Cannot load {name}: {reason}.") from None
        problem = _truncation(path, sound.format, sound.extra_info, sound.frames, len(samples))
    if problem:
        raise AudioError(f"Cannot load {name}: the file is truncated or corrupt ({problem}).")
    return samples, sound.samplerate


def _libsndfile_reason(error: soundfile.LibsndfileError) -> str:
    return error.error_string.strip().rstrip(".")


def _truncation(path, file_format: str, log: str, declared: int, read: int) -> str | None:
    """Why the file lost its end, or None. libsndfile reads what is there without complaint."""
    # WAV: libsndfile shrinks the data chunk to the bytes present and logs what the header said.
    for promised, present in re.findall(r"^data\s*:\s*(\d+) \(should be (\d+)\)", log, re.M):
        if int(promised) > int(present) and int(promised) not in _UNKNOWN_WAV_SIZES:
            return f"the header promises {promised} data bytes, the file holds {present}"
    if "File ended unexpectedly" in log:  # Ogg without its last page
        return "the stream ends without its last page"
    # An MP3 length is exact only with a Xing/Info/VBRI tag; otherwise it is a bitrate guess.
    if read < declared and (file_format != "MP3" or _has_mp3_length_tag(path)):
        return f"the header promises {declared} samples, the file holds {read}"
    return None


def _has_mp3_length_tag(path) -> bool:
    with open(path, "rb") as file:
        head = file.read(10)
        offset = 0
        if head[:3] == b"ID3" and len(head) == 10:  # skip the ID3v2 tag (syncsafe size)
            offset = 10 + sum((byte & 0x7F) << (7 * (3 - i)) for i, byte in enumerate(head[6:10]))
        file.seek(offset)
        first_frame = file.read(2048)
    return any(tag in first_frame for tag in (b"Xing", b"Info", b"VBRI"))


def mel_filterbank(
    n_freqs: int = N_FFT // 2 + 1,
    n_mels: int = N_MELS,
    sample_rate: int = SAMPLE_RATE,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Triangular HTK mel filters from 0 Hz to Nyquist, unnormalised: (n_freqs, n_mels)."""
    freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64, device=device)
    mel_max = 2595.0 * np.log10(1.0 + (sample_rate / 2) / 700.0)
    mels = torch.linspace(0.0, mel_max, n_mels + 2, dtype=torch.float64, device=device)
    corners = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)  # filter edges and centres, in Hz
    widths = corners.diff()
    offsets = corners[None, :] - freqs[:, None]  # (n_freqs, n_mels + 2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return torch.minimum(rising, falling).clamp(min=0).to(torch.float32)


def log_mel(waveforms: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of 16 kHz mono clips: (B, T, FEATURE_DIM) float32, lengths (B,) int64.

    Each clip's features are what the reference extractor computes for it alone; padded rows
    are zero. feature_lengths[b] = (samples_b // HOP_LENGTH + 1) // 2 (FRAMES_PER_SECOND).
    """
    shortest = min(w.shape[0] for w in waveforms)
    if shortest < MIN_SAMPLES:
        raise AudioError(f"log_mel needs clips of at least {MIN_SAMPLES} samples, got {shortest}.")
    pad = N_FFT // 2
    # Each clip gets its own reflect padding; the batch's zero padding only follows it.
    padded = [F.pad(w.to(torch.float32)[None], (pad, pad), mode="reflect")[0] for w in waveforms]
    batch = torch.nn.utils.rnn.pad_sequence(padded, batch_first=True)
    num_samples = torch.tensor([w.shape[0] for w in waveforms], device=batch.device)
    return log_mel_padded(batch, num_samples)


def log_mel_padded(
    padded: torch.Tensor, num_samples: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`log_mel` of clips already reflect-padded by N_FFT // 2 on both sides, then zero-padded.

    padded: (B, max_samples + N_FFT); num_samples: (B,) clip lengths before padding.
    """
    logmel = _log_power_mel(padded)  # (B, T_mel, 80)
    num_frames = num_samples // HOP_LENGTH + 1
    logmel = _compress(logmel, num_frames)

    batch, mel_frames, n_mels = logmel.shape
    pairs = mel_frames // 2  # an odd last frame is dropped
    features = logmel[:, : 2 * pairs].reshape(batch, pairs, 2 * n_mels)
    feature_lengths = num_frames // 2
    return _zero_padding_rows(features, feature_lengths), feature_lengths


def log_mel_deltas(waveforms: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """granite_speech5's features of 16 kHz mono clips: (B, T, DELTA_FEATURE_DIM), lengths (B,).

    Row k of a clip is [mel(2k), delta(2k), mel(2k+1), delta(2k+1)] (80 values each), where
    delta(t) = (mel(t + 1) - mel(t - 1)) / 2 with the clip's end frames repeated; a clip of n
    samples has ceil((n // HOP_LENGTH) / 2) rows. Each clip's features are what the reference
    extractor computes for it alone; padded rows are zero.
    """
    shortest = min(w.shape[0] for w in waveforms)
    if shortest < MIN_SAMPLES:
        raise AudioError(
            f"log_mel_deltas needs clips of at least {MIN_SAMPLES} samples, got {shortest}."
        )
    num_samples = torch.tensor([w.shape[0] for w in waveforms])
    # the reference completes an odd last pair of frames: 2 * ceil(frames / 2) frames, which
    # needs (frames - 1) * HOP_LENGTH + 1 samples; a clip short of that gets zeros appended
    # (before its reflect padding, as the reference pads the waveform)
    num_frames = 2 * ((num_samples // HOP_LENGTH + 1) // 2)
    needed = (num_frames - 1) * HOP_LENGTH + 1
    pad = N_FFT // 2
    padded = [
        F.pad(F.pad(w.to(torch.float32), (0, max(0, n - w.shape[0])))[None], (pad, pad), "reflect")[
            0
        ]
        for w, n in zip(waveforms, needed.tolist(), strict=True)
    ]
    batch = torch.nn.utils.rnn.pad_sequence(padded, batch_first=True)
    num_frames = num_frames.to(batch.device)
    logmel = _compress(_log_power_mel(batch), num_frames)
    frame_index = torch.arange(logmel.shape[1], device=logmel.device)
    # deltas with each clip's own last frame repeated (not the batch's padding)
    following = torch.cat([logmel[:, 1:], logmel[:, -1:]], dim=1)
    is_last = (frame_index[None, :] + 1 >= num_frames[:, None])[..., None]
    following = torch.where(is_last, logmel, following)
    preceding = torch.cat([logmel[:, :1], logmel[:, :-1]], dim=1)
    deltas = (following - preceding) / 2
    frames = torch.cat([logmel, deltas], dim=-1)  # (B, T_mel, 160): mel then delta
    batch_size, mel_frames, width = frames.shape
    pairs = mel_frames // 2
    features = frames[:, : 2 * pairs].reshape(batch_size, pairs, 2 * width)
    feature_lengths = num_frames // 2
    return _zero_padding_rows(features, feature_lengths), feature_lengths


def _log_power_mel(padded: torch.Tensor) -> torch.Tensor:
    """log10 of the HTK mel power spectrogram of reflect-padded clips: (B, T_mel, N_MELS)."""
    window = torch.hann_window(WIN_LENGTH, periodic=True, device=padded.device)
    # torch.stft centres the 400-sample window inside each 512-sample frame, like torchaudio.
    spectrum = torch.stft(
        padded, N_FFT, HOP_LENGTH, WIN_LENGTH, window, center=False, return_complex=True
    )
    power = torch.view_as_real(spectrum).square().sum(-1).transpose(1, 2)  # (B, T_mel, 257)
    filters = mel_filterbank(device=padded.device)
    return (power @ filters).clamp(min=1e-10).log10()


def _compress(logmel: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
    """Floor each clip at DYNAMIC_RANGE below its loudest bin (over its first `num_frames`
    frames, those that see only the clip), then scale: x / 4 + 1."""
    frame_index = torch.arange(logmel.shape[1], device=logmel.device)
    in_clip = frame_index[None, :] < num_frames[:, None]
    loudest = logmel.masked_fill(~in_clip[..., None], -torch.inf).amax(dim=(1, 2))
    return torch.maximum(logmel, (loudest - DYNAMIC_RANGE)[:, None, None]) / 4 + 1


def _zero_padding_rows(features: torch.Tensor, feature_lengths: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(features.shape[1], device=features.device)
    return features.masked_fill(~(rows[None, :] < feature_lengths[:, None])[..., None], 0.0)


# A window's cut is looked for in its last SEARCH_SECONDS, at ENERGY_FRAME resolution.
SEARCH_SECONDS = 5.0
ENERGY_FRAME_SECONDS = 0.025
ENERGY_HOP_SECONDS = 0.010


def split_audio(
    waveform: torch.Tensor,
    window_seconds: float = 30.0,
    overlap_seconds: float = 1.0,
    sample_rate: int = SAMPLE_RATE,
) -> list[tuple[int, int]]:
    """(start, end) sample ranges of at most window_seconds (>= 1) covering `waveform` (samples,).

    A window ends at the quietest 25 ms frame (least energy) of its last 5 s (at most half the
    window less the overlap, for short windows); the next window starts overlap_seconds before
    that cut. The cut is kept far enough from the end that the last window is never shorter
    than overlap_seconds or MIN_SAMPLES (at 16 kHz).
    """
    if window_seconds < 1 or not 0 <= overlap_seconds < window_seconds:
        raise ValueError(
            f"need window_seconds >= 1 and 0 <= overlap_seconds < window_seconds, got "
            f"{window_seconds} and {overlap_seconds}"
        )
    total = waveform.shape[0]
    window = int(window_seconds * sample_rate)
    overlap = int(overlap_seconds * sample_rate)
    search = int(min(SEARCH_SECONDS, (window_seconds - overlap_seconds) / 2) * sample_rate)
    shortest = max(math.ceil(MIN_SAMPLES * sample_rate / SAMPLE_RATE), overlap)
    latest_cut = total + overlap - shortest  # the last window keeps at least `shortest`
    ranges, start = [], 0
    while total - start > window:
        stop = min(start + window, latest_cut)
        cut = _quietest_point(waveform[stop - search : stop], sample_rate) + stop - search
        ranges.append((start, cut))
        start = cut - overlap
    ranges.append((start, total))
    return ranges


def _quietest_point(region: torch.Tensor, sample_rate: int) -> int:
    """Index of the centre of the lowest-energy frame in `region`."""
    frame = int(ENERGY_FRAME_SECONDS * sample_rate)
    hop = int(ENERGY_HOP_SECONDS * sample_rate)
    energy = region.to(torch.float32).unfold(0, frame, hop).square().sum(-1)
    return int(energy.argmin()) * hop + frame // 2
