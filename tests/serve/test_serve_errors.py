"""Bad requests get OpenAI's error body and the right status, and the server keeps serving.

One strict server for the module: an API key (from FMS_SPEECH_API_KEY), a 1 MB upload limit,
900 s of audio at most, one window per model call and at most two requests in the queue.
"""

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import soundfile
from serving import multipart, start_server

from fms_speech.audio import load_audio, split_audio

API_KEY = "test-key-0123"
MAX_AUDIO_SECONDS = 900
HANG_GUARD = 300  # seconds: a bound on waiting for the server, not a check


@pytest.fixture(scope="module")
def strict(request, tmp_path_factory, model_dir):
    return start_server(
        request,
        tmp_path_factory,
        model_dir,
        "strict",
        *("--max-new-tokens", 6, "--max-batch", 1, "--max-queue", 2, "--max-upload-mb", 1),
        *("--max-audio-seconds", MAX_AUDIO_SECONDS),
        env={"FMS_SPEECH_API_KEY": API_KEY},
    )


@pytest.fixture(scope="module")
def client(strict):
    return strict.client(api_key=API_KEY)


@pytest.fixture(scope="module")
def silence(tmp_path_factory):
    """Long recordings of digital silence (FLAC keeps them tiny): name -> path."""
    directory = tmp_path_factory.mktemp("silence")
    files = {}
    for name, seconds in (("too_long", MAX_AUDIO_SECONDS + 1), ("blocker", 880), ("victim", 600)):
        files[name] = directory / f"{name}.flac"
        soundfile.write(files[name], np.zeros(int(seconds * 16000), np.int16), 16000)
    return files


def _still_serves(strict, client, speech_files, expected) -> None:
    strict.assert_healthy()
    path = speech_files[0]
    text = client.audio.transcriptions.create(file=path, model=strict.model).text
    assert text == expected[path.stem]["json"]["text"]


def _error(raised) -> dict:
    return raised.value.body


def _bad_files(directory, good: bytes) -> dict:
    """name -> (bytes, words its message must hold)."""
    nan = np.zeros(16000, np.float32)
    nan[100] = np.nan
    soundfile.write(directory / "nan.wav", nan, 16000, subtype="FLOAT")
    soundfile.write(directory / "empty.wav", np.zeros(0, np.float32), 16000)
    soundfile.write(directory / "click.wav", np.zeros(100, np.float32), 16000)
    return {
        "not audio": (b"these are meeting notes, not audio\n", "not audio"),
        "truncated": (good[: len(good) // 2], "truncated"),
        "empty": ((directory / "empty.wav").read_bytes(), "no audio"),
        "too short": ((directory / "click.wav").read_bytes(), "too short"),
        "nan": ((directory / "nan.wav").read_bytes(), "NaN or infinite"),
    }


@pytest.mark.parametrize("case", ["not audio", "truncated", "empty", "too short", "nan"])
def test_bad_audio_is_a_400_naming_the_file(case, strict, client, speech_files, expected, tmp_path):
    good = speech_files[0]  # a wav
    data, words = _bad_files(tmp_path, good.read_bytes())[case]
    with pytest.raises(openai.BadRequestError) as raised:
        client.audio.transcriptions.create(file=("meeting.wav", data), model=strict.model)
    error = _error(raised)
    assert error["type"] == "invalid_request_error" and error["param"] == "file"
    assert error["code"] == "invalid_audio"
    assert error["message"].startswith("Cannot load 'meeting.wav': ") and words in error["message"]
    assert "fms-speech-upload" not in error["message"]  # the server's file name stays private
    _still_serves(strict, client, speech_files, expected)


def test_longer_than_the_limit_is_a_400_naming_it(strict, client, silence, speech_files, expected):
    with pytest.raises(openai.BadRequestError) as raised:
        client.audio.transcriptions.create(file=silence["too_long"], model=strict.model)
    error = _error(raised)
    assert error["code"] == "audio_too_long" and error["param"] == "file"
    assert f"more than the {MAX_AUDIO_SECONDS} s allowed (--max-audio-seconds)" in error["message"]
    _still_serves(strict, client, speech_files, expected)


def test_an_upload_over_the_limit_is_a_413(strict, client, speech_files, expected):
    """Refused on its Content-Length, before its body is read."""
    with pytest.raises(openai.APIStatusError) as raised:
        client.audio.transcriptions.create(file=("big.wav", bytes(1_100_000)), model=strict.model)
    assert raised.value.status_code == 413
    assert _error(raised) == {
        "message": "The upload is larger than the 1 MB allowed (--max-upload-mb).",
        "type": "invalid_request_error",
        "param": "file",
        "code": "file_too_large",
    }
    _still_serves(strict, client, speech_files, expected)


def test_a_chunked_upload_is_cut_off_at_the_limit(strict, client, speech_files, expected):
    """No Content-Length: the limit is checked as the body streams in, 413 long before its end."""
    body, content_type = multipart({"model": strict.model}, {"file": ("big.wav", bytes(8 << 20))})
    connection = http.client.HTTPConnection("127.0.0.1", strict.port, timeout=HANG_GUARD)
    connection.putrequest("POST", "/v1/audio/transcriptions")
    connection.putheader("Authorization", f"Bearer {API_KEY}")
    connection.putheader("Content-Type", content_type)
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    sent = 0
    try:
        for start in range(0, len(body), 64 << 10):
            chunk = body[start : start + (64 << 10)]
            connection.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
        connection.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):  # the server stopped reading: expected
        pass
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "file_too_large"
    connection.close()
    _still_serves(strict, client, speech_files, expected)


def test_a_request_without_a_file_or_not_multipart_is_a_400(strict, client, speech_files, expected):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body, content_type = multipart({"model": strict.model}, {})
    status, answer = strict.post("/v1/audio/transcriptions", body, content_type, auth)
    assert status == 400
    assert answer["error"]["param"] == "file"
    assert answer["error"]["code"] == "missing_required_parameter"
    status, answer = strict.post("/v1/audio/transcriptions", b"{}", "application/json", auth)
    assert status == 400 and "multipart/form-data" in answer["error"]["message"]
    _still_serves(strict, client, speech_files, expected)


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"temperature": 0.7}, "temperature", "it does not sample"),
        ({"timestamp_granularities": ["word"]}, "timestamp_granularities", "'word' is not"),
        ({"response_format": "diarized_json"}, "response_format", "is not one of"),
        ({"response_format": "srt", "stream": True}, "stream", "json or text"),
        ({"extra_body": {"num_beams": "99"}}, "num_beams", "from 1 to 8"),
        ({"prompt": "<|audio|> and <|audio|>"}, "prompt", "exactly once"),
    ],
    ids=["temperature", "word-timestamps", "response-format", "stream-srt", "num-beams", "prompt"],
)
def test_an_unsupported_option_is_a_400_naming_it(
    fields, param, words, strict, client, speech_files
):
    with pytest.raises(openai.BadRequestError) as raised:
        client.audio.transcriptions.create(file=speech_files[0], model=strict.model, **fields)
    error = _error(raised)
    assert error["param"] == param and words in error["message"]
    strict.assert_healthy()


