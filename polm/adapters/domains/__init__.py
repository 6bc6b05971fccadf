"""Built-in domains: ``code`` (the standard library's Python source) and ``math`` (the arithmetic tasks).

Each is a :class:`polm.engine.domains.Domain`; :func:`builtin_domains` builds them for
``polm_register_domains`` and :data:`.command.DOMAIN_COMMAND` is ``polm domain``.
"""

from __future__ import annotations

from pathlib import Path

from polm.engine.data import BundledDataset
from polm.engine.domains import Domain
from polm.engine.hookspecs import Register

RECIPES = Path(__file__).resolve().parent / "recipes"


def register_datasets(register: Register) -> None:
    """``polm:stdlib-code`` and ``polm:stdlib-firstline``."""
    from polm.adapters.domains.code import code_rows, firstline_rows

    register("stdlib-code", BundledDataset(code_rows, description=(
        "Python source of this machine's standard library as text chunks, split by file (continued pretraining)")))
    register("stdlib-firstline", BundledDataset(firstline_rows, description=(
        "functions of polm:stdlib-code's files: the source up to the def line and docstring, and the body's "
        "first line")))


def register_domains(register: Register) -> None:
    """The ``code`` and ``math`` domains."""
    from polm.adapters.domains.code import evaluate_code
    from polm.adapters.domains.math import evaluate_math

    register("code", Domain(
        description="Python, from the standard library's own source files (no download)",
        datasets=("stdlib-code", "stdlib-firstline"), recipe=RECIPES / "code.yaml", evaluator=evaluate_code,
        metrics=("bits_per_byte", "first_line_exact_match")))
    register("math", Domain(
        description="the bundled arithmetic questions, levels 1-4",
        datasets=("arithmetic",), recipe=RECIPES / "math.yaml", evaluator=evaluate_math,
        metrics=("exact_match", "exact_match/level_N")))
