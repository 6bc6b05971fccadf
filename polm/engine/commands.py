"""Commands of the ``polm`` command line, built in or contributed through ``polm_register_commands``.

A plugin adds ``polm hello`` like this::

    from polm import hookimpl
    from polm.engine.commands import Command

    def add_arguments(parser):
        parser.add_argument("--name", default="world")

    def hello(arguments):
        print(f"hello {arguments.name}")
        return 0

    @hookimpl
    def polm_register_commands(register):
        register("hello", Command("greet someone", add_arguments, hello))
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One ``polm NAME`` command.

    Attributes:
        help: the line ``polm --help`` shows for it.
        add_arguments: adds the command's arguments to its ``argparse`` parser.
        run: runs the command on the parsed arguments and returns the exit status; a
            :class:`~polm.engine.errors.PolmError` it raises is printed as one line with status 2.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
