"""The Granite Speech family for FMS: architectures `granite_speech`, `granite_speech_plus` and
`granite_speech5`, registered with `fms.models` on import."""

from fms_speech.models.conformer import ConformerConfig, ConformerEncoder
from fms_speech.models.granite_speech import GraniteSpeech, GraniteSpeechConfig
from fms_speech.models.granite_speech5 import GraniteSpeech5, GraniteSpeech5Config
from fms_speech.models.granite_speech_plus import GraniteSpeechPlus, GraniteSpeechPlusConfig
from fms_speech.models.qformer import QFormerConfig, QFormerProjector

__all__ = [
    "ConformerConfig",
    "ConformerEncoder",
    "GraniteSpeech",
    "GraniteSpeech5",
    "GraniteSpeech5Config",
    "GraniteSpeechConfig",
    "GraniteSpeechPlus",
    "GraniteSpeechPlusConfig",
    "QFormerConfig",
    "QFormerProjector",
]
