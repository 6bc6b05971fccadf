"""Synthetic text tasks that ship with polm, so every method has something to learn."""

from polm.modalities.text.tasks.arithmetic import (
    arithmetic_paths_rows,
    arithmetic_preference_rows,
    arithmetic_rows,
    arithmetic_worked_rows,
)
from polm.modalities.text.tasks.arithmetic_chains import arithmetic_step_rows, arithmetic_think_rows

__all__ = ["arithmetic_paths_rows", "arithmetic_preference_rows", "arithmetic_rows", "arithmetic_step_rows",
           "arithmetic_think_rows", "arithmetic_worked_rows"]
