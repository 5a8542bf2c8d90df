"""Session fixtures of the server tests: the shared eager server, speech files, the CLI's text."""

from pathlib import Path

import numpy as np
import pytest
from serving import FORMATS, MAX_NEW_TOKENS, SENTENCES, Server, cli_outputs, start_server

from fms_speech.synthesis import synthesize, write_audio
from fms_speech.testing.reference import (
    make_reference,
    reference_config,
    save_reference,
    save_tokenizer,
)

# The shared tiny checkpoints write nearly the same words whatever the audio (the published
# multipliers make the current token's embedding dominate): with embedding multiplier 1 and
# residual multiplier 0.5 the text follows the audio, so 16 files get 16 texts and a mix-up shows.
SERVE_CONFIG = dict(
    encoder=dict(num_layers=1, context_size=12, conv_kernel_size=6),
    text=dict(
        num_hidden_layers=3,
        tie_word_embeddings=False,
        num_key_value_heads=1,
        embedding_multiplier=1.0,
        residual_multiplier=0.5,
    ),
    window_size=12,
    downsample_rate=4,
)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A reference-saved checkpoint (sharded, PEFT adapter, tokenizer with a chat template)."""
    directory = tmp_path_factory.mktemp("serve-checkpoint") / "granite-speech-test"
    save_reference(make_reference(reference_config(**SERVE_CONFIG), seed=1), directory)
    save_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def server(request, tmp_path_factory, model_dir) -> Server:
    """The eager server most tests share: batches of up to 8 windows, 100 ms batch window."""
    return start_server(
        request,
        tmp_path_factory,
        model_dir,
        "eager",
        *("--max-new-tokens", MAX_NEW_TOKENS, "--max-batch", 8, "--batch-window-ms", 100),
    )


@pytest.fixture(scope="session")
def speech_files(tmp_path_factory) -> list[Path]:
    """16 different spoken sentences in four formats (eSpeak NG at 22.05 kHz: resampled)."""
    directory = tmp_path_factory.mktemp("speech")
    files = []
    for index, text in enumerate(SENTENCES):
        samples, rate = synthesize(text)
        file_format = FORMATS[index % len(FORMATS)]
        path = directory / f"s{index:02d}.{file_format}"
        write_audio(path, samples, rate, file_format)
        files.append(path)
    return files


@pytest.fixture(scope="session")
def long_file(tmp_path_factory) -> Path:
    """About 75 s of speech with pauses: three 30 s windows."""
    pieces = []
    for text in SENTENCES * 2:
        samples, rate = synthesize(text)
        pieces += [samples, np.zeros(rate // 3, np.float32)]
    path = tmp_path_factory.mktemp("long") / "long.flac"
    write_audio(path, np.concatenate(pieces), rate, "flac")
    return path


@pytest.fixture(scope="session")
def expected(tmp_path_factory, model_dir, speech_files, long_file) -> dict[str, dict]:
    """The CLI's outputs for every speech file and the long one (greedy, eager)."""
    outputs = cli_outputs(tmp_path_factory, model_dir, [*speech_files, long_file])
    texts = [outputs[path.stem]["json"]["text"] for path in speech_files]
    assert len(set(texts)) == len(texts), "each file needs a text of its own to catch mix-ups"
    return outputs
