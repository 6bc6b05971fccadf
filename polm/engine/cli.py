"""The ``polm`` command line: the built-in commands run, plugins, eval and quickstart, and the
commands plugins add through ``polm_register_commands`` (``polm app`` comes from :mod:`polm.apps`).

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

import yaml
from rich.console import Console
from rich.table import Table

from polm.engine.commands import Command
from polm.engine.distributed import process_state
from polm.engine.errors import PolmError
from polm.engine.log import get_logger
from polm.engine.plugins import plugins_report, registry
from polm.engine.retrieval import DEFAULT_RETRIEVER, DEFAULT_TOP_K

QUICKSTART_RECIPE = "quickstart.yaml"
console = Console()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polm", description="Post-train language models: one engine, every method a plugin.")
    subcommands = parser.add_subparsers(dest="command", required=True)
    commands = dict(BUILT_IN_COMMANDS)
    # A plugin's bad command is skipped with a warning rather than raised: it must not take the CLI down.
    for entry in registry("commands").entries():
        if entry.name in BUILT_IN_COMMANDS:
            get_logger().warning(f'plugin "{entry.plugin}" registers the command \'{entry.name}\', which is '
                                 "built in; ignored (register it under another name)")
        elif not isinstance(entry.obj, Command):
            get_logger().warning(f'plugin "{entry.plugin}" registers the command \'{entry.name}\' as a '
                                 f"{type(entry.obj).__name__}; ignored (register a polm.engine.commands.Command)")
        else:
            commands[entry.name] = entry.obj
    for name, command in commands.items():
        subparser = subcommands.add_parser(name, help=command.help)
        command.add_arguments(subparser)
        subparser.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        return arguments.run(arguments)
    except PolmError as error:
        print(f"polm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("polm: interrupted; the last checkpoint is kept, continue with --resume", file=sys.stderr)
        return 130


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to the recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. stages.0.lr=1e-4 (repeatable)")
    parser.add_argument("--output", help="run folder (default: the recipe's output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in the output folder")
    parser.add_argument("--accept-changes", action="store_true",
                        help="with --resume, go on although the recipe differs from the run's (otherwise refused)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the polm run in the output folder (a folder holding anything else is kept)")


def _run(arguments: argparse.Namespace) -> int:
    from polm.engine.recipe import load_recipe

    recipe = load_recipe(arguments.recipe, arguments.overrides)
    output = arguments.output or recipe.output_dir
    if output is None:
        raise PolmError(f"{arguments.recipe}: no output folder; set 'output_dir' in the recipe or pass --output")
    pipeline = recipe.pipeline()
    result = pipeline.run(output, resume=arguments.resume, accept_changes=arguments.accept_changes,
                          overwrite=arguments.overwrite)
    _print_result(result, pipeline)
    if result.interrupted:  # SIGTERM: checkpointed after the step in progress
        print(f"polm: terminated; the last checkpoint is kept, continue with: polm run {arguments.recipe} "
              f"--output {output} --resume", file=sys.stderr)
        return 143
    return 0


def _print_result(result: Any, pipeline: Any, title: str = "polm run") -> None:
    if not process_state().is_main_process:  # one table per run, not one per process
        return
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


def _plugins_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


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
    if report["domains"]:
        domains = Table(title="domains (polm domain recipe NAME | eval NAME CHECKPOINT)")
        for column in ("domain", "plugin", "contributes"):
            domains.add_column(column)
        for info in report["domains"]:
            parts = {"datasets": ", ".join(info["datasets"]), "recipe": "; ".join(info["recipe"]),
                     "evaluator": ", ".join(info["metrics"]), "tokenizer": json.dumps(info["tokenizer"] or "")}
            domains.add_row(f"{info['name']}\n{info['description']}", info["plugin"],
                            "\n".join(f"{part}: {text}" for part, text in parts.items() if text.strip('"')))
        console.print(domains)
    for problem in report["problems"]:
        console.print(f"[red]{problem}")
    return 0


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint folder, a run stage folder, a hub id or a registered model")
    parser.add_argument("--data", required=True, help="'polm:<name>' or a JSONL file")
    parser.add_argument("--split", default="test")
    parser.add_argument("--size", type=int, default=None, help="evaluate the first N rows only")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--method", help="a registered inference-time scaling method, e.g. self_consistency "
                                         "(polm plugins lists them; default: greedy decoding)")
    parser.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of --method, e.g. k=8 or reward_options.checkpoint=runs/x/01-prm "
                             "(repeatable; values read as YAML)")
    parser.add_argument("--documents", help="answer with retrieval: passages ('polm:<name>' or a file of "
                                            "{id, text} rows) searched for each question, the best --top-k "
                                            "put in its prompt as rag_sft tunes on them")
    parser.add_argument("--documents-split", help="the split of a bundled --documents set (default train)")
    parser.add_argument("--retriever",
                        help=f"a registered retriever (polm plugins lists them; default {DEFAULT_RETRIEVER})")
    parser.add_argument("--top-k", type=int, help=f"passages per question (default {DEFAULT_TOP_K})")


def _eval(arguments: argparse.Namespace) -> int:
    from polm.engine.evaluation import evaluate

    retrieval = {"documents_split": arguments.documents_split, "retriever": arguments.retriever,
                 "top_k": arguments.top_k}
    if arguments.documents is None and any(value is not None for value in retrieval.values()):
        given = next(name for name, value in retrieval.items() if value is not None)
        raise PolmError(f"--{given.replace('_', '-')} is a setting of retrieval; give --documents as well")
    retrieval = {name: value for name, value in retrieval.items() if value is not None}

    metrics = evaluate(arguments.checkpoint, arguments.data, arguments.split, size=arguments.size,
                       max_new_tokens=arguments.max_new_tokens, show_progress=True, method=arguments.method,
                       method_options=method_options(arguments.options), documents=arguments.documents,
                       **retrieval)
    print(json.dumps(metrics, indent=2))
    return 0


def method_options(items: list[str]) -> dict[str, Any]:
    """``--option`` values as keyword options: ``["n=8", "reward_options.checkpoint=runs/x"]`` ->
    ``{"n": 8, "reward_options": {"checkpoint": "runs/x"}}``; values are read as YAML, as in a recipe."""
    options: dict[str, Any] = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise PolmError(f"--option expects KEY=VALUE, got '{item}'; for example --option k=8")
        *parents, leaf = key.split(".")
        target = options
        for depth, parent in enumerate(parents):
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise PolmError(f"--option '{item}': '{'.'.join(parents[:depth + 1])}' is already set to a value, "
                                "so it cannot hold options")
        target[leaf] = yaml.safe_load(value)
    return options


def _quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", help="run folder (default: runs/quickstart-<time>)")


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


BUILT_IN_COMMANDS: dict[str, Command] = {
    "run": Command("run a YAML recipe", _run_arguments, _run),
    "plugins": Command("list plugins and what each contributes", _plugins_arguments, _plugins),
    "eval": Command("evaluate a checkpoint or model on held-out data", _eval_arguments, _eval),
    "quickstart": Command("post-train polm-tiny on the bundled task, offline", _quickstart_arguments, _quickstart),
}


if __name__ == "__main__":
    sys.exit(main())
