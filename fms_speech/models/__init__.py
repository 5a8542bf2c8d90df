"""Granite Speech model family for FMS (registered as architecture `granite_speech`)."""

from fms_speech.models.conformer import ConformerConfig, ConformerEncoder
from fms_speech.models.granite_speech import GraniteSpeech, GraniteSpeechConfig
from fms_speech.models.qformer import QFormerConfig, QFormerProjector

__all__ = [
    "ConformerConfig",
    "ConformerEncoder",
    "GraniteSpeech",
    "GraniteSpeechConfig",
    "QFormerConfig",
    "QFormerProjector",
]
