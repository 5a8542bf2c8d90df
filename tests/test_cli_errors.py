"""Bad input: one clear line on stderr each, no traceback, and the other files still run.

Exit codes: 0 all transcribed, 1 some failed, 2 nothing transcribed.
"""

import json
import shutil

import numpy as np
import pytest
import soundfile

from fms_speech.cli import main
from fms_speech.synthesis import synthesize, write_audio


@pytest.fixture(scope="module")
def good_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.wav"
    samples, sample_rate = synthesize("hello world")
    write_audio(path, samples, sample_rate, "wav")
    return path


def _run(capsys, *args) -> tuple[int, list[str]]:
    code = main(["transcribe", *map(str, args)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err.splitlines()


def _bad_files(directory, good_wav) -> dict[str, tuple]:
    """name -> (path, words its one error line must hold)."""
    files = {"missing": (directory / "missing.wav", ["missing.wav", "no such file"])}
    (directory / "folder.wav").mkdir()
    files["folder"] = (directory / "folder.wav", ["folder.wav", "directory"])
    (directory / "notes.wav").write_text("these are meeting notes, not audio\n")
    files["not audio"] = (directory / "notes.wav", ["notes.wav", "not audio"])
    data = good_wav.read_bytes()
    (directory / "truncated.wav").write_bytes(data[: len(data) // 2])
    files["truncated"] = (directory / "truncated.wav", ["truncated.wav", "truncated"])
    soundfile.write(directory / "empty.wav", np.zeros(0, np.float32), 16000)
    files["empty"] = (directory / "empty.wav", ["empty.wav", "no audio"])
    soundfile.write(directory / "click.wav", np.zeros(100, np.float32), 16000)
    files["too short"] = (directory / "click.wav", ["click.wav", "too short"])
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        samples = np.zeros(16000, np.float32)
        samples[100] = value
        soundfile.write(directory / f"{name}.wav", samples, 16000, subtype="FLOAT")
        files[name] = (directory / f"{name}.wav", [f"{name}.wav", "NaN or infinite"])
    long_samples, rate = synthesize("this sentence is longer than the limit allows for a clip")
    write_audio(directory / "long.wav", long_samples, rate, "wav")
    files["long"] = (directory / "long.wav", ["long.wav", "max-audio-seconds"])
    return files


def test_each_bad_file_gets_one_line_and_the_good_one_is_transcribed(
    speech_checkpoint, good_wav, tmp_path, capsys
):
    _, model_dir = speech_checkpoint
    bad = _bad_files(tmp_path, good_wav)
    output_dir = tmp_path / "out"
    paths = [path for path, _ in bad.values()]
    paths.insert(3, good_wav)
    options = ["--model", model_dir, "--output-dir", output_dir, "--output-format", "json"]
    code, lines = _run(capsys, *paths, *options, "--max-audio-seconds", 2, "--max-new-tokens", 3)
    assert code == 1
    assert len(lines) == len(bad), lines
    for name, (_, words) in bad.items():
        matching = [line for line in lines if all(word in line for word in words)]
        assert len(matching) == 1, (name, lines)
        assert matching[0].startswith("fms-speech: error: ")
    assert sorted(p.name for p in output_dir.iterdir()) == ["good.json"]
    assert json.loads((output_dir / "good.json").read_text())["text"]


def test_when_every_file_fails_the_exit_code_is_2(speech_checkpoint, tmp_path, capsys):
    _, model_dir = speech_checkpoint
    code, lines = _run(capsys, tmp_path / "a.wav", tmp_path / "b.flac", "--model", model_dir)
    assert code == 2
    assert len(lines) == 2 and "a.wav" in lines[0] and "b.flac" in lines[1]


def _checkpoint_variants(model_dir, root):
    """name -> (directory, words of the one error line)."""
    variants = {"absent": (root / "absent", ["does not exist"])}
    no_config = root / "no_config"
    shutil.copytree(model_dir, no_config)
    (no_config / "config.json").unlink()
    variants["no config"] = (no_config, ["no config.json"])
    other = root / "other_type"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "whisper"}))
    known = ["'granite_speech'", "'granite_speech_plus'", "'granite_speech5_ctc'"]
    variants["other model type"] = (other, ["'whisper'", *known])
    no_weights = root / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, no_weights / name)
    variants["no weights"] = (no_weights, ["no model weights"])
    no_tokenizer = root / "no_tokenizer"
    shutil.copytree(model_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (no_tokenizer / name).unlink()
    variants["no tokenizer"] = (no_tokenizer, ["no tokenizer"])
    return variants


def test_an_unusable_checkpoint_is_one_line_and_exit_code_2(
    speech_checkpoint, good_wav, tmp_path, capsys
):
    _, model_dir = speech_checkpoint
    for name, (directory, words) in _checkpoint_variants(model_dir, tmp_path).items():
        output_dir = tmp_path / f"out_{name}"
        code, lines = _run(capsys, good_wav, "--model", directory, "--output-dir", output_dir)
        assert code == 2, name
        assert len(lines) == 1 and all(word in lines[0] for word in words), (name, lines)
        assert not any(output_dir.iterdir())


def test_an_output_never_overwrites_an_input(speech_checkpoint, good_wav, tmp_path, capsys):
    _, model_dir = speech_checkpoint
    disguised = tmp_path / "speech.txt"  # audio with an unusual name, beside where outputs go
    shutil.copy(good_wav, disguised)
    before = disguised.read_bytes()
    code, lines = _run(capsys, disguised, "--model", model_dir, "--output-dir", tmp_path)
    assert code == 2
    assert len(lines) == 1 and "overwrite the input" in lines[0]
    assert disguised.read_bytes() == before


def test_inputs_with_the_same_name_get_separate_outputs(
    speech_checkpoint, good_wav, tmp_path, capsys
):
    _, model_dir = speech_checkpoint
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(good_wav, tmp_path / folder / "clip.wav")
    output_dir = tmp_path / "out"
    files = [tmp_path / "a" / "clip.wav", tmp_path / "b" / "clip.wav"]
    code, _ = _run(capsys, *files, "--model", model_dir, "--output-dir", output_dir)
    assert code == 0
    assert sorted(p.name for p in output_dir.iterdir()) == ["clip-2.txt", "clip.txt"]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--task", "translate"], "needs a --language"),
        (["--overlap-seconds", "20"], "below half the window"),
    ],
)
def test_bad_options_are_one_line_and_exit_code_2(
    speech_checkpoint, good_wav, capsys, options, words
):
    _, model_dir = speech_checkpoint
    code, lines = _run(capsys, good_wav, "--model", model_dir, *options)
    assert code == 2
    assert len(lines) == 1 and words in lines[0]


@pytest.mark.parametrize(
    ("output_format", "files", "words"),
    [("all", 1, "--output-dir"), ("json", 2, "one file"), ("srt", 2, "one file")],
)
def test_a_format_stdout_cannot_hold_is_refused_before_loading(
    good_wav, capsys, output_format, files, words
):
    code, err = _run(capsys, *[good_wav] * files, "--output-format", output_format)
    assert code == 2
    assert len(err) == 1 and words in err[0] and "--output-format" in err[0], err
