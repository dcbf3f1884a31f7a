"""espeak-ng speech synthesis through the pip-installable ``espeakng-loader``.

The wheel ships libespeak-ng and its voice data but no Python API, so this
module drives the C API with ctypes (synchronous mode, audio retrieved by a
callback). No system package is needed. espeak-ng is deterministic: the same
text, voice, rate and pitch give the same samples.
"""

import ctypes
import threading
from dataclasses import dataclass

import numpy as np

TARGET_SAMPLE_RATE = 16000

# espeak_ng.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_RATE = 1
_ESPEAK_VOLUME = 2
_ESPEAK_PITCH = 3
_ESPEAK_RANGE = 4
_EE_OK = 0

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: an espeak-ng voice+variant with its prosody."""

    name: str  # e.g. "en-us+m1"
    rate: int  # words per minute
    pitch: int  # 0-100
    pitch_range: int  # 0-100


class EspeakSynthesizer:
    """Text → 16 kHz float32 waveform with espeak-ng. One instance per process."""

    _lock = threading.Lock()

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError as err:  # pragma: no cover - covered by requirements
            raise RuntimeError("espeakng-loader is not installed: run ./install.sh") from err
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        data_path = espeakng_loader.get_data_path().encode()
        rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, ctypes.c_char_p(data_path), 0
        )
        if rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise with data at {data_path!r}")
        self.native_rate = rate
        self._chunks = []
        self._callback = _SYNTH_CALLBACK(self._collect)
        self._lib.espeak_SetSynthCallback(self._callback)
        self._voice = None

    def _collect(self, wav, numsamples, events):
        if numsamples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        return 0

    def _set_voice(self, voice):
        if voice == self._voice:
            return
        if self._lib.espeak_SetVoiceByName(voice.name.encode()) != _EE_OK:
            raise ValueError(f"espeak-ng has no voice {voice.name!r}")
        for param, value in (
            (_ESPEAK_RATE, voice.rate),
            (_ESPEAK_PITCH, voice.pitch),
            (_ESPEAK_RANGE, voice.pitch_range),
            (_ESPEAK_VOLUME, 100),
        ):
            self._lib.espeak_SetParameter(param, value, 0)
        self._voice = voice

    def synthesize(self, text, voice, seed=0):
        """Return a float32 mono waveform at 16 kHz, leading/trailing silence trimmed."""
        if not text.strip():
            raise ValueError("Cannot synthesise an empty sentence")
        with self._lock:
            self._set_voice(voice)
            # espeak-ng jitters voicing with rand(); its other generator state is
            # static and survives re-initialisation, so the corpus builder also
            # synthesises in a fresh process (see corpus.builder).
            self._lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
            self._chunks = []
            encoded = text.encode("utf-8") + b"\0"
            status = self._lib.espeak_Synth(
                ctypes.c_char_p(encoded),
                len(encoded),
                0,
                _POS_CHARACTER,
                0,
                _ESPEAK_CHARS_UTF8,
                None,
                None,
            )
            if status != _EE_OK:
                raise RuntimeError(f"espeak-ng failed ({status}) on {text!r}")
            self._lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        if not chunks:
            raise RuntimeError(f"espeak-ng produced no audio for {text!r}")
        audio = np.concatenate(chunks).astype(np.float32) / 32768.0
        audio = _trim_silence(audio)
        return _resample(audio, self.native_rate, TARGET_SAMPLE_RATE)


def _trim_silence(audio, threshold=1e-3, margin=400):
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if loud.size == 0:
        return audio
    return audio[max(loud[0] - margin, 0) : loud[-1] + margin]


def _resample(audio, orig_rate, new_rate):
    if orig_rate == new_rate:
        return audio
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(orig_rate, new_rate)
    return resample_poly(audio, new_rate // g, orig_rate // g).astype(np.float32)
