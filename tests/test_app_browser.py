"""The app in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (no
``playwright install``: the system Chromium is used). Without them the tests
skip and say what is missing. Screenshots are saved in each test's tmp folder.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from polm.engine.plugins import registry

pytest.importorskip("gradio", reason="the app needs the 'app' extra: pip install 'polm[app]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need: pip install playwright")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip("the browser tests need Debian's chromium: apt-get install -y chromium", allow_module_level=True)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
BAD_RECIPE = "model: polm-tiny\nstages:\n  - name: sfft\n    data: polm:arithmetic\n"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(app, browser):
    """The app's page, recording every request that leaves this machine's app server."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.outside_requests = []
    host = urlparse(app.local_url).netloc
    page.on("request", lambda request: page.outside_requests.append(request.url)
            if urlparse(request.url).netloc not in (host, "") else None)
    page.goto(app.local_url, wait_until="load")
    page.locator("#chat-input textarea").wait_for(timeout=TIMEOUT_MS)
    yield page
    page.close()


def finished_reply(page, pane: str = "#chat-a") -> str:
    """The last reply in a chat pane once it has stopped growing (streaming is over)."""
    bot = page.locator(f'{pane} [data-testid="bot"]').last
    bot.wait_for(timeout=TIMEOUT_MS)
    text, stable_since = bot.inner_text(), time.monotonic()
    while time.monotonic() - stable_since < 1.5:
        page.wait_for_timeout(250)
        if bot.inner_text() != text:
            text, stable_since = bot.inner_text(), time.monotonic()
    return text


def send(page, text: str) -> None:
    box = page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")


def test_chat_reply_appears_in_the_page(page, tmp_path):
    send(page, "What is 2 + 3?")
    reply = finished_reply(page)
    page.screenshot(path=tmp_path / "chat.png", full_page=True)
    assert "What is 2 + 3?" in page.locator('#chat-a [data-testid="user"]').first.inner_text()
    assert reply.strip(), "the reply is empty"
    assert page.outside_requests == [], "the page must not reach the network"


def test_bad_recipe_shows_an_error_and_the_page_keeps_working(page, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(BAD_RECIPE)
    page.get_by_role("tab", name="Train").click()
    page.locator("#recipe-upload input[type=file]").set_input_files(str(recipe))
    page.get_by_text("bad.yaml").first.wait_for(timeout=TIMEOUT_MS)
    page.get_by_role("button", name="Start", exact=True).click()
    page.wait_for_function("() => document.querySelector('#train-status textarea').value.includes('sfft')",
                           timeout=TIMEOUT_MS)
    page.screenshot(path=tmp_path / "bad-recipe.png", full_page=True)
    assert page.locator("#train-status textarea").input_value() == (
        "could not start: bad.yaml:3: unknown stage 'sfft'. Did you mean 'sft'? "
        "Available: " + ", ".join(sorted(registry("stages"))))

    page.get_by_role("tab", name="Chat").click()
    send(page, "What is 1 + 1?")
    assert finished_reply(page).strip()
