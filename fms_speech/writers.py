"""Output formats: txt, json, srt, vtt, tsv; each file written whole or not at all."""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from fms_speech.transcribe import Transcription


def _clock(seconds: float, decimal_marker: str) -> str:
    milliseconds = round(seconds * 1000)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    seconds, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{decimal_marker}{milliseconds:03d}"


def _cue_text(text: str) -> str:
    # "-->" inside a cue's text would read as a timing line to subtitle parsers (as whisper does)
    return text.replace("-->", "->")


def to_txt(result: Transcription, metadata: dict) -> str:
    return result.text + "\n"


def to_json(result: Transcription, metadata: dict) -> str:
    document = {
        "source": result.source,
        "text": result.text,
        "segments": [_segment_json(segment) for segment in result.segments],
        "duration": round(result.duration, 3),
        "timings": {stage: round(seconds, 4) for stage, seconds in result.timings.items()},
        **metadata,
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _segment_json(segment) -> dict:
    document = {
        "start": round(segment.start, 3),
        "end": round(segment.end, 3),
        "text": segment.text,
    }
    if segment.words:  # CTC models: each word's first and last emitting frame
        document["words"] = [
            {"start": round(w.start, 3), "end": round(w.end, 3), "word": w.text}
            for w in segment.words
        ]
    return document


def to_srt(result: Transcription, metadata: dict) -> str:
    blocks = [
        f"{number}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{_cue_text(s.text)}\n"
        for number, s in enumerate(result.segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(result: Transcription, metadata: dict) -> str:
    blocks = [
        f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{_cue_text(s.text)}\n"
        for s in result.segments
    ]
    return "\n".join(["WEBVTT\n", *blocks])


def to_tsv(result: Transcription, metadata: dict) -> str:
    # milliseconds, as whisper writes them, so spreadsheets keep them exact
    rows = [f"{round(s.start * 1000)}\t{round(s.end * 1000)}\t{s.text}" for s in result.segments]
    return "\n".join(["start\tend\ttext", *rows]) + "\n"


WRITERS: dict[str, Callable[[Transcription, dict], str]] = {
    "txt": to_txt,
    "json": to_json,
    "srt": to_srt,
    "vtt": to_vtt,
    "tsv": to_tsv,
}


def output_formats(choice: str) -> list[str]:
    return list(WRITERS) if choice == "all" else [choice]


def write_atomic(path: Path, content: str) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(content)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_result(
    result: Transcription, output_dir: Path, stem: str, formats: list[str], metadata: dict
) -> list[Path]:
    """Write every requested format of one result; return the paths written."""
    paths = []
    for name in formats:
        path = output_dir / f"{stem}.{name}"
        write_atomic(path, WRITERS[name](result, metadata))
        paths.append(path)
    return paths
