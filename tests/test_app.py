"""The Gradio app (``polm app``), served on a free local port and driven through its API with gradio_client.

Each endpoint is what a button or the message box of the page calls, so these
tests exercise the page's handlers: chat on polm-tiny (one model and two side
by side), media refused by a text-only model, rewards, plugins, a short
training run with its checkpoint, stopping a run, and a bad recipe that must
come back as a readable error while the server keeps serving.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("gradio", reason="the app needs the 'app' extra: pip install 'polm[app]'")
gradio_client = pytest.importorskip("gradio_client")

from gradio_client import Client, handle_file

from polm.apps.server import MAX_UPLOAD_BYTES
from polm.engine.cli import _parser, main
from polm.engine.plugins import plugins_report

# SFT of polm-tiny on 16 arithmetic questions: a checkpoint every 2 steps, a loss record every step.
TINY_RECIPE = """\
model: polm-tiny
seed: 0
stages:
  - name: sft
    data: {data}
    max_steps: {steps}
    batch_size: 4
    lr: 1.0e-3
    log_every: 1
    save_every: 2
    eval_size: 0
"""
# The misspelled stage is on line 4; the error must say so.
BAD_RECIPE = "model: polm-tiny\nseed: 0\nstages:\n  - name: sfft\n    data: polm:arithmetic\n"
# A 1x1 PNG.
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app.local_url, verbose=False)


def tiny_recipe(folder: Path, steps: int) -> Path:
    """A recipe file in ``folder`` training ``steps`` steps on a small JSONL file (named by absolute path,
    since the app keeps an uploaded recipe in its own upload folder)."""
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + {a + 2}?", "answer": str(2 * a + 2)}) + "\n"
                            for a in range(16)))
    recipe = folder / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.format(data=data, steps=steps))
    return recipe


def chat(client: Client, text: str, model_a: str = "polm-tiny", model_b: str = "", files: tuple = (),
         max_tokens: int = 12) -> tuple[list, list]:
    """Send one message (greedy); return both chat panes."""
    pane_a, pane_b, _ = client.predict({"text": text, "files": list(files)}, model_a, model_b, 0.0, 1.0,
                                       max_tokens, api_name="/chat")
    return pane_a, pane_b


def reply(pane: list) -> str:
    """The text of the last assistant message of a chat pane."""
    return "".join(part["text"] for part in pane[-1]["content"] if part["type"] == "text")


def wait_for(client: Client, finished, timeout: float = 90.0) -> str:
    """Poll the Train tab's status until ``finished(status)``; return the status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.predict(api_name="/training_status")[0]
        if finished(status):
            return status
        time.sleep(0.5)
    raise AssertionError(f"the run did not get there within {timeout} s; last status:\n{status}")


def test_serves_on_loopback_only(app):
    assert app.local_url.startswith("http://127.0.0.1:")
    assert _parser().parse_args(["app"]).host == "127.0.0.1"
    assert not app.share and not app.analytics_enabled


def test_chat_on_polm_tiny_returns_text(client):
    pane_a, pane_b = chat(client, "What is 2 + 3?")
    assert pane_a[0]["role"] == "user" and pane_a[-1]["role"] == "assistant"
    assert reply(pane_a).strip(), pane_a
    assert pane_b == []


def test_two_models_answer_the_same_message(client):
    """Greedy decoding of the same model on both sides gives the same reply."""
    pane_a, pane_b = chat(client, "What is 7 + 5?", model_b="polm-tiny")
    assert reply(pane_a).strip() and reply(pane_a) == reply(pane_b)


def test_media_for_a_text_only_model_is_refused_readably(client, tmp_path):
    image = tmp_path / "dot.png"
    image.write_bytes(PNG)
    with pytest.raises(Exception, match=r"image content.*text-only model.*cannot read"):
        chat(client, "What is in this picture?", files=(handle_file(str(image)),))
    assert reply(chat(client, "What is 1 + 1?")[0]).strip()


