"""Offline speech for tests and the benchmark: eSpeak NG (espeakng-loader wheel) via ctypes."""

import ctypes
import functools
import os

import espeakng_loader
import numpy as np
import soundfile

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of exiting the process
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
# espeak_PARAMETER values (speak_lib.h)
_RATE, _PITCH, _RANGE = 1, 3, 4
DEFAULT_RATE, DEFAULT_PITCH, DEFAULT_RANGE = 175, 50, 50  # words per minute, 0-99, 0-99
_EVENT_END_OF_LIST, _EVENT_WORD, _EVENT_END = 0, 1, 5  # espeak_EVENT_TYPE


class _Event(ctypes.Structure):
    """espeak_EVENT (speak_lib.h); audio_position in milliseconds from the start."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)

# format -> (soundfile format, subtype)
FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "wav-float": ("WAV", "FLOAT"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}


class _Engine:
    """One eSpeak NG instance per process: the library keeps global state."""

    def __init__(self):
        self.library = ctypes.CDLL(espeakng_loader.get_library_path())
        self.library.espeak_Initialize.restype = ctypes.c_int
        self.library.espeak_Initialize.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        self.library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.library.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.library.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        data_path = os.fsencode(espeakng_loader.get_data_path())
        self.sample_rate = self.library.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, _INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate})")
        self.chunks: list[np.ndarray] = []
        self.word_starts: list[float] = []  # seconds, one per spoken word
        self.end = 0.0  # seconds: where the speech ends
        self.callback = _SYNTH_CALLBACK(self._collect)  # kept alive as long as the engine
        self.library.espeak_SetSynthCallback(self.callback)

    def _collect(self, samples, count, events) -> int:
        if count > 0:
            self.chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        index = 0
        while events and events[index].type != _EVENT_END_OF_LIST:
            event = events[index]
            if event.type == _EVENT_WORD:
                self.word_starts.append(event.audio_position / 1000)
            elif event.type == _EVENT_END:
                self.end = event.audio_position / 1000
            index += 1
        return 0  # continue

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int):
        if self.library.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        # set every call: the engine is shared, a previous caller's settings must not leak
        for parameter, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
            if self.library.espeak_SetParameter(parameter, int(value), 0) != 0:
                raise ValueError(f"eSpeak NG refused parameter {parameter} = {value}")
        self.chunks, self.word_starts, self.end = [], [], 0.0
        encoded = text.encode()
        status = self.library.espeak_Synth(
            encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed ({status})")
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)


@functools.cache
def _engine() -> _Engine:
    return _Engine()


def synthesize(
    text: str,
    voice: str = "en",
    rate: int = DEFAULT_RATE,
    pitch: int = DEFAULT_PITCH,
    pitch_range: int = DEFAULT_RANGE,
) -> tuple[np.ndarray, int]:
    """Speak `text`: mono float32 samples in [-1, 1] and their sample rate (22050 Hz).

    voice: a language with an optional variant, e.g. "en-US+f2"; rate in words per minute
    (80-450); pitch and pitch_range 0-99.
    """
    engine = _engine()
    samples = engine.synthesize(text, voice, rate, pitch, pitch_range)
    return samples.astype(np.float32) / 32768, engine.sample_rate


def word_timing() -> tuple[list[float], float]:
    """(start of each word, end of the speech) in seconds, of the last `synthesize` call in this
    process (eSpeak NG's word events: where each word's sound begins)."""
    engine = _engine()
    return list(engine.word_starts), engine.end


def write_audio(path, samples: np.ndarray, sample_rate: int, format: str) -> None:
    """Write samples ((n,) or (n, channels)) as one of FORMATS."""
    file_format, subtype = FORMATS[format]
    soundfile.write(path, samples, sample_rate, format=file_format, subtype=subtype)
