"""Audio encoders from openai-whisper: ``whisper:<size>`` (or a local checkpoint), its log-mel front end and encoder.

Audio is read as 16 kHz mono (:func:`polm.modalities.audio.wav.load_audio`),
padded or cut to the encoder's window (30 s for the released models), turned
into Whisper's log-mel spectrogram and encoded; every 20 ms of audio is one
token. ``whisper:polm-tiny`` is a two-layer encoder over 2 s windows (100
tokens), randomly initialised (:func:`init_tiny_front_end`), for tests and the quickstart.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polm.engine.errors import PolmError
from polm.engine.media import Encoder
from polm.engine.options import parse_options
from polm.modalities.audio.wav import check_audio, load_audio

TINY_NAME = "polm-tiny"


def tiny_dimensions() -> object:
    """The ``ModelDimensions`` of ``whisper:polm-tiny``: 80 mels, 100 audio tokens (2 s), width 64, 2 layers."""
    from whisper.model import ModelDimensions

    return ModelDimensions(n_mels=80, n_audio_ctx=100, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                           n_vocab=64, n_text_ctx=8, n_text_state=64, n_text_head=4, n_text_layer=1)


# Weight std of polm-tiny's convolutions, times 1/sqrt(fan_in); measured on polm:tones (see init_tiny_front_end).
TINY_CONV_GAIN = 6.0


def init_tiny_front_end(encoder: torch.nn.Module) -> None:
    """Initialise the two convolutions of a random-init encoder so that its tokens carry the sound.

    Whisper never initialises its weights (released models are loaded), so
    they keep PyTorch's defaults, std 1/sqrt(3 fan_in). On log-mels (std about
    0.3) the convolutions then output std 0.03 against sinusoidal positions of
    std 0.6 added after them: the tokens say where they are, hardly what they
    hear (features vary 0.015 across clips, 0.5 across positions), and a
    resampler on the frozen encoder counted beeps at chance. Normal weights of
    std TINY_CONV_GAIN/sqrt(fan_in) and zero biases let the sound through.
    """
    with torch.no_grad():
        for conv in (encoder.conv1, encoder.conv2):
            fan_in = conv.weight.shape[1] * conv.weight.shape[2]
            conv.weight.normal_(0.0, TINY_CONV_GAIN / fan_in ** 0.5)
            conv.bias.zero_()


@dataclass
class WhisperOptions:
    """Options of ``whisper`` encoders."""

    freeze: bool = field(default=True, metadata={"help": "keep the encoder's weights as they are"})
    download_root: str | None = field(default=None, metadata={
        "help": "where released checkpoints are looked for and downloaded (default ~/.cache/whisper)"})
    cache_size: int = field(default=4096, metadata={"help": "features of this many clips kept while frozen (0: off)"})

    def __post_init__(self) -> None:
        if self.cache_size < 0:
            raise ValueError(f"'cache_size' must not be negative, got {self.cache_size}")


class WhisperEncoder(Encoder):
    """Whisper's audio encoder; its tokens are the encoder's output frames (one per 20 ms)."""

    modality = "audio"

    def __init__(self, name: str, options: WhisperOptions) -> None:
        import whisper
        from whisper.audio import N_SAMPLES_PER_TOKEN

        if name == TINY_NAME:
            model = whisper.model.Whisper(tiny_dimensions())
            init_tiny_front_end(model.encoder)
        elif name in whisper.available_models() or Path(name).is_file():
            try:
                model = whisper.load_model(name, device="cpu", download_root=options.download_root)
            except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as error:
                raise PolmError(f"whisper:{name}: cannot load the checkpoint: {str(error).splitlines()[0]}; "
                                "pass the path of a downloaded checkpoint (.pt) instead") from None
        else:
            raise PolmError(f"whisper has no model '{name}' and no such file; available: "
                            f"{', '.join([TINY_NAME, *whisper.available_models()])}")
        dims = model.dims
        super().__init__(f"whisper:{name}", options, width=dims.n_audio_state, num_tokens=dims.n_audio_ctx,
                         freeze=options.freeze, rebuilds_weights=name != TINY_NAME, cache_size=options.cache_size)
        self.n_mels = dims.n_mels
        self.samples = dims.n_audio_ctx * N_SAMPLES_PER_TOKEN
        self.encoder = model.encoder  # the text decoder is dropped
        self.requires_grad_(not options.freeze)

    def load(self, path: str) -> torch.Tensor:
        """(n_mels, 2 * num_tokens) log-mel spectrogram of the clip at ``path``, padded or cut to the window."""
        from whisper.audio import log_mel_spectrogram, pad_or_trim

        audio = pad_or_trim(torch.from_numpy(load_audio(path)), self.samples)
        return log_mel_spectrogram(audio, self.n_mels)

    def check_file(self, path: str) -> None:
        """Fail where :meth:`load` would, reading the file's header only."""
        check_audio(path)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(N, n_mels, 2 * num_tokens) -> (N, num_tokens, width)."""
        return self.encoder(inputs)


def whisper_encoder(name: str, **options: object) -> WhisperEncoder:
    """The factory registered as ``whisper``: ``build_encoder("whisper:base")`` or ``"whisper:/path/model.pt"``."""
    return WhisperEncoder(name, parse_options("encoder 'whisper'", WhisperOptions, options))
