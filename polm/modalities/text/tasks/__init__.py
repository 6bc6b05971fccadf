"""Synthetic text tasks that ship with polm, so every method has something to learn."""

from polm.modalities.text.tasks.arithmetic import arithmetic_preference_rows, arithmetic_rows

__all__ = ["arithmetic_preference_rows", "arithmetic_rows"]
