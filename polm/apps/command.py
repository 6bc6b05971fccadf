"""``polm app``: start the app, by default on this machine only."""

from __future__ import annotations

import argparse

from polm.apps.server import launch
from polm.engine.commands import Command


def _app_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", dest="checkpoints", action="extend", nargs="+", default=[], metavar="DIR",
                        help="run folders or checkpoint folders whose models the Chat tab offers (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)


def _app(arguments: argparse.Namespace) -> int:
    launch(arguments.checkpoints, host=arguments.host, port=arguments.port)
    return 0


APP_COMMAND = Command("start the Gradio app: chat, rewards, training, plugins (extra 'app')", _app_arguments, _app)
