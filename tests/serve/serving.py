"""Helpers of the server tests: a real `fms-speech serve` process, raw HTTP, the CLI's outputs.

A server is started once per module or session (start-up loads, warms up and, with --compile,
compiles) and always ended by its pid in a finalizer, also when a test fails.
"""

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from openai import OpenAI

from fms_speech.cli import main as cli_main
from fms_speech.serve.process import ServerFailed, ServerProcess, decode_body

MAX_NEW_TOKENS = 6
READY_TIMEOUT = 900  # a hang guard for start-up (compiling on a busy 2-core machine), not a check
SENTENCES = [
    "hello world",
    "one two three four five six seven",
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "please transcribe this recording",
    "the weather today is cloudy with rain",
    "granite speech turns spoken words into text",
    "a compiled model runs the same arithmetic",
    "eight nine ten eleven twelve",
    "long audio is cut into windows",
    "every request gets its own text",
    "the server batches concurrent requests",
    "where are the people who made this",
    "water is very long and little",
    "find the words that are called",
    "many of them were there at the time",
]
FORMATS = ["wav", "flac", "mp3", "ogg"]


class Server(ServerProcess):
    """A `fms-speech serve` subprocess with the requests the tests make of it."""

    def wait_until_ready(self) -> None:
        try:
            super().wait_until_ready(READY_TIMEOUT)
        except ServerFailed as failure:
            pytest.fail(str(failure))

    def client(self, api_key: str = "unused", **options) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **options)

    def post(self, path: str, body: bytes, content_type: str, headers: dict | None = None):
        """POST raw bytes; (status, decoded body)."""
        headers = {"Content-Type": content_type, **(headers or {})}
        request = urllib.request.Request(self.url + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, decode_body(response.read(), response.headers)
        except urllib.error.HTTPError as error:
            return error.code, decode_body(error.read(), error.headers)

    def assert_healthy(self) -> None:
        """Still serving: /health says ready."""
        assert self.process.poll() is None, self.log()
        assert self.get("/health") == (200, {"status": "ready", "model": self.model})


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type, for requests the openai client won't send."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n')
        parts.append(f"{value}\r\n")
    chunks = ["".join(parts).encode()]
    for name, (filename, data) in files.items():
        header = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        )
        chunks += [header.encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def start_server(
    request, tmp_path_factory, model_dir: Path, name: str, *options, env=None, launcher=None
) -> Server:
    """A ready server, ended by pid when `request`'s scope ends."""
    log_dir = tmp_path_factory.mktemp(f"server-{name}")
    server = Server(model_dir, log_dir / "stderr.log", *options, env=env, launcher=launcher)
    request.addfinalizer(server.stop)
    server.wait_until_ready()
    return server


def cli_outputs(tmp_path_factory, model_dir, files, *options) -> dict[str, dict]:
    """`fms-speech transcribe` on each file alone (--batch-size 1): stem -> {format: text}."""
    out = tmp_path_factory.mktemp("cli")
    args = [*map(str, files), "--model", str(model_dir), "--output-dir", str(out)]
    args += ["--output-format", "all", "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "1"]
    assert cli_main(["transcribe", *args, *map(str, options)]) == 0
    outputs = {}
    for path in files:
        outputs[path.stem] = {
            name: (out / f"{path.stem}.{name}").read_text() for name in ("txt", "srt", "vtt")
        }
        outputs[path.stem]["json"] = json.loads((out / f"{path.stem}.json").read_text())
    return outputs
