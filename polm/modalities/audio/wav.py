"""Reading audio as 16 kHz mono float32: WAV with the standard library, other formats through ffmpeg."""

from __future__ import annotations

import math
import shutil
import wave
from pathlib import Path

import numpy as np

from polm.engine.errors import PolmError

SAMPLE_RATE = 16_000
_PCM_TYPES = {1: np.uint8, 2: np.int16, 4: np.int32}


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Samples of a PCM WAV file in [-1, 1], channels averaged, and its sample rate.

    Raises:
        PolmError: the file is missing or not a PCM WAV file (8, 16, 24 or 32 bit), naming it.
    """
    try:
        with wave.open(str(path), "rb") as handle:
            width, channels, rate = handle.getsampwidth(), handle.getnchannels(), handle.getframerate()
            raw = handle.readframes(handle.getnframes())
    except (FileNotFoundError, wave.Error, EOFError) as error:
        raise PolmError(f"cannot read audio {path}: {error or type(error).__name__}; expected a PCM WAV file") from None
    if width == 3:  # 24-bit: widen each sample to 32 bits, sign kept by the top byte
        bytes3 = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        samples = (np.pad(bytes3, ((0, 0), (1, 0))).view("<i4").ravel() / 2**31).astype(np.float32)
    elif width in _PCM_TYPES:
        samples = np.frombuffer(raw, dtype=_PCM_TYPES[width]).astype(np.float32)
        samples = (samples - 128) / 128 if width == 1 else samples / float(2 ** (8 * width - 1))
    else:
        raise PolmError(f"cannot read audio {path}: {8 * width}-bit samples; use 8, 16, 24 or 32-bit PCM")
    return samples.reshape(-1, channels).mean(axis=1), rate


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """``samples`` at ``rate`` Hz resampled to ``target`` Hz.

    Band-limited interpolation: each output sample is a windowed-sinc (Hann,
    16 zero crossings) sum of its input neighbours, with the cut-off at the
    lower of the two Nyquist frequencies, so downsampling does not alias.
    """
    if rate == target or len(samples) == 0:
        return samples.astype(np.float32)
    cutoff = min(1.0, target / rate)  # in units of the input Nyquist frequency
    half_width = math.ceil(16 / cutoff)  # input samples each side of an output sample
    times = np.arange(round(len(samples) * target / rate)) * (rate / target)  # output times in input samples
    output = np.zeros(len(times), dtype=np.float64)
    padded = np.pad(samples.astype(np.float64), half_width)
    base = np.floor(times).astype(np.int64)
    for offset in range(-half_width + 1, half_width + 1):
        index = base + offset
        distance = times - index
        kernel = cutoff * np.sinc(cutoff * distance) * (0.5 + 0.5 * np.cos(np.pi * distance / half_width))
        output += padded[index + half_width] * kernel
    return output.astype(np.float32)


def load_audio(path: str | Path) -> np.ndarray:
    """The file at ``path`` as 16 kHz mono float32 samples.

    WAV files are read here; other formats go through Whisper's ffmpeg reader.

    Raises:
        PolmError: the file is unreadable, or it is not WAV and ffmpeg is not installed.
    """
    path = Path(path)
    if _is_wav(path):
        samples, rate = read_wav(path)
        return resample(samples, rate)
    import whisper

    try:
        return whisper.load_audio(str(path), SAMPLE_RATE)
    except RuntimeError as error:
        raise PolmError(f"cannot read audio {path}: {str(error).splitlines()[0]}") from None


def check_audio(path: str | Path) -> None:
    """Fail where :func:`load_audio` would on a missing file, a WAV file whose header does not read or whose
    samples are not 8, 16, 24 or 32-bit PCM, or another format without ffmpeg; reads the header only.

    Raises:
        PolmError: naming the file.
    """
    path = Path(path)
    if not _is_wav(path):
        return  # ffmpeg reads it, or says why not, when it is loaded
    try:
        with wave.open(str(path), "rb") as handle:
            width = handle.getsampwidth()
    except (wave.Error, EOFError) as error:
        raise PolmError(f"cannot read audio {path}: {error or type(error).__name__}; expected a PCM WAV file") from None
    if width not in (1, 2, 3, 4):
        raise PolmError(f"cannot read audio {path}: {8 * width}-bit samples; use 8, 16, 24 or 32-bit PCM")


def _is_wav(path: Path) -> bool:
    """Whether ``path`` starts as a WAV file; for another format, that ffmpeg is there to read it.

    Raises:
        PolmError: no such file, or not WAV and ffmpeg is not installed.
    """
    if not path.is_file():
        raise PolmError(f"cannot read audio {path}: no such file")
    with path.open("rb") as handle:
        header = handle.read(12)
    if header[:4] == b"RIFF" and header[8:12] == b"WAVE":
        return True
    if shutil.which("ffmpeg") is None:
        raise PolmError(f"cannot read audio {path}: it is not a WAV file and ffmpeg is not installed; "
                        "convert it to WAV or install ffmpeg")
    return False