def test_chat_with_an_image_on_a_multimodal_model(app, tmp_path):
    """A saved polm-tiny + tiny CLIP model, named by its folder, answers a message with an uploaded image.

    Its own client (session): the image stays in this session's chat history, which text-only models refuse."""
    import polm
    from polm.modalities.multimodal.build import build_multimodal

    lm, tokenizer = polm.load_model("polm-tiny")
    build_multimodal(lm, {"image": "open_clip:polm-tiny-vit"}).save_pretrained(tmp_path / "vlm")
    tokenizer.save_pretrained(tmp_path / "vlm")
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    pane_a, _ = chat(Client(app.local_url, verbose=False), "What colour is the shape?", model_a=str(tmp_path / "vlm"),
                     files=(handle_file(str(image)),))
    assert pane_a[-1]["role"] == "assistant" and reply(pane_a).strip(), pane_a


def test_closing_a_reply_stream_stops_generation():
    """A page that goes away mid-reply closes the stream; sampling must stop rather than run to max tokens."""
    from polm.apps.chat import GenerationSettings, stream_reply, stream_together
    from polm.engine.models import load_model

    model, tokenizer = load_model("polm-tiny")
    chat = [{"role": "user", "content": "What is 2 + 3?"}]
    together = stream_together([stream_reply(model.eval(), tokenizer, chat, GenerationSettings(max_new_tokens=2000))
                                for _ in range(2)])
    next(together)
    together.close()
    deadline = time.monotonic() + 10  # running to max tokens takes over 40 s on one CPU thread
    while time.monotonic() < deadline and generating():
        time.sleep(0.05)
    assert not generating(), "generation threads outlived their closed stream"


def generating() -> list[str]:
    """The app's reply threads still alive."""
    return [thread.name for thread in threading.enumerate() if thread.name.startswith(("polm-app-generate",
                                                                                       "polm-app-stream"))]


def test_unknown_model_is_a_message(client):
    with pytest.raises(Exception, match="neither a registered model nor a folder"):
        chat(client, "hello", model_a="no-such-model")


def test_accuracy_reward_scores_right_and_wrong_completions(client):
    completions = "<think>12 + 7 = 19</think> <answer>19</answer>\n---\n<answer>20</answer>\n---\n19"
    table = client.predict("What is 12 + 7?", completions, ["accuracy"], json.dumps({"answer": "19"}), "",
                           api_name="/score")
    assert table["headers"] == ["completion", "accuracy"]
    assert table["data"] == [["<think>12 + 7 = 19</think> <answer>19</answer>", 1.0],
                             ["<answer>20</answer>", 0.0], ["19", 1.0]]


def test_rewards_are_read_from_the_registry_at_request_time(client):
    """A plugin registered after the app started contributes a reward the Rewards tab can use at once."""
    from polm import hookimpl, plugin_manager

    class Shout:
        @hookimpl
        def polm_register_rewards(self, register):
            register("shout", lambda prompts, completions, **fields: [float(c.isupper()) for c in completions])

    plugin_manager().register(Shout(), name="shout-plugin")
    try:
        table = client.predict("Say hi", "HI\n---\nhi", ["shout"], "", "", api_name="/score")
    finally:
        plugin_manager().unregister(name="shout-plugin")
    assert table["data"] == [["HI", 1.0], ["hi", 0.0]]


def test_unknown_reward_lists_the_registered_ones(client):
    with pytest.raises(Exception, match="unknown reward 'acurracy'. Did you mean 'accuracy'"):
        client.predict("What is 1 + 1?", "2", ["acurracy"], json.dumps({"answer": "2"}), "", api_name="/score")


def test_plugins_tab_shows_the_cli_report(client):
    _, problems, report = client.predict(api_name="/plugins")
    assert report == json.loads(json.dumps(plugins_report()))
    assert problems == "none"


