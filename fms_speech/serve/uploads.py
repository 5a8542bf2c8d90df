"""Reading a multipart upload with a size limit, and decoding its audio under a server-chosen name.

The limit is checked against Content-Length before anything is read, and again while the body
streams in (chunked uploads have no Content-Length), so an oversized upload is refused without
being buffered. The audio is written to a temporary file whose name the server picks (only a
known audio suffix is kept from the client's name, as a hint for the decoder), read with
`load_audio` (every check of the CLI: not audio, truncated, empty, too short, NaN), and removed.
"""

import os
import shutil
import tempfile
from pathlib import PurePath

import torch
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from fms_speech.audio import AudioError, load_audio

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au"}
MAX_FIELDS = 32
MAX_FIELD_BYTES = 64 * 1024  # a prompt is text, never megabytes


class UploadTooLarge(Exception):
    pass


class NotMultipart(Exception):
    pass


async def read_form(request: Request, max_bytes: int) -> FormData:
    """The request's multipart form; UploadTooLarge once the body passes max_bytes."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise NotMultipart
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise UploadTooLarge
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise UploadTooLarge
        return message

    limited = Request(request.scope, receive)
    return await limited.form(max_files=1, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES)


def display_name(upload: UploadFile) -> str:
    """The client's file name for messages and logs: its last part, printable, at most 80 chars."""
    name = PurePath((upload.filename or "").replace("\\", "/")).name
    name = "".join(c if c.isprintable() else "?" for c in name)[:80]
    return name or "upload"


def load_upload(upload: UploadFile, name: str) -> torch.Tensor:
    """Decode the upload as the CLI decodes a file; AudioError naming `name` if unusable."""
    suffix = PurePath(upload.filename or "").suffix.lower()
    handle, path = tempfile.mkstemp(
        prefix="fms-speech-upload-", suffix=suffix if suffix in AUDIO_SUFFIXES else ""
    )
    try:
        with os.fdopen(handle, "wb") as file:
            upload.file.seek(0)
            shutil.copyfileobj(upload.file, file)
        try:
            return load_audio(path)
        except AudioError as error:  # name the client's file, never the server's path
            raise AudioError(str(error).replace(f"'{path}'", f"'{name}'")) from None
    finally:
        os.unlink(path)
