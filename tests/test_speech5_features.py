"""granite_speech5's features (`log_mel_deltas`) against the reference extractor's fixtures.

tests/data/speech5/*.npz: transformers' `GraniteSpeech5FeatureExtractor` (5.24, torchaudio 2.9.1)
on the clips of tests/data/*.npz (the same `audio`), each alone. In the reference's own padded
batch a clip's last valid row differs from the clip alone (its STFT window and delta see the
batch's zero padding); fms-speech gives each clip in a batch what it gets alone.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from fms_speech.audio import DELTA_FEATURE_DIM, HOP_LENGTH, MIN_SAMPLES, AudioError, log_mel_deltas

DATA = Path(__file__).parent / "data"
CLIPS = ["hello", "short", "numbers"]
REFERENCE_TOLERANCE = 1e-4  # absolute, per clip, vs the reference extractor


def _audio(name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(DATA / f"{name}.npz")["audio"])


@pytest.mark.parametrize("name", CLIPS)
def test_features_equal_the_reference_extractor(name):
    expected = torch.from_numpy(np.load(DATA / "speech5" / f"{name}.npz")["input_features"])
    features, lengths = log_mel_deltas([_audio(name)])
    assert features.shape == (1, *expected.shape) and expected.shape[1] == DELTA_FEATURE_DIM
    assert lengths.tolist() == [expected.shape[0]]
    assert (features[0] - expected).abs().max().item() <= REFERENCE_TOLERANCE


def test_a_padded_batch_gives_each_clip_what_it_gets_alone():
    clips = [_audio(name) for name in CLIPS]
    features, lengths = log_mel_deltas(clips)
    for row, clip in enumerate(clips):
        alone, alone_lengths = log_mel_deltas([clip])
        assert lengths[row] == alone_lengths[0]
        torch.testing.assert_close(features[row, : lengths[row]], alone[0], rtol=0, atol=1e-6)
        assert (features[row, lengths[row] :] == 0).all()


@pytest.mark.parametrize("samples", [MIN_SAMPLES, 480, 481, 1600, 1760, 5317])
def test_rows_are_half_the_hops_rounded_up(samples):
    """ceil((samples // 160) / 2) rows, the reference's attention-mask length: an odd last
    frame is completed (1760 samples: 11 hops, the last pair needs one zero sample more)."""
    clip = torch.randn(samples, generator=torch.Generator().manual_seed(samples))
    features, lengths = log_mel_deltas([clip])
    rows = -(-(samples // HOP_LENGTH) // 2)
    assert lengths.tolist() == [rows] and features.shape[1] == rows
    assert torch.isfinite(features).all()


def test_deltas_repeat_the_clips_own_edges():
    """delta(t) = (mel(t + 1) - mel(t - 1)) / 2 with the first and last frames repeated."""
    features, _ = log_mel_deltas([_audio("short")])
    frames = features[0].reshape(-1, 2, DELTA_FEATURE_DIM // 2)  # (rows, 2 frames, mel+delta)
    frames = frames.reshape(-1, DELTA_FEATURE_DIM // 2)
    mel, delta = frames[:, :80], frames[:, 80:]
    padded = torch.cat([mel[:1], mel, mel[-1:]])
    torch.testing.assert_close(delta, (padded[2:] - padded[:-2]) / 2, rtol=0, atol=1e-6)


def test_too_short_clip_is_refused():
    with pytest.raises(AudioError, match=f"at least {MIN_SAMPLES} samples"):
        log_mel_deltas([torch.zeros(MIN_SAMPLES - 1)])
