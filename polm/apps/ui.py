"""The Gradio page: Chat, Rewards, Train and Plugins tabs over polm's engine.

This is the only module that imports gradio; the logic behind each tab lives
in :mod:`polm.apps.chat`, :mod:`polm.apps.scoring`, :mod:`polm.apps.training`
and :mod:`polm.apps.models`. A :class:`~polm.engine.errors.PolmError` raised
by a handler becomes a ``gr.Error``: the message appears in the page and the
server keeps serving.
"""

from __future__ import annotations

import functools
import html
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from polm.apps.chat import (
    AUDIO_SUFFIXES,
    IMAGE_SUFFIXES,
    GenerationSettings,
    stream_reply,
    stream_together,
    user_message,
)
from polm.apps.models import ModelCache, find_checkpoints, registered_models
from polm.apps.scoring import COMPLETION_SEPARATOR, available_rewards, score_completions
from polm.apps.training import RECIPE_SUFFIXES, TrainingRun, TrainingRuns, bundled_recipes
from polm.engine.errors import PolmError

NO_MODEL = ("none", "")
PLOT_COLUMNS = ["step", "value", "series"]
TRAIN_POLL_SECONDS = 1.0


def shown_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a handler's PolmError into a gr.Error, which the page shows as a message (generators too)."""

    def as_gradio_error(error: PolmError) -> gr.Error:
        return gr.Error(html.escape(str(error), quote=False), print_exception=False)  # the toast renders HTML

    if inspect.isgeneratorfunction(function):
        @functools.wraps(function)
        def generator(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from function(*args, **kwargs)
            except PolmError as error:
                raise as_gradio_error(error) from error
        return generator

    @functools.wraps(function)
    def plain(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except PolmError as error:
            raise as_gradio_error(error) from error
    return plain


def build_app(checkpoint_folders: Sequence[str | Path] = ()) -> gr.Blocks:
    """The polm app.

    Args:
        checkpoint_folders: run folders, folders of runs or checkpoint folders whose models the Chat tab offers
            (runs started from the Train tab are added as they start).
    """
    models = ModelCache()
    runs = TrainingRuns()
    folders = [Path(folder) for folder in checkpoint_folders]

    def model_choices() -> list[str]:
        return registered_models() + find_checkpoints(folders + runs.folders)

    with gr.Blocks(title="polm", analytics_enabled=False) as app:
        gr.Markdown("# polm\nPost-train language models: chat with them, score completions, train, inspect plugins.")
        with gr.Tab("Chat", id="chat") as chat_tab:
            _chat_tab(chat_tab, app, models, model_choices)
        with gr.Tab("Rewards", id="rewards"):
            _rewards_tab(app)
        with gr.Tab("Train", id="train"):
            _train_tab(app, runs)
        with gr.Tab("Plugins", id="plugins"):
            _plugins_tab(app)
    return app


def _chat_tab(tab: gr.Tab, app: gr.Blocks, models: ModelCache, model_choices: Callable[[], list[str]]) -> None:
    default = registered_models()[0] if registered_models() else None
    with gr.Row():
        model_a = gr.Dropdown(model_choices(), value=default, label="Model A", allow_custom_value=True,
                              info="a registered model, a checkpoint of a run, or a checkpoint folder path")
        model_b = gr.Dropdown([NO_MODEL, *model_choices()], value="", label="Model B (optional, side by side)",
                              allow_custom_value=True, info="answers the same messages, e.g. the tuned model")
        refresh = gr.Button("Refresh models", scale=0)
    with gr.Row():
        temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature", info="0 decodes greedily")
        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
        max_tokens = gr.Slider(1, 512, value=64, step=1, label="Max new tokens")
    with gr.Row():
        panes = {"height": 360, "feedback_options": None, "buttons": ["copy_all"]}
        chat_a = gr.Chatbot(label="Model A", elem_id="chat-a", **panes)
        chat_b = gr.Chatbot(label="Model B", elem_id="chat-b", **panes)
    conversations = gr.State([[], []])
    message = gr.MultimodalTextbox(
        label="Message", elem_id="chat-input", sources=["upload", "microphone"], file_count="multiple",
        file_types=[*IMAGE_SUFFIXES, *AUDIO_SUFFIXES], stop_btn=True,
        placeholder="Ask something; attach an image or audio for a model with those encoders "
                    "(a text-only model says so)",
    )
    clear = gr.Button("Clear conversation")

    @shown_errors
    def chat(text_and_files: dict[str, Any], spec_a: str, spec_b: str, temperature: float, top_p: float,
             max_tokens: float, history: list[list[dict[str, Any]]]):
        settings = GenerationSettings(temperature, top_p, max_tokens)
        specs = [spec_a] + ([spec_b] if spec_b else [])
        loaded = [models.get(spec) for spec in specs]
        turn = user_message(text_and_files.get("text", ""), text_and_files.get("files", []))
        asked = [history[side] + [turn] for side in range(len(specs))]
        streams = [stream_reply(model, tokenizer, chat_so_far, settings)
                   for (model, tokenizer), chat_so_far in zip(loaded, asked)]
        shown = [list(conversation) for conversation in history]
        for texts in stream_together(streams):
            for side, text in enumerate(texts):
                shown[side] = asked[side] + [{"role": "assistant", "content": text}]
            yield shown[0], shown[1], shown, None

    submitted = message.submit(chat, [message, model_a, model_b, temperature, top_p, max_tokens, conversations],
                               [chat_a, chat_b, conversations, message], api_name="chat")
    message.stop(None, None, None, cancels=[submitted], api_visibility="private")
    clear.click(lambda: ([], [], [[], []]), None, [chat_a, chat_b, conversations], api_visibility="private")

    def refreshed_models() -> tuple[dict[str, Any], dict[str, Any]]:
        choices = model_choices()
        return gr.update(choices=choices), gr.update(choices=[NO_MODEL, *choices])

    for event in (refresh.click, tab.select, app.load):
        event(refreshed_models, None, [model_a, model_b], api_visibility="private")
    gr.api(model_choices, api_name="list_models")


def _rewards_tab(app: gr.Blocks) -> None:
    gr.Markdown("Score completions of a prompt with any registered reward. Separate completions with a line "
                f"holding only `{COMPLETION_SEPARATOR}`.")
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="What is 12 + 7?")
            completions = gr.Textbox(label="Completions", lines=6,
                                     placeholder=f"The answer is 19.\n{COMPLETION_SEPARATOR}\nThe answer is 20.")
        with gr.Column():
            rewards = gr.Dropdown([], multiselect=True, allow_custom_value=True, label="Rewards",
                                  info="read from the rewards registry, plugins included")
            fields = gr.Code(label="Fields (JSON), given to the rewards", language="json", value='{"answer": ""}',
                             lines=3)
            options = gr.Code(label="Reward options (JSON, optional)", language="json", value="", lines=2)
    score = gr.Button("Score", variant="primary")
    table = gr.Dataframe(headers=["completion"], label="Per-reward values", interactive=False)
    catalogue = gr.Dataframe(headers=["reward", "plugin", "description"], label="Registered rewards",
                             interactive=False)

    def listed_rewards() -> tuple[dict[str, Any], pd.DataFrame]:
        found = available_rewards()
        return (gr.update(choices=[name for name, _, _ in found]),
                pd.DataFrame(found, columns=["reward", "plugin", "description"]))

    @shown_errors
    def scored(prompt: str, completions: str, rewards: list[str], fields: str, options: str) -> pd.DataFrame:
        headers, rows = score_completions(prompt, completions, list(rewards or []), fields, options)
        return pd.DataFrame(rows, columns=headers)

    score.click(scored, [prompt, completions, rewards, fields, options], table, api_name="score")
    app.load(listed_rewards, None, [rewards, catalogue], api_visibility="private")


def _plot_frames(records: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Loss and reward / held-out metric series of a run's records, one series per stage and metric."""
    losses, rewards = [], []
    for record in records:
        for key, value in record.items():
            if not isinstance(value, (int, float)) or key == "step":
                continue
            point = (record["step"], float(value), f"{record['stage_dir']} {key}")
            if key == "loss":
                losses.append(point)
            elif "reward" in key or key.startswith("eval/"):
                rewards.append(point)
    return pd.DataFrame(losses, columns=PLOT_COLUMNS), pd.DataFrame(rewards, columns=PLOT_COLUMNS)


def _train_tab(app: gr.Blocks, runs: TrainingRuns) -> None:
    recipes = bundled_recipes()
    with gr.Row():
        with gr.Column():
            bundled = gr.Dropdown(list(recipes), value=next(iter(recipes), None), label="Bundled recipe")
            upload = gr.File(label="...or upload a YAML recipe (used instead)", file_types=list(RECIPE_SUFFIXES),
                             type="filepath", elem_id="recipe-upload")
        with gr.Column():
            output = gr.Textbox(label="Run folder", placeholder="default: the recipe's output_dir, "
                                "else runs/<recipe>-<time>")
            overrides = gr.Textbox(label="Overrides (one KEY=VALUE a line, like polm run --set)", lines=2,
                                   placeholder="stages.0.max_steps=50")
    with gr.Row():
        start = gr.Button("Start", variant="primary")
        stop = gr.Button("Stop (checkpoint and return)", variant="stop")
    status = gr.Textbox(label="Run", lines=4, interactive=False, elem_id="train-status")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="value", color="series", title="Loss", label="Loss")
        reward_plot = gr.LinePlot(x="step", y="value", color="series", title="Reward and held-out metrics",
                                  label="Rewards")
    timer = gr.Timer(TRAIN_POLL_SECONDS, active=False)

    def shown(run: TrainingRun | None) -> tuple[str, pd.DataFrame, pd.DataFrame, gr.Timer]:
        if run is None:
            empty = pd.DataFrame([], columns=PLOT_COLUMNS)
            return "no run started from this app yet", empty, empty, gr.Timer(active=False)
        losses, rewards = _plot_frames(list(run.records))
        return run.status(), losses, rewards, gr.Timer(active=run.active)

    def started(recipe_name: str, uploaded: str | None, output: str, overrides: str):
        """Start a run; a recipe that does not load is reported in the run box (with the uploaded file's name)."""
        path = Path(uploaded) if uploaded else recipes.get(recipe_name)
        lines = [line.strip() for line in (overrides or "").splitlines() if line.strip()]
        try:
            if path is None:
                raise PolmError("choose a bundled recipe or upload a YAML recipe")
            return shown(runs.start(path, output or "", lines))
        except PolmError as error:
            message = str(error).replace(str(path), path.name) if uploaded else str(error)
            return f"could not start: {message}", gr.skip(), gr.skip(), gr.skip()

    outputs = [status, loss_plot, reward_plot, timer]
    start.click(started, [bundled, upload, output, overrides], outputs, api_name="start_training")
    stop.click(lambda: shown(runs.stop()), None, outputs, api_name="stop_training")
    timer.tick(lambda: shown(runs.current), None, outputs, api_name="training_status")
    app.load(lambda: shown(runs.current), None, outputs, api_visibility="private")


def _plugins_tab(app: gr.Blocks) -> None:
    from polm.engine.plugins import plugins_report
    from polm.engine.registry import COMPONENT_KINDS

    gr.Markdown("Installed plugins and what each contributes (the data of `polm plugins --json`).")
    table = gr.Dataframe(headers=["plugin", "source", *COMPONENT_KINDS], interactive=False, wrap=True)
    problems = gr.Textbox(label="Plugin problems", interactive=False)
    report = gr.JSON(label="polm plugins --json")
    refresh = gr.Button("Refresh")

    def reported() -> tuple[pd.DataFrame, str, dict[str, Any]]:
        data = plugins_report()
        rows = [[plugin["name"], plugin["source"],
                 *(", ".join(plugin["contributes"].get(kind, [])) for kind in COMPONENT_KINDS)]
                for plugin in data["plugins"]]
        return (pd.DataFrame(rows, columns=["plugin", "source", *COMPONENT_KINDS]),
                "\n".join(data["problems"]) or "none", data)

    refresh.click(reported, None, [table, problems, report], api_name="plugins")
    app.load(reported, None, [table, problems, report], api_visibility="private")
