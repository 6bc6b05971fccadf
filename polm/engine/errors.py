"""Errors that polm reports to users as one line and a non-zero exit."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PolmError(Exception):
    """A problem with the user's input: recipe, options, data, plugin or path.

    The CLI prints ``str(error)`` on one line and exits with status 2, so the
    message must name what is wrong (file, line, field, option) and how to fix it.
    """


class PluginError(PolmError):
    """A plugin failed to import or raised inside a hook."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """Return the candidate most similar to ``name``, or None if none is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A ``" Did you mean 'x'?"`` suffix, or an empty string when nothing is close."""
    match = closest(name, candidates)
    return f" Did you mean '{match}'?" if match else ""
