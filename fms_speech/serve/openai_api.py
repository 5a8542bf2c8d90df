"""OpenAI's audio API: the request's form fields in, the response formats out, and its errors.

Fields follow `POST /v1/audio/transcriptions` and `/v1/audio/translations`; two extensions
(`num_beams`, `max_new_tokens`, e.g. the openai client's `extra_body`) pick the decoding. Bodies
match the openai client's types (`Transcription`, `TranscriptionVerbose`, `TranslationVerbose`,
plain strings for text/srt/vtt).
"""

import dataclasses
import zlib
from dataclasses import dataclass

from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import FormData, UploadFile

from fms_speech.ctc import CTCRunner, UnsupportedOption
from fms_speech.prompts import LANGUAGES
from fms_speech.transcribe import TranscribeOptions, Transcription
from fms_speech.writers import to_srt, to_txt, to_vtt

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STREAM_FORMATS = ("json", "text")


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


@dataclass(frozen=True)
class Limits:
    """What the server allows a request to ask for."""

    served_model_name: str
    options: TranscribeOptions  # every request starts from these (the serve command's options)
    max_num_beams: int = 8
    ctc: bool = False  # a CTC model (granite_speech5): transcribes only, with word timestamps


@dataclass(frozen=True)
class AudioRequest:
    upload: UploadFile
    options: TranscribeOptions
    response_format: str
    stream: bool
    language: str  # verbose_json's `language`: a lower-case name, as OpenAI writes it
    words: bool = False  # verbose_json lists the words with their times (CTC models)


def parse_request(form: FormData, task: str, limits: Limits) -> AudioRequest:
    """Check every field (the audio aside); APIError with the field's name if one is wrong."""
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise APIError(
            400,
            "The request has no 'file': send the audio as a file field named 'file'.",
            param="file",
            code="missing_required_parameter",
        )
    model = _text(form, "model")
    if model and model != limits.served_model_name:
        raise APIError(
            404,
            f"The model '{model}' does not exist: this server serves '{limits.served_model_name}'.",
            param="model",
            code="model_not_found",
        )
    response_format = _text(form, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        choices = ", ".join(RESPONSE_FORMATS)
        raise APIError(
            400,
            f"response_format '{response_format}' is not one of {choices}.",
            param="response_format",
            code="invalid_value",
        )
    _check_temperature(_text(form, "temperature"))
    words = _check_granularities(form, limits.ctc)
    stream = _flag(form, "stream")
    if stream and response_format not in STREAM_FORMATS:
        raise APIError(
            400,
            "stream=true sends text events: response_format must be json or text.",
            param="stream",
            code="invalid_value",
        )
    language = _text(form, "language") or None
    overrides = {
        "task": task,
        "language": (language or "en") if task == "translate" else None,
        "prompt": _text(form, "prompt") or None,
    }
    num_beams = _integer(form, "num_beams", 1, limits.max_num_beams)
    max_new_tokens = _integer(form, "max_new_tokens", 1, limits.options.max_new_tokens)
    overrides |= {"num_beams": num_beams} if num_beams is not None else {}
    overrides |= {"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {}
    try:
        options = dataclasses.replace(limits.options, **overrides)
    except ValueError as error:  # e.g. a prompt without a usable instruction
        raise APIError(400, str(error), param="prompt", code="invalid_value") from None
    if limits.ctc:
        try:
            CTCRunner.check_options(options)
        except UnsupportedOption as refused:  # the translate endpoint has no parameter to name
            param = None if refused.option == "task" else refused.option
            message = f"This model is a CTC model: it {refused.reason}."
            raise APIError(400, message, param=param, code="unsupported_value") from None
    target = overrides["language"] if task == "translate" else language or "en"
    name = LANGUAGES.get(target.lower(), target).lower()
    return AudioRequest(upload, options, response_format, stream, name, words)


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise APIError(
            400, f"'{name}' must be a text field, not a file.", param=name, code="invalid_type"
        )
    return value.strip() if isinstance(value, str) else None


def _flag(form: FormData, name: str) -> bool:
    value = (_text(form, name) or "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise APIError(
            400, f"'{name}' must be true or false, not '{value}'.", param=name, code="invalid_value"
        )
    return value in ("true", "1")


def _integer(form: FormData, name: str, low: int, high: int) -> int | None:
    value = _text(form, name)
    if value is None:
        return None
    if not value.isdigit() or not low <= int(value) <= high:
        raise APIError(
            400,
            f"'{name}' must be a whole number from {low} to {high}, not '{value}'.",
            param=name,
            code="invalid_value",
        )
    return int(value)


def _check_temperature(value: str | None) -> None:
    try:
        temperature = float(value) if value else 0.0
    except ValueError:
        raise APIError(
            400,
            f"temperature must be a number, not '{value}'.",
            param="temperature",
            code="invalid_value",
        ) from None
    if temperature != 0:
        raise APIError(
            400,
            "temperature must be 0: this server decodes greedily (or with num_beams), "
            "it does not sample.",
            param="temperature",
            code="unsupported_value",
        )


def _check_granularities(form: FormData, ctc: bool) -> bool:
    """Whether word timestamps were asked for (a CTC model has them)."""
    values = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    for value in values:
        if value not in ("segment", "word"):
            raise APIError(
                400,
                f"timestamp_granularities '{value}' is not segment or word.",
                param="timestamp_granularities",
                code="invalid_value",
            )
        if value == "word" and not ctc:
            raise APIError(
                400,
                "timestamp_granularities 'word' is not available for this model: its segments "
                "are its windows; use 'segment'.",
                param="timestamp_granularities",
                code="unsupported_value",
            )
    return "word" in values


# ---- responses


def render(result: Transcription, request: AudioRequest) -> Response:
    if request.response_format == "json":
        return JSONResponse({"text": result.text, "usage": _usage(result)})
    if request.response_format == "verbose_json":
        return JSONResponse(verbose_json(result, request))
    writer = {"text": to_txt, "srt": to_srt, "vtt": to_vtt}[request.response_format]
    return PlainTextResponse(writer(result, {}))


def verbose_json(result: Transcription, request: AudioRequest) -> dict:
    """TranscriptionVerbose / TranslationVerbose: one segment per window that said something."""
    segments = [
        {
            "id": index,
            "seek": round(segment.start * 100),  # in 10 ms frames, as whisper counts
            "start": segment.start,
            "end": segment.end,
            "text": segment.text,
            "tokens": segment.tokens,
            "temperature": 0.0,
            "avg_logprob": segment.avg_logprob,
            "compression_ratio": compression_ratio(segment.text),
            "no_speech_prob": segment.no_speech_prob,
        }
        for index, segment in enumerate(result.segments)
    ]
    body = {
        "task": request.options.task,
        "language": request.language,
        "duration": result.duration,
        "text": result.text,
        "segments": segments,
        "usage": _usage(result),
    }
    if request.words:  # OpenAI's TranscriptionWord: each word's first and last emitting frame
        body["words"] = [
            {"word": word.text, "start": word.start, "end": word.end} for word in result.words
        ]
    return body


def compression_ratio(text: str) -> float:
    """Bytes of text per byte of its zlib compression (whisper's repetition measure)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _usage(result: Transcription) -> dict:
    return {"type": "duration", "seconds": result.duration}
