"""Text: the embedded default model ``polm-tiny`` and the bundled text tasks."""
