"""``polm merge CONFIG.yaml --output DIR``: merge models as a mergekit-style config says.

With ``--eval DATA`` (repeatable) the base, each model merged and the merge are scored on each task's held-out
rows and printed as one table (:mod:`.evaluate`); with ``--search`` as well, a small grid of weights and density
is tried and the best merge by that score is kept (:mod:`.search`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from polm.engine.commands import Command
from polm.engine.errors import PolmError
from polm.plugins.integration.merge.config import DTYPES, read_merge_config
from polm.plugins.integration.merge.evaluate import (
    DEFAULT_EVAL_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    eval_tasks,
    evaluate_merge,
    print_table,
)
from polm.plugins.integration.merge.merge import check_output_folder, merge_models
from polm.plugins.integration.merge.search import describe_grid, search_grid, search_merge


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a merge config (mergekit's YAML: merge_method, base_model, models, "
                                       "parameters, dtype)")
    parser.add_argument("--output", required=True,
                        help="the folder the merged model is written to (must not exist, or be empty)")
    parser.add_argument("--dtype", choices=DTYPES, help="the dtype the merged tensors are saved in, over the "
                                                         "config's dtype and out_dtype")
    parser.add_argument("--seed", type=int, default=0, help="seeds the methods that sample (dare, della); "
                                                            "default 0")
    parser.add_argument("--eval", action="append", default=[], metavar="DATA",
                        help="score the base, each model and the merge on this task's held-out rows (its test "
                             "split for polm:<name>, the file as given otherwise) by greedy exact_match, and "
                             "print one table; repeat for several tasks")
    parser.add_argument("--eval-size", type=int, default=DEFAULT_EVAL_SIZE,
                        help=f"the rows scored per task (default {DEFAULT_EVAL_SIZE})")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"the tokens generated per answer when scoring (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--search", action="store_true",
                        help="try a grid of weights (0.3, 0.5, 0.7 per model, scaled to sum to 1) and density "
                             "(or slerp's t) and keep the merge with the best mean --eval score")


def _merge(arguments: argparse.Namespace) -> int:
    output = Path(arguments.output)
    check_output_folder(output)  # before the config, so that a mistaken --output costs nothing
    config = read_merge_config(arguments.config)
    relative_to = Path(arguments.config).parent
    if arguments.search and not arguments.eval:
        raise PolmError("--search ranks merges by their --eval score; give --eval DATA as well")
    if not arguments.eval:
        report = merge_models(config, output, relative_to=relative_to, seed=arguments.seed, dtype=arguments.dtype,
                              show_progress=True)
    else:
        tasks = eval_tasks(arguments.eval, arguments.eval_size)  # read before any model loads
        common = {"eval_size": arguments.eval_size, "max_new_tokens": arguments.max_new_tokens,
                  "relative_to": relative_to, "seed": arguments.seed, "dtype": arguments.dtype,
                  "show_progress": True}
        if arguments.search:
            grid = search_grid(config, relative_to)
            print(f"polm merge --search: {describe_grid(config, grid)}")
            result = search_merge(config, output, tasks, grid=grid, **common)
            print_table(result.table())
            evaluation = result.evaluation
        else:
            evaluation = evaluate_merge(config, output, tasks, **common)
        print_table(evaluation.table())
        report = evaluation.report
    print(f"polm merge: wrote {report.output}")
    print(f"polm merge: {report.summary()}")
    return 0


MERGE_COMMAND = Command("merge models as a mergekit-style YAML config says (linear, task_arithmetic, ties, "
                        "slerp, ...), optionally scored (--eval) and searched (--search)", _merge_arguments, _merge)
