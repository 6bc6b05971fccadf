"""Interactive apps: ``polm app`` serves a Gradio page with Chat, Rewards, Train and Plugins tabs.

This package is a built-in plugin that contributes the ``app`` command
(:mod:`polm.apps.command`). Gradio is imported only when the app starts
(:func:`polm.apps.server.launch`), so ``import polm`` and the other commands
work without the ``app`` extra.
"""

from __future__ import annotations

from polm.apps.command import APP_COMMAND
from polm.engine.hookspecs import Register, hookimpl


@hookimpl
def polm_register_commands(register: Register) -> None:
    register("app", APP_COMMAND, description="the Gradio app: chat, rewards, training, plugins")
