"""Output formats, and files written whole or not at all."""

import json
import os

import pytest

from fms_speech.transcribe import Segment, Transcription
from fms_speech.writers import WRITERS, write_atomic, write_result


def _result() -> Transcription:
    segments = [Segment(0.0, 29.5, "first window"), Segment(29.5, 3725.25, "second, é")]
    timings = {"load": 0.01, "features": 0.02, "prefill": 0.5, "decode": 1.0, "total": 1.53}
    return Transcription("talk.wav", 0, "first window second, é", segments, 3725.25, timings)


def test_subtitle_cues_never_carry_a_timing_arrow():
    result = Transcription("a.wav", 0, "a --> b", [Segment(0.0, 1.0, "a --> b")], 1.0)
    for name in ("srt", "vtt"):
        text = WRITERS[name](result, {})
        assert text.count("-->") == 1, name  # the timing line's own
        assert "a -> b" in text


def test_srt_vtt_tsv_carry_every_segment_with_its_times():
    result = _result()
    assert WRITERS["srt"](result, {}) == (
        "1\n00:00:00,000 --> 00:00:29,500\nfirst window\n\n"
        "2\n00:00:29,500 --> 01:02:05,250\nsecond, é\n"
    )
    assert WRITERS["vtt"](result, {}) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:29.500\nfirst window\n\n"
        "00:00:29.500 --> 01:02:05.250\nsecond, é\n"
    )
    assert WRITERS["tsv"](result, {}) == (
        "start\tend\ttext\n0\t29500\tfirst window\n29500\t3725250\tsecond, é\n"
    )
    assert WRITERS["txt"](result, {}) == "first window second, é\n"


def test_json_has_text_segments_duration_timings_and_run_metadata():
    document = json.loads(WRITERS["json"](_result(), {"device": "cpu", "compile": True}))
    assert document["text"] == "first window second, é"
    assert document["segments"][1] == {"start": 29.5, "end": 3725.25, "text": "second, é"}
    assert document["duration"] == 3725.25
    assert set(document["timings"]) == {"load", "features", "prefill", "decode", "total"}
    assert document["device"] == "cpu" and document["compile"] is True


def test_write_result_writes_each_format(tmp_path):
    paths = write_result(_result(), tmp_path, "talk", list(WRITERS), {})
    assert sorted(p.name for p in paths) == sorted(f"talk.{name}" for name in WRITERS)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)  # no temporaries left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "talk.txt"
    target.write_text("earlier result\n")

    def broken_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_atomic(target, "new result\n")
    assert target.read_text() == "earlier result\n"
    assert os.listdir(tmp_path) == ["talk.txt"]
