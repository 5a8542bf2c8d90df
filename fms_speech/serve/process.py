"""A `fms-speech serve` subprocess on 127.0.0.1: started, awaited until ready, ended by its pid.

The load benchmark and the tests run real servers this way.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class ServerFailed(RuntimeError):
    """The server exited or never became ready; the message holds its log."""


class ServerProcess:
    """`python -m fms_speech.cli serve --model DIR --port FREE *options`, stderr to `log_path`.

    `launcher` replaces `python -m`, e.g. torchrun's command ending in `-m` (tensor parallel).
    """

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        *options,
        env: dict | None = None,
        launcher: list[str] | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.model = self.model_dir.name  # the served name unless --served-model-name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        launcher = launcher or [sys.executable, "-m"]
        command = [*launcher, "fms_speech.cli", "serve", "--model", str(model_dir)]
        command += ["--port", str(self.port), *map(str, options)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )

    def wait_until_ready(self, timeout: float) -> None:
        """Poll /health until it says ready; ServerFailed if the server exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(
                    f"the server exited with {self.process.returncode}:\n{self.log()}"
                )
            status, body = self.get("/health")
            if status == 200 and body.get("status") == "ready":
                return
            time.sleep(0.2)
        raise ServerFailed(f"the server was not ready after {timeout:g} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict | str]:
        """(status, JSON body or text); status 0 if nothing answers."""
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, decode_body(response.read(), response.headers)
        except urllib.error.HTTPError as error:
            return error.code, decode_body(error.read(), error.headers)
        except (ConnectionError, urllib.error.URLError):
            return 0, {}

    def metrics(self) -> dict[str, float]:
        """The samples of /metrics as written: 'name{labels}' -> value."""
        status, text = self.get("/metrics")
        if status != 200:
            raise ServerFailed(f"/metrics answered {status}")
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples


def decode_body(data: bytes, headers) -> dict | str:
    if headers.get("content-type", "").startswith("application/json"):
        return json.loads(data)
    return data.decode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
