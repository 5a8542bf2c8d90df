"""IBM Granite Speech on the Foundation Model Stack.

Importing this package registers the `granite_speech` architecture with `fms.models`, its `hf`
checkpoint adapter, and the transformers config mapping used by `get_model("hf_pretrained")`.
"""

from fms_speech import checkpoint
from fms_speech.models import GraniteSpeech, GraniteSpeechConfig

checkpoint.install()

from fms_speech.transcribe import Segment, Transcriber, Transcription  # noqa: E402

__all__ = ["GraniteSpeech", "GraniteSpeechConfig", "Segment", "Transcriber", "Transcription"]
