"""`fms-speech transcribe` with a granite_speech5 (CTC) checkpoint saved by the reference.

The checkpoint is small and random, its tokenizer a `ParakeetTokenizer` (the reference's class)
with SentencePiece-style pieces, so the "text" is random pieces; what is tested is that it is
exactly the text of the reference's `generate` + `batch_decode` on the same features, and that
each word's timestamps are those of the frames that emitted it, computed here independently
from the reference's own logits.
"""

import itertools
import json

import pytest
import torch
from transformers import AutoTokenizer

from fms_speech.audio import load_audio, log_mel_deltas
from fms_speech.cli import main
from fms_speech.synthesis import synthesize, write_audio
from fms_speech.testing.reference import BLANK

SENTENCES = {"hello": "hello world", "numbers": "one two three four five six seven eight"}
# untied, one subsampling block: 40 ms frames; it emits many words, some of several pieces
CONFIG = "ctc_untied_late_subsampling"


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ctc_audio")
    files = []
    for (name, text), file_format in zip(SENTENCES.items(), ("wav", "flac"), strict=True):
        samples, sample_rate = synthesize(text)
        path = directory / f"{name}.{file_format}"
        write_audio(path, samples, sample_rate, file_format)
        files.append(path)
    return files


def _reference_words(reference, tokenizer, path):
    """The reference's text, and its words as (text, first frame, last frame) from its argmax."""
    features, _ = log_mel_deltas([load_audio(path)])
    with torch.no_grad():
        best = reference.generate(input_features=features)[0].tolist()
    text = tokenizer.batch_decode([best], skip_special_tokens=True)[0].strip()
    words, frame = [], 0
    for token, run in itertools.groupby(best):
        size = len(list(run))
        if token != BLANK:
            piece = tokenizer.convert_ids_to_tokens(token)
            if piece.startswith("▁") or not words:
                words.append([piece, frame, frame + size - 1])
            else:
                words[-1][0] += piece
                words[-1][2] = frame + size - 1
        frame += size
    return text, [(piece.lstrip("▁"), first, last) for piece, first, last in words]


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main(["transcribe", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_text_and_word_timestamps_equal_the_references(
    ctc_checkpoints, audio_files, tmp_path, capsys
):
    reference, model, directory = ctc_checkpoints[CONFIG]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    frame_seconds = 2 ** len(model.config.encoder_config.subsample_layers) / 50  # 50 rows/s
    output_dir = tmp_path / "out"
    code, out, err = _run(
        capsys, *audio_files, "--model", directory, "--output-dir", output_dir,
        "--output-format", "all", "--batch-size", 2,
    )  # fmt: skip
    assert code == 0, err
    assert out == ""
    for path in audio_files:
        document = json.loads((output_dir / f"{path.stem}.json").read_text())
        text, expected_words = _reference_words(reference, tokenizer, path)
        assert len(expected_words) >= 4  # a text that could differ
        assert document["text"] == text
        assert (output_dir / f"{path.stem}.txt").read_text() == text + "\n"
        assert {"load", "features", "encoder", "decode", "total"} <= set(document["timings"])
        duration = document["duration"]
        words = [w for segment in document["segments"] for w in segment["words"]]
        assert [w["word"] for w in words] == [w for w, _, _ in expected_words]
        for word, (_, first, last) in zip(words, expected_words, strict=True):
            # the span covers the frames that emitted the word, inside the audio
            assert word["start"] == pytest.approx(first * frame_seconds, abs=1e-3)
            assert word["end"] == pytest.approx(min((last + 1) * frame_seconds, duration), abs=1e-3)
            assert 0 <= word["start"] < word["end"] <= duration + 1e-3
        starts, ends = [w["start"] for w in words], [w["end"] for w in words]
        assert starts == sorted(starts) and ends == sorted(ends)
        # no word overlaps the next
        assert all(end <= start + 1e-6 for end, start in zip(ends, starts[1:], strict=False))
        for segment in document["segments"]:
            assert segment["start"] == segment["words"][0]["start"]
            assert segment["end"] == segment["words"][-1]["end"]
            assert segment["text"] == " ".join(w["word"] for w in segment["words"])
        srt = (output_dir / f"{path.stem}.srt").read_text()
        vtt = (output_dir / f"{path.stem}.vtt").read_text()
        assert srt.count(" --> ") == vtt.count(" --> ") == len(document["segments"])


def test_long_audio_windows_join_at_word_boundaries(ctc_checkpoints, audio_files, capsys):
    """Windows of 1 s overlapping by 0.4 s: words stay in order, none ends past the audio."""
    _, _, directory = ctc_checkpoints[CONFIG]
    path = audio_files[1]
    code, out, err = _run(
        capsys, path, "--model", directory, "--output-format", "json", "--output-dir",
        directory.parent / "windowed", "--window-seconds", 1, "--overlap-seconds", 0.4,
    )  # fmt: skip
    assert code == 0, err
    document = json.loads((directory.parent / "windowed" / f"{path.stem}.json").read_text())
    words = [w for segment in document["segments"] for w in segment["words"]]
    assert words, "the windows emitted nothing: the test could not fail"
    middles = [(w["start"] + w["end"]) / 2 for w in words]
    assert middles == sorted(middles) and len(set(middles)) == len(middles)
    assert all(0 <= w["start"] < w["end"] <= document["duration"] + 1e-3 for w in words)
    assert document["text"].split() == [w["word"] for w in words]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--task", "translate", "--language", "fr"], "a CTC model only transcribes"),
        (["--prompt", "who speaks?"], "a CTC model takes no prompt"),
        (["--num-beams", "3"], "a CTC model decodes greedily"),
    ],
)
def test_options_a_ctc_model_cannot_honour_are_refused(
    ctc_checkpoints, audio_files, capsys, options, message
):
    _, _, directory = ctc_checkpoints[CONFIG]
    capsys.readouterr()  # not the fixtures' output (saving a checkpoint prints a progress bar)
    code, out, err = _run(capsys, audio_files[0], "--model", directory, *options)
    assert code == 2
    assert out == ""
    assert err.startswith(f"fms-speech: error: {message}") and err.count("\n") == 1
