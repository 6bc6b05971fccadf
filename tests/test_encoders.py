"""Encoders: output widths and token counts of the tiny configs, WAV reading and resampling without ffmpeg."""

from __future__ import annotations

import wave

import numpy as np
import pytest
import torch
from PIL import Image

from polm.engine.errors import PolmError
from polm.modalities.audio.wav import load_audio, read_wav, resample
from polm.modalities.multimodal.encoder import build_encoder


def _write_wav(path, samples: np.ndarray, rate: int, width: int = 2, channels: int = 1) -> None:
    scale = {1: 127, 2: 32767, 4: 2**31 - 1}[width]
    ints = np.round(samples * scale).astype({1: np.int16, 2: "<i2", 4: "<i4"}[width])
    data = (ints + 128).astype(np.uint8).tobytes() if width == 1 else ints.tobytes()
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(width)
        handle.setframerate(rate)
        handle.writeframes(data)


def test_open_clip_tiny_reports_width_and_patch_tokens(tmp_path):
    """A 32x32 image in 8x8 patches gives 16 tokens of the tower's width 64; frozen by default."""
    encoder = build_encoder("open_clip:polm-tiny-vit")
    Image.new("RGB", (50, 40), (255, 0, 0)).save(tmp_path / "red.png")  # resized and cropped by open_clip
    pixels = encoder.load(str(tmp_path / "red.png"))
    assert pixels.shape == (3, 32, 32)
    assert (encoder.width, encoder.num_tokens) == (64, 16)
    assert encoder(torch.stack([pixels, pixels])).shape == (2, 16, 64)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert any(p.requires_grad for p in build_encoder("open_clip:polm-tiny-vit", {"freeze": False}).parameters())


def test_frozen_encoder_reuses_features(tmp_path):
    encoder = build_encoder("open_clip:polm-tiny-vit")
    Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / "blue.png")
    first = encoder.encode_files([str(tmp_path / "blue.png")])
    (tmp_path / "blue.png").unlink()  # a cached file is not read again
    torch.testing.assert_close(encoder.encode_files([str(tmp_path / "blue.png")] * 2), first.expand(2, -1, -1))


def test_whisper_tiny_reports_width_and_tokens(tmp_path):
    """2 s windows: 200 log-mel frames of 80 mels, 100 tokens of width 64 after the stride-2 convolution."""
    encoder = build_encoder("whisper:polm-tiny")
    _write_wav(tmp_path / "tone.wav", 0.5 * np.sin(np.arange(4000) * 0.2), 8000)
    mel = encoder.load(str(tmp_path / "tone.wav"))
    assert mel.shape == (80, 200)
    assert (encoder.width, encoder.num_tokens) == (64, 100)
    assert encoder(torch.stack([mel, mel])).shape == (2, 100, 64)


@pytest.mark.parametrize("spec, message", [
    ("open_clip", "must be written '<family>:<model>'"),
    ("clip:ViT-B-32", "unknown encoder 'clip'"),
    ("open_clip:ViT-Nope", "open_clip has no architecture 'ViT-Nope'"),
    ("whisper:enormous", "whisper has no model 'enormous'"),
])
def test_bad_encoder_specs_say_what_exists(spec, message):
    with pytest.raises(PolmError, match=message):
        build_encoder(spec)


def test_unknown_encoder_option_lists_the_options():
    with pytest.raises(PolmError, match="encoder 'whisper': unknown option 'frozen'. Did you mean 'freeze'\\?.* Valid options: "):
        build_encoder("whisper:polm-tiny", {"frozen": True})


@pytest.mark.parametrize("width", [1, 2, 4])
def test_read_wav_scales_pcm_to_unit_range_and_averages_channels(tmp_path, width):
    """Stereo (0.5, -0.25) averages to 0.125, whatever the sample width."""
    stereo = np.tile([0.5, -0.25], 100)
    _write_wav(tmp_path / "s.wav", stereo, 16000, width=width, channels=2)
    samples, rate = read_wav(tmp_path / "s.wav")
    assert rate == 16000 and samples.shape == (100,)
    np.testing.assert_allclose(samples, 0.125, atol=2 / 127)


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_resample_keeps_a_tone_and_its_length(tmp_path, rate):
    """A 440 Hz sine at ``rate`` Hz read as 16 kHz is the same sine, one second long."""
    _write_wav(tmp_path / "a.wav", 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate), rate)
    audio = load_audio(tmp_path / "a.wav")
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert audio.dtype == np.float32 and len(audio) == 16000
    np.testing.assert_allclose(audio[400:-400], expected[400:-400], atol=2e-3)


def test_resample_removes_frequencies_above_the_new_nyquist():
    """12 kHz cannot exist at 16 kHz; downsampling must not fold it to 4 kHz."""
    tone = np.sin(2 * np.pi * 12000 * np.arange(44100) / 44100)
    assert np.sqrt(np.mean(resample(tone, 44100)[400:-400] ** 2)) < 0.01


def test_unreadable_audio_names_the_file(tmp_path, monkeypatch):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(PolmError, match=f"cannot read audio {broken}"):
        load_audio(broken)
    with pytest.raises(PolmError, match="no such file"):
        load_audio(tmp_path / "missing.wav")
    mp3 = tmp_path / "clip.mp3"
    mp3.write_bytes(b"ID3 not really")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(PolmError, match="not a WAV file and ffmpeg is not installed"):
        load_audio(mp3)
