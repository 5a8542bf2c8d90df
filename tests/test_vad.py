"""silero-vad segmentation: speech regions at the true pauses of synthesised speech."""

import itertools

import numpy as np
import pytest
import torch

from fms_speech.audio import SAMPLE_RATE
from fms_speech.demo_recipe import held_out_sentences, passage
from fms_speech.transcribe import TranscribeOptions, segment_ranges
from fms_speech.vad import speech_regions

BOUNDARY_TOLERANCE = 0.3  # seconds


@pytest.fixture(scope="module")
def spoken_passage():
    samples, spans = passage(held_out_sentences(8), seed=1)
    return torch.from_numpy(samples), spans


def test_regions_start_and_end_at_the_true_pauses(spoken_passage):
    waveform, spans = spoken_passage
    regions = [
        (start / SAMPLE_RATE, end / SAMPLE_RATE) for start, end in speech_regions(waveform, 30)
    ]
    assert len(regions) == len(spans), (regions, spans)
    for (start, end), (true_start, true_end) in zip(regions, spans, strict=True):
        assert abs(start - true_start) <= BOUNDARY_TOLERANCE
        assert abs(end - true_end) <= BOUNDARY_TOLERANCE


def test_regions_never_exceed_the_window(spoken_passage):
    waveform, _ = spoken_passage
    # a 3 s window is shorter than most sentences: they are split, none is longer
    regions = speech_regions(waveform, 3.0)
    assert max(end - start for start, end in regions) <= 3 * SAMPLE_RATE
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(regions))
    assert len(regions) > 8


def test_silence_has_no_regions():
    quiet = torch.from_numpy(np.random.default_rng(0).normal(0, 1e-4, 3 * SAMPLE_RATE))
    assert speech_regions(quiet.float(), 30) == []


def test_fixed_segmentation_keeps_the_windows(spoken_passage):
    waveform, _ = spoken_passage
    ranges = segment_ranges(waveform, TranscribeOptions(window_seconds=10, segmentation="fixed"))
    assert ranges[0][0] == 0 and ranges[-1][1] == waveform.numel()
    assert all(b_start < a_end for (_, a_end), (b_start, _) in itertools.pairwise(ranges))


def test_unknown_segmentation_is_one_sentence():
    with pytest.raises(ValueError, match="unknown segmentation 'silence': choose fixed or vad"):
        TranscribeOptions(segmentation="silence")