def test_training_run_writes_metrics_and_checkpoints_that_chat_offers(client, tmp_path):
    recipe = tiny_recipe(tmp_path, steps=4)
    run_dir = tmp_path / "run"
    status = client.predict("quickstart.yaml", handle_file(str(recipe)), str(run_dir), "",
                            api_name="/start_training")[0]
    assert status.startswith(("running", "finished")), status
    status = wait_for(client, lambda status: not status.startswith(("running", "stopping")))
    assert status.startswith("finished"), status

    stage_dir = run_dir / "00-sft"
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "loss" in record] == [1, 2, 3, 4]
    assert (stage_dir / "checkpoint-000002" / "model.safetensors").is_file()
    assert (stage_dir / "final" / "model.safetensors").is_file()
    assert "step 4/4" in status and str(stage_dir / "final") in status
    _, losses, _, _ = client.predict(api_name="/training_status")
    assert [row[0] for row in losses["data"]] == [1, 2, 3, 4]

    offered = client.predict(api_name="/list_models")
    assert str((stage_dir / "final").resolve()) in offered
    assert reply(chat(client, "What is 2 + 2?", model_a=str(stage_dir / "final"))[0]) is not None


def test_stop_checkpoints_and_returns(client, tmp_path):
    recipe = tiny_recipe(tmp_path, steps=2000)
    run_dir = tmp_path / "run"
    client.predict("quickstart.yaml", handle_file(str(recipe)), str(run_dir), "", api_name="/start_training")
    wait_for(client, lambda status: "step " in status)
    client.predict(api_name="/stop_training")
    status = wait_for(client, lambda status: not status.startswith(("running", "stopping")))
    assert status.startswith("stopped") and "--resume" in status, status
    assert list((run_dir / "00-sft").glob("checkpoint-*")), "stopping must leave a checkpoint"


def test_bad_recipe_is_a_readable_error_and_the_server_keeps_serving(client, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(BAD_RECIPE)
    status = client.predict("quickstart.yaml", handle_file(str(recipe)), str(tmp_path / "run"), "",
                            api_name="/start_training")[0]
    assert status.startswith("could not start: bad.yaml:4: unknown stage 'sfft'. Did you mean 'sft'?"), status
    assert not (tmp_path / "run").exists()
    assert reply(chat(client, "What is 3 + 3?")[0]).strip()


def test_invalid_yaml_is_reported_with_its_line(client, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: polm-tiny\nstages:\n  - name: sft\n     data: x\n")
    status = client.predict("quickstart.yaml", handle_file(str(broken)), "", "", api_name="/start_training")[0]
    assert status.startswith("could not start: broken.yaml:4: invalid YAML"), status


def test_uploads_are_limited_in_type_and_size(app, client, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a recipe")
    with pytest.raises(Exception, match=r"Invalid file type.*\.yaml"):
        client.predict("quickstart.yaml", handle_file(str(notes)), "", "", api_name="/start_training")
    # The server refuses an oversized upload itself (gradio_client would refuse it before sending).
    response = httpx.post(f"{app.local_url}gradio_api/upload",
                          files={"files": ("huge.yaml", b"#" * (MAX_UPLOAD_BYTES + 1))}, timeout=60)
    assert response.status_code == 413 and "maximum allowed size" in response.text, response.text


def test_app_command_without_gradio_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    assert main(["app"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pip install 'polm[app]'" in error


def test_polm_app_command_serves_the_page_on_loopback(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "polm.engine.cli", "app", "--port", str(port)],
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    watchdog = threading.Timer(90, server.kill)  # a server that never comes up ends the wait below
    watchdog.start()
    try:
        first_line = server.stderr.readline()
        assert first_line.startswith(f"polm app: serving at http://127.0.0.1:{port}/"), first_line
        assert httpx.get(f"http://127.0.0.1:{port}/config", timeout=10).json()["title"] == "polm"
    finally:
        watchdog.cancel()
        server.terminate()
        server.communicate(timeout=30)


def test_polm_and_its_cli_do_not_import_gradio():
    """Not even when the command line collects the plugins' commands, ``polm app`` among them."""
    code = "import sys, polm, polm.engine.cli, polm.apps; polm.engine.cli._parser(); print('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent).stdout.strip() == "False"
