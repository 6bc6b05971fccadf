"""``polm domain``: a registered domain's recipe, to run with ``polm run``, and its evaluator's metrics.

::

    polm domain recipe code > code.yaml && polm run code.yaml
    polm domain eval code runs/code/00-sft --option max_bytes=50000
"""

from __future__ import annotations

import argparse
import json

from polm.engine.cli import method_options
from polm.engine.commands import Command
from polm.engine.domains import domain_evaluator, domain_recipe, recipe_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    recipe = actions.add_parser("recipe", help="print a domain's recipe, for polm run (polm plugins lists domains)")
    recipe.add_argument("domain", help="a registered domain, e.g. code")
    evaluate = actions.add_parser("eval", help="print a domain evaluator's metrics of a checkpoint or model")
    evaluate.add_argument("domain", help="a registered domain, e.g. code")
    evaluate.add_argument("checkpoint", help="a checkpoint folder, a run stage folder, a hub id or a registered model")
    evaluate.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                          help="an option of the domain's evaluator, e.g. tasks=50 (repeatable; values read as YAML)")


def run(arguments: argparse.Namespace) -> int:
    if arguments.action == "recipe":
        domain_recipe(arguments.domain)  # a recipe that does not read fails here, not in polm run
        print(recipe_text(arguments.domain), end="")
        return 0
    from polm.engine.models import load_model

    options = method_options(arguments.options)
    evaluator = domain_evaluator(arguments.domain, options)  # a mistyped option fails before the model loads
    model, tokenizer = load_model(arguments.checkpoint)
    print(json.dumps(evaluator(model, tokenizer, **options), indent=2))
    return 0


DOMAIN_COMMAND = Command("print a domain's recipe or evaluate a model on a domain (polm plugins lists domains)",
                         add_arguments, run)
