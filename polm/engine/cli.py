"""The ``polm`` command line: run, plugins, eval, quickstart, app.

User errors print one line (``polm: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from polm.engine.errors import PolmError

QUICKSTART_RECIPE = "quickstart.yaml"
console = Console()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polm", description="Post-train language models: one engine, every method a plugin.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a YAML recipe")
    run.add_argument("recipe", help="path to the recipe")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe field, e.g. stages.0.lr=1e-4 (repeatable)")
    run.add_argument("--output", help="run folder (default: the recipe's output_dir)")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in the output folder")

    plugins = commands.add_parser("plugins", help="list plugins and what each contributes")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint or model on held-out data")
    evaluate.add_argument("checkpoint", help="a checkpoint folder, a run stage folder, a hub id or a registered model")
    evaluate.add_argument("--data", required=True, help="'polm:<name>' or a JSONL file")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--size", type=int, default=None, help="evaluate the first N rows only")
    evaluate.add_argument("--max-new-tokens", type=int, default=32)
    scaling = evaluate.add_mutually_exclusive_group()
    scaling.add_argument("--self-consistency", type=int, metavar="K", help="majority vote of K samples per question")
    scaling.add_argument("--best-of-n", type=int, metavar="N", help="the best of N samples under --reward")
    scaling.add_argument("--self-refine", type=int, metavar="ROUNDS", help="critique-and-revise for ROUNDS rounds")
    evaluate.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the K or N samples")
    evaluate.add_argument("--reward", default="prm", help="the registered reward --best-of-n picks by (default prm)")
    evaluate.add_argument("--reward-option", dest="reward_options", action="append", default=[], metavar="KEY=VALUE",
                          help="an option of --reward, e.g. checkpoint=runs/x/01-prm (repeatable)")

    quickstart = commands.add_parser("quickstart", help="post-train polm-tiny on the bundled task, offline")
    quickstart.add_argument("--output", help="run folder (default: runs/quickstart-<time>)")

    app = commands.add_parser("app", help="start the Gradio app: chat, rewards, training, plugins (extra 'app')")
    app.add_argument("--checkpoint", dest="checkpoints", action="extend", nargs="+", default=[], metavar="DIR",
                     help="run folders or checkpoint folders whose models the Chat tab offers (repeatable)")
    app.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    app.add_argument("--port", type=int, default=7860)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        return {"run": _run, "plugins": _plugins, "eval": _eval, "quickstart": _quickstart,
                "app": _app}[arguments.command](arguments)
    except PolmError as error:
        print(f"polm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("polm: interrupted; the last checkpoint is kept, continue with --resume", file=sys.stderr)
        return 130


def _run(arguments: argparse.Namespace) -> int:
    from polm.engine.recipe import load_recipe

    recipe = load_recipe(arguments.recipe, arguments.overrides)
    output = arguments.output or recipe.output_dir
    if output is None:
        raise PolmError(f"{arguments.recipe}: no output folder; set 'output_dir' in the recipe or pass --output")
    pipeline = recipe.pipeline()
    result = pipeline.run(output, resume=arguments.resume)
    _print_result(result, pipeline)
    return 0


def _print_result(result: Any, pipeline: Any, title: str = "polm run") -> None:
    table = Table(title=title)
    for column in ("stage", "metric", "before", "after", "checkpoint"):
        table.add_column(column)
    for stage, result_stage in zip(pipeline.stages, result.stages):
        metric = stage.headline_metric
        before = (result_stage.before or {}).get(metric)
        after = result_stage.metrics.get(f"eval/{metric}")
        table.add_row(stage.name, metric, _percent(before), _percent(after),
                      "interrupted" if result_stage.interrupted else str(result_stage.checkpoint))
    console.print(table)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def plugins_report() -> dict[str, Any]:
    """What ``polm plugins --json`` prints (and the app's Plugins tab shows).

    Returns:
        ``{"plugins": [{name, source, contributes: {kind: [names]}}], "problems": [lines]}``.
    """
    from polm.engine.plugins import plugin_problems, state

    return {"plugins": [dict(info.__dict__) for info in state().describe()], "problems": plugin_problems()}


def _plugins(arguments: argparse.Namespace) -> int:
    report = plugins_report()
    if arguments.json:
        print(json.dumps(report, indent=2))
        return 0
    table = Table(title="polm plugins")
    table.add_column("plugin")
    table.add_column("source")
    table.add_column("contributes")
    for info in report["plugins"]:
        contributes = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in info["contributes"].items())
        table.add_row(info["name"], info["source"], contributes or "-")
    console.print(table)
    for problem in report["problems"]:
        console.print(f"[red]{problem}")
    return 0


def _eval(arguments: argparse.Namespace) -> int:
    from polm.engine.evaluation import evaluate

    if arguments.self_consistency or arguments.best_of_n or arguments.self_refine is not None:
        metrics = _eval_scaled(arguments)
    else:
        metrics = evaluate(arguments.checkpoint, arguments.data, arguments.split, size=arguments.size,
                           max_new_tokens=arguments.max_new_tokens, show_progress=True)
    print(json.dumps(metrics, indent=2))
    return 0


def _eval_scaled(arguments: argparse.Namespace) -> dict[str, float]:
    """``polm eval`` with an inference-time scaling method (see :mod:`polm.plugins.reasoning.scaling`)."""
    import yaml

    from polm.engine.data import load_rows
    from polm.engine.models import load_model
    from polm.plugins.reasoning.scaling import scaled_exact_match

    if arguments.self_consistency:
        method, settings = "self_consistency", {"k": arguments.self_consistency, "temperature": arguments.temperature}
    elif arguments.best_of_n:
        options = {}
        for item in arguments.reward_options:
            key, separator, value = item.partition("=")
            if not separator:
                raise PolmError(f"--reward-option expects KEY=VALUE, got '{item}'")
            options[key] = yaml.safe_load(value)  # numbers and booleans as in a recipe
        method, settings = "best_of_n", {"n": arguments.best_of_n, "reward": arguments.reward,
                                         "reward_options": options, "temperature": arguments.temperature}
    else:
        method, settings = "self_refine", {"rounds": arguments.self_refine}
    model, tokenizer = load_model(arguments.checkpoint)
    rows = load_rows(arguments.data, arguments.split)[: arguments.size or None]
    return scaled_exact_match(model, tokenizer, rows, method, arguments.max_new_tokens, **settings)


def _quickstart(arguments: argparse.Namespace) -> int:
    from polm.engine.recipe import load_recipe

    recipe_path = Path(str(files("polm.recipes") / QUICKSTART_RECIPE))
    recipe = load_recipe(recipe_path)
    output = arguments.output or f"runs/quickstart-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(f"polm quickstart: {recipe_path.name} on {recipe.model}, run folder {output}")
    started = time.perf_counter()
    pipeline = recipe.pipeline()
    result = pipeline.run(output, evaluate_before=True)
    _print_result(result, pipeline, title=f"polm quickstart ({time.perf_counter() - started:.0f} s)")
    return 0


def _app(arguments: argparse.Namespace) -> int:
    from polm.apps.server import launch

    launch(arguments.checkpoints, host=arguments.host, port=arguments.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
