"""`fms-speech transcribe` end to end: real audio files in, the reference's text out.

The checkpoint is a small random one saved by the reference with a word-level tokenizer, so the
"text" is random words; what is tested is that it is exactly the text the reference's
`generate()` produces from the same audio features and prompt (greedy and beams, eager and
compiled), and that bad inputs are reported one line each while the rest still run.
"""

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from fms_speech.audio import load_audio, log_mel
from fms_speech.cli import main
from fms_speech.models.qformer import num_audio_tokens
from fms_speech.prompts import chat_text, instruction, prompt_ids
from fms_speech.synthesis import synthesize, write_audio
from fms_speech.testing.reference import AUDIO_TOKEN

MAX_NEW_TOKENS = 6
SENTENCES = {"hello": "hello world", "numbers": "one two three four five six seven"}


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    """Spoken sentences as a wav and an mp3 (eSpeak NG at 22.05 kHz: resampled on load)."""
    directory = tmp_path_factory.mktemp("audio")
    files = []
    for (name, text), file_format in zip(SENTENCES.items(), ("wav", "mp3"), strict=True):
        samples, sample_rate = synthesize(text)
        path = directory / f"{name}.{file_format}"
        write_audio(path, samples, sample_rate, file_format)
        files.append(path)
    return files


def _scaled_logits(reference):
    """A copy of the reference whose logits are divided by logits_scaling, as the model's are."""
    scaled = copy.deepcopy(reference)
    head = scaled.get_base_model().lm_head
    scaling = scaled.config.text_config.logits_scaling
    head.weight = torch.nn.Parameter(head.weight.detach().clone() / scaling)  # unties it
    return scaled


def _reference_text(reference, directory, path, num_beams: int) -> str:
    """What the reference generates for this file, fed the same features and prompt alone."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    features, lengths = log_mel([load_audio(path)])
    config = reference.config
    count = int(num_audio_tokens(lengths, config.window_size, config.downsample_rate))
    ids = torch.tensor([prompt_ids(tokenizer, chat_text(tokenizer, instruction()), count)])
    model = _scaled_logits(reference) if num_beams > 1 else reference
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            input_features=features,
            input_features_mask=torch.ones(1, count, dtype=torch.bool),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            num_beams=num_beams,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert (ids == AUDIO_TOKEN).sum() == count
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main(["transcribe", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "options",
    [
        pytest.param([], id="greedy-eager"),
        pytest.param(["--num-beams", "3"], id="beams-eager"),
        pytest.param(["--compile"], id="greedy-compiled"),
        pytest.param(["--compile", "--num-beams", "3"], id="beams-compiled"),
    ],
)
def test_cli_text_equals_the_references(speech_checkpoint, audio_files, tmp_path, capsys, options):
    reference, directory = speech_checkpoint
    output_dir = tmp_path / "out"
    code, out, err = _run(
        capsys,
        *audio_files,
        "--model",
        directory,
        "--max-new-tokens",
        MAX_NEW_TOKENS,
        "--output-dir",
        output_dir,
        "--output-format",
        "all",
        "--batch-size",
        2,
        *options,
    )
    assert code == 0, err
    num_beams = int(options[options.index("--num-beams") + 1]) if "--num-beams" in options else 1
    for path in audio_files:
        document = json.loads((output_dir / f"{path.stem}.json").read_text())
        expected = _reference_text(reference, directory, path, num_beams)
        assert (
            len(expected.split()) >= 2
        )  # a text that could differ        assert document["text"] == expected
        assert (output_dir / f"{path.stem}.txt").read_text() == expected + "\n"
        assert document["compile"] == ("--compile" in options)
        assert document["dtype"] == "float32" and document["device"] == "cpu"
        assert document["duration"] == pytest.approx(load_audio(path).numel() / 16000, abs=1e-3)
        assert {"load", "features", "prefill", "decode", "total"} <= set(document["timings"])
        assert [s["text"] for s in document["segments"]] == ([expected] if expected else [])
        for name in ("srt", "vtt", "tsv"):
            assert (output_dir / f"{path.stem}.{name}").exists()
    assert out == ""


def test_cli_prints_the_chosen_format_of_one_file_to_stdout(speech_checkpoint, audio_files, capsys):
    reference, directory = speech_checkpoint
    path = audio_files[0]
    code, out, err = _run(
        capsys,
        path,
        "--model",
        directory,
        "--max-new-tokens",
        MAX_NEW_TOKENS,
        "--output-format",
        "json",
        "--no-progress",
    )
    assert code == 0, err
    document = json.loads(out)
    assert document["source"] == str(path)
    assert document["text"] == _reference_text(reference, directory, path, 1)


def test_cli_prints_text_to_stdout_as_a_program(speech_checkpoint, audio_files):
    """The installed entry point, in its own process: text on stdout, nothing on stderr."""
    reference, directory = speech_checkpoint
    path = audio_files[0]
    command = [sys.executable, "-m", "fms_speech.cli", "transcribe", str(path)]
    command += ["--model", str(directory), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == _reference_text(reference, directory, path, 1) + "\n"
    assert finished.stderr == ""
