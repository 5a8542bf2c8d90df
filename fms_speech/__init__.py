"""IBM Granite Speech on the Foundation Model Stack.

Importing this package registers the `granite_speech` architecture with `fms.models`, its `hf`
checkpoint adapter, and the transformers config mapping used by `get_model("hf_pretrained")`.
It changes nothing else in FMS; `fms_speech.checkpoint.index_aware_loading()` is the one
opt-in change to FMS's loading (see its docstring).
"""

from fms_speech.models import GraniteSpeech, GraniteSpeechConfig
from fms_speech.transcribe import Segment, TranscribeOptions, Transcriber, Transcription

__all__ = [
    "GraniteSpeech",
    "GraniteSpeechConfig",
    "Segment",
    "TranscribeOptions",
    "Transcriber",
    "Transcription",
]
