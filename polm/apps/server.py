"""Serving the app with safe defaults: this machine only, no telemetry, no share links, bounded uploads."""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from polm.engine.errors import PolmError

#: The largest file a page may upload (images, audio clips, recipes), in bytes.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
SYSTEM_MONO_FONTS = ["ui-monospace", "monospace"]


def import_gradio() -> Any:
    """Import gradio with its telemetry and update check turned off.

    Raises:
        PolmError: gradio is not installed; the message says how to install it.
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when a Blocks is built: no version check, no telemetry
    try:
        import gradio
    except ImportError:
        raise PolmError("the app needs gradio, which is not installed: pip install 'polm[app]'") from None
    return gradio


def launch(checkpoint_folders: Sequence[str | Path] = (), host: str = "127.0.0.1", port: int | None = 7860,
           block: bool = True) -> Any:
    """Build and serve the app.

    Args:
        checkpoint_folders: run or checkpoint folders whose models the Chat tab offers.
        host: the address to bind; anything but a loopback address exposes the app (which can
            start training and read local model folders) to the network, so a warning is printed.
        port: the port to bind; None takes the first free one from 7860.
        block: serve until interrupted; with False return the running app (tests close it with ``app.close()``).

    Returns:
        The ``gr.Blocks`` app, serving at ``app.local_url``.

    Raises:
        PolmError: gradio is missing, or the port cannot be bound.
    """
    gradio = import_gradio()
    from polm.apps.ui import build_app

    if not _is_loopback(host):
        print(f"polm app: warning: serving on {host}, reachable from other machines; the app has no login",
              file=sys.stderr)
    app = build_app(checkpoint_folders)
    theme = gradio.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS)  # no web-font downloads
    try:
        app.queue().launch(
            server_name=host, server_port=port, share=False, ssr_mode=False, run_history=False,
            enable_monitoring=False, mcp_server=False, max_file_size=MAX_UPLOAD_BYTES, show_error=True,
            theme=theme, footer_links=["api", "settings"], prevent_thread_lock=True, quiet=True,
        )
    except OSError as error:
        raise PolmError(f"cannot serve on {host}:{port}: {error}; choose another --port") from None
    if block:
        print(f"polm app: serving at {app.local_url} (Ctrl-C to stop)", file=sys.stderr)
        app.block_thread()
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
