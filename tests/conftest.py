"""Session fixtures: small checkpoints saved by the reference, loaded once per session;
`--device` (or $FMS_SPEECH_TEST_DEVICE) for the tests written for any device (test_device.py)."""

import os
from pathlib import Path

import fms.models
import pytest
import torch

import fms_speech  # noqa: F401  (registers granite_speech)
from fms_speech.testing.reference import (
    TRANSCRIBE_CONFIG,
    save_ctc_tokenizer,
    save_named,
    save_speech5_named,
    save_tokenizer,
)


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default=os.environ.get("FMS_SPEECH_TEST_DEVICE", "cpu"),
        help="device of tests/test_device.py: cpu (default), cuda, cuda:1 ...",
    )


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"--device {device} was asked for but no GPU is usable", pytrace=False)
    if device.type == "cuda":  # fp32 means fp32: no TF32 in matrix products or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


class Checkpoints:
    """Lazily saves each of `fms_speech.testing.reference.CONFIGS` (and PLUS_CONFIGS) once per
    session; (reference, fms model, directory)."""

    def __init__(self, root: Path, save=save_named):
        self.root = root
        self.save = save
        self._cache = {}

    def __getitem__(self, name: str):
        if name not in self._cache:
            directory = self.root / name
            reference = self.save(name, directory)
            model = fms.models.get_model("hf_pretrained", model_path=str(directory)).eval()
            self._cache[name] = (reference, model, directory)
        return self._cache[name]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    torch.manual_seed(0)
    return Checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def speech_checkpoint(checkpoints):
    """(peft reference, checkpoint directory with a tokenizer and chat template) for the CLI."""
    reference, _, directory = checkpoints[TRANSCRIBE_CONFIG]
    if not (directory / "tokenizer.json").exists():
        save_tokenizer(directory)
    return reference, directory


@pytest.fixture(scope="session")
def ctc_checkpoints(tmp_path_factory) -> Checkpoints:
    """granite_speech5: each of SPEECH5_CONFIGS saved by the reference (sharded), with a small
    CTC tokenizer of the reference's class; (reference, fms model, directory)."""

    def save(name: str, directory: Path):
        reference = save_speech5_named(name, directory)
        save_ctc_tokenizer(directory, reference.config.vocab_size)
        return reference

    return Checkpoints(tmp_path_factory.mktemp("ctc_checkpoints"), save)
