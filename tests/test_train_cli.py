"""`fms-speech train` and `fms-speech eval`: one line and exit code 2 for each bad input."""

import pytest

from fms_speech.cli import main


def _run(capsys, *args) -> tuple[int, list[str]]:
    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"audio": "a.wav"}\n',
            "manifest.jsonl:1: expected a JSON object with 'audio' and 'text'",
        ),
        ("not json\n", "manifest.jsonl:1: expected a JSON object"),
        ('{"audio": 3, "text": "x"}\n', "'audio' and 'text' must be strings"),
        ("\n", "has no entries"),
    ],
)
def test_eval_bad_manifest_is_one_line(tmp_path, capsys, content, message):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(content)
    code, lines = _run(capsys, "eval", manifest)
    assert code == 2
    assert len(lines) == 1 and message in lines[0], lines


def test_eval_missing_manifest_is_one_line(tmp_path, capsys):
    code, lines = _run(capsys, "eval", tmp_path / "absent.jsonl")
    assert code == 2 and lines == [
        f"fms-speech: error: manifest {tmp_path}/absent.jsonl does not exist"
    ]


def test_train_from_checkpoint_needs_a_manifest(tmp_path, capsys):
    code, lines = _run(capsys, "train", "--init", tmp_path, "--output", tmp_path / "out")
    assert code == 2 and len(lines) == 1 and "--manifest" in lines[0]


def test_train_unknown_part_is_one_line(tmp_path, capsys):
    args = ["train", "--recipe", "demo", "--output", tmp_path, "--train", "encoder,decoder"]
    code, lines = _run(capsys, *args)
    assert code == 2 and len(lines) == 1 and "decoder" in lines[0], lines


def test_export_state_without_a_state_is_one_line(tmp_path, capsys):
    code, lines = _run(capsys, "train", "--recipe", "demo", "--output", tmp_path, "--export-state")
    assert code == 2 and lines == [
        f"fms-speech: error: {tmp_path} has no training_state.pt to export"
    ]