def test_the_api_key_is_required(strict, client, speech_files, expected):
    with pytest.raises(openai.AuthenticationError) as raised:
        strict.client(api_key="wrong-key").audio.transcriptions.create(
            file=speech_files[0], model=strict.model
        )
    assert _error(raised)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        strict.client(api_key="wrong-key").models.list()
    body, content_type = multipart({"model": strict.model}, {"file": ("a.wav", b"RIFF")})
    status, answer = strict.post("/v1/audio/transcriptions", body, content_type)  # no key
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert [model.id for model in client.models.list()] == [strict.model]
    assert strict.get("/health")[0] == 200 and strict.get("/metrics")[0] == 200  # probes
    _still_serves(strict, client, speech_files, expected)


def _wait_for(strict, condition) -> dict:
    """Poll /metrics until condition(samples) holds (a hang guard, not a timed check)."""
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        samples = strict.metrics()
        if condition(samples):
            return samples
        time.sleep(0.05)
    pytest.fail(f"the server never reached the expected state:\n{strict.log()}")


def _windows(path) -> int:
    return len(split_audio(load_audio(path), 30.0, 1.0))


def test_a_burst_beyond_the_queue_gets_503_at_once(strict, client, silence, speech_files, expected):
    """A long request holds the worker; of a burst of 8, one more fits (--max-queue 2)."""
    with ThreadPoolExecutor(9) as pool:
        blocker = pool.submit(
            client.audio.transcriptions.create, file=silence["blocker"], model=strict.model
        )
        _wait_for(strict, lambda m: m["fms_speech_requests_in_flight"] == 1)

        def send(path):
            try:
                return client.audio.transcriptions.create(file=path, model=strict.model).text
            except openai.APIStatusError as error:
                return error, blocker.done()  # refused while the queue was still full?

        burst = list(pool.map(send, speech_files[:8]))
        blocker.result()
    refused = [answer for answer in burst if isinstance(answer, tuple)]
    assert 1 <= len(refused) < len(burst)
    for error, blocker_done in refused:
        assert error.status_code == 503 and error.body["code"] == "queue_full"
        assert "--max-queue" in error.body["message"]
        assert not blocker_done  # at once, not after a wait for room
    for path, answer in zip(speech_files, burst, strict=False):
        if not isinstance(answer, tuple):
            assert answer == expected[path.stem]["json"]["text"]
    _still_serves(strict, client, speech_files, expected)


def _send_raw(strict, path, stream: bool) -> socket.socket:
    fields = {"model": strict.model, "stream": "true" if stream else "false"}
    body, content_type = multipart(fields, {"file": (path.name, path.read_bytes())})
    head = (
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1:{strict.port}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    connection = socket.create_connection(("127.0.0.1", strict.port), timeout=HANG_GUARD)
    connection.sendall(head.encode() + body)
    return connection


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_client_that_disconnects_frees_its_windows(
    stream, strict, client, silence, speech_files, expected
):
    before = strict.metrics()
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(
            client.audio.transcriptions.create, file=silence["blocker"], model=strict.model
        )
        _wait_for(strict, lambda m: m["fms_speech_requests_in_flight"] == 1)
        victim = _send_raw(strict, silence["victim"], stream)
        _wait_for(strict, lambda m: m["fms_speech_requests_in_flight"] == 2)
        victim.close()
        dropped = _wait_for(strict, lambda m: m["fms_speech_requests_in_flight"] == 1)
        assert not blocker.done()  # the victim's windows were dropped while still queued
        blocker.result()
    after = strict.metrics()
    assert dropped["fms_speech_dropped_windows_total"] - before.get(
        "fms_speech_dropped_windows_total", 0
    ) == _windows(silence["victim"])
    ran = after["fms_speech_batch_windows_sum"] - before["fms_speech_batch_windows_sum"]
    assert ran == _windows(silence["blocker"])  # none of the victim's
    assert after["fms_speech_queued_windows"] == 0 and after["fms_speech_requests_in_flight"] == 0
    assert "client disconnected" in strict.log()
    _still_serves(strict, client, speech_files, expected)
