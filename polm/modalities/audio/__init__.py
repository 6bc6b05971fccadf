"""Audio: WAV reading without ffmpeg, Whisper encoders, and the bundled ``polm:tones`` task."""
