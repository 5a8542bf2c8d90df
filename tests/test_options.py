"""TranscribeOptions: one object, checked once, built by the CLI from its arguments."""

import dataclasses

import pytest

from fms_speech.cli import _parser, options_from
from fms_speech.transcribe import TranscribeOptions, resolve_options


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch_size": 0}, "at least 1"),
        ({"num_beams": 0}, "at least 1"),
        ({"window_seconds": 0.5}, "at least 1 s"),
        ({"overlap_seconds": 15.0}, "below half the window"),
        ({"overlap_seconds": -1.0}, "at least 0 s"),
        ({"max_audio_seconds": 0.0}, "more than 0 s"),
        ({"task": "translate"}, "needs a --language"),
        ({"task": "summarise"}, "unknown task"),
    ],
)
def test_invalid_options_fail_when_made(fields, message):
    with pytest.raises(ValueError, match=message):
        TranscribeOptions(**fields)


def test_options_are_frozen_and_overrides_are_checked():
    options = TranscribeOptions(num_beams=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.num_beams = 4
    assert resolve_options(options, batch_size=2) == TranscribeOptions(num_beams=3, batch_size=2)
    assert resolve_options(None) == TranscribeOptions()
    with pytest.raises(ValueError, match="at least 1"):
        resolve_options(options, max_new_tokens=0)


def test_every_option_is_a_cli_argument():
    args = _parser().parse_args(
        [
            *("transcribe", "a.wav", "--model", "m"),
            *("--task", "translate", "--language", "fr", "--prompt", "<|audio|>say it"),
            *("--num-beams", "3", "--max-new-tokens", "7", "--batch-size", "2"),
            *("--window-seconds", "20", "--overlap-seconds", "2", "--max-audio-seconds", "60"),
        ]
    )
    fields = {f.name for f in dataclasses.fields(TranscribeOptions)}
    assert fields <= set(vars(args)), fields - set(vars(args))
    assert options_from(args) == TranscribeOptions(
        task="translate",
        language="fr",
        prompt="<|audio|>say it",
        num_beams=3,
        max_new_tokens=7,
        batch_size=2,
        window_seconds=20.0,
        overlap_seconds=2.0,
        max_audio_seconds=60.0,
    )
