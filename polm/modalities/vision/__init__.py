"""Vision: image encoders from open_clip, and the bundled ``polm:shapes`` task."""
