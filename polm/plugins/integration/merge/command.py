"""``polm merge CONFIG.yaml --output DIR``: merge models as a mergekit-style config says."""

from __future__ import annotations

import argparse
from pathlib import Path

from polm.engine.commands import Command
from polm.plugins.integration.merge.config import DTYPES, read_merge_config
from polm.plugins.integration.merge.merge import check_output_folder, merge_models


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a merge config (mergekit's YAML: merge_method, base_model, models, "
                                       "parameters, dtype)")
    parser.add_argument("--output", required=True,
                        help="the folder the merged model is written to (must not exist, or be empty)")
    parser.add_argument("--dtype", choices=DTYPES, help="the dtype the merged tensors are saved in, over the "
                                                         "config's dtype and out_dtype")
    parser.add_argument("--seed", type=int, default=0, help="seeds the methods that sample (dare, della); "
                                                            "default 0")


def _merge(arguments: argparse.Namespace) -> int:
    output = Path(arguments.output)
    check_output_folder(output)  # before the config, so that a mistaken --output costs nothing
    config = read_merge_config(arguments.config)
    report = merge_models(config, output, relative_to=Path(arguments.config).parent, seed=arguments.seed,
                          dtype=arguments.dtype, show_progress=True)
    print(f"polm merge: wrote {report.output}")
    print(f"polm merge: {report.summary()}")
    return 0


MERGE_COMMAND = Command("merge models as a mergekit-style YAML config says (linear, task_arithmetic, ties, "
                        "slerp, ...)", _merge_arguments, _merge)
