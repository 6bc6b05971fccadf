"""``polm compress``: variants of a model (base, distilled, pruned, quantized) measured side by side."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from polm.engine.commands import Command
from polm.engine.data import load_rows
from polm.engine.errors import PolmError, did_you_mean
from polm.engine.evaluation import graded_rows
from polm.engine.log import get_logger
from polm.engine.models import FINAL_DIR, stage_model_folder
from polm.plugins.efficiency.compress.measure import measure_in_fresh_process
from polm.plugins.efficiency.compress.report import (
    chart_png,
    check_matplotlib,
    figures_table,
    print_table,
    report_document,
)

JSON_FILE, CHART_FILE = "compress.json", "compress.png"


def _compress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("variants", nargs="+", metavar="VARIANT",
                        help="NAME=PATH or PATH: a model folder, a run's stage folder (runs/q/01-quantize) "
                             "or a registered model (polm-tiny); the first is the base the others are "
                             "compared with")
    parser.add_argument("--data", required=True, help="held-out rows: 'polm:<name>' (its --split) or a file")
    parser.add_argument("--split", default="test", help="the split of a bundled dataset (default test)")
    parser.add_argument("--eval-size", type=int, default=300, help="rows graded (default 300)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens per answer (default 8)")
    parser.add_argument("--speed-tokens", type=int, default=32,
                        help="tokens generated per prompt when timing generation (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generation runs (median reported)")
    parser.add_argument("--output", help="folder for compress.json and compress.png "
                                         "(default runs/compress-<time>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output folder (its compress.json and compress.png "
                             "replaced, its other files kept)")


def parse_variant(item: str) -> tuple[str, str]:
    """``(name, spec)`` of ``NAME=PATH`` or of a bare ``PATH``, named after its folder (a stage folder's
    name for its ``final/``), checked to be a model folder or a registered model.

    Raises:
        PolmError: an empty name or path, or a path that is neither a model folder nor a registered model.
    """
    from polm.engine.plugins import registry

    models = registry("models")
    name, separator, spec = item.partition("=")
    if not separator or Path(item).exists():  # a path may hold '='
        name, spec = "", item
    elif not (name and spec):
        raise PolmError(f"variant '{item}': expected NAME=PATH or PATH")
    if spec in models:
        return name or spec, spec
    path = Path(spec)
    if not path.exists():
        raise PolmError(f"variant '{item}': {spec} is neither a folder nor a registered model."
                        f"{did_you_mean(spec, models)} Registered: {', '.join(models) or 'none'}")
    folder = stage_model_folder(path)
    if not any((folder / file).is_file() for file in ("config.json", "adapter_config.json")):
        raise PolmError(f"variant '{item}': {folder} is not a model folder (no config.json); give a model "
                        "folder, a run's stage folder (runs/q/01-quantize) or a registered model "
                        f"({', '.join(models)})")
    if not name:
        resolved = path.resolve()
        name = resolved.parent.name if resolved.name == FINAL_DIR else resolved.name
    return name, spec


def _positive(arguments: argparse.Namespace, *options: str) -> None:
    for option in options:
        value = getattr(arguments, option)
        if value < 1:
            raise PolmError(f"--{option.replace('_', '-')} must be at least 1, got {value}")


def _compress(arguments: argparse.Namespace) -> int:
    # Everything is checked before anything is measured or written.
    _positive(arguments, "eval_size", "max_new_tokens", "speed_tokens", "repeats")
    variants = [parse_variant(item) for item in arguments.variants]
    names = [name for name, _ in variants]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise PolmError(f"variant names must differ; {', '.join(repeated)} is given twice "
                        "(name them NAME=PATH)")
    rows = graded_rows(load_rows(arguments.data, arguments.split)[: arguments.eval_size])
    output = Path(arguments.output or f"runs/compress-{time.strftime('%Y%m%d-%H%M%S')}")
    if output.exists() and not output.is_dir():
        raise PolmError(f"--output {output} is a file; give a folder")
    if output.is_dir() and any(output.iterdir()) and not arguments.overwrite:
        raise PolmError(f"output folder {output} is not empty; pass --overwrite to write {JSON_FILE} and "
                        f"{CHART_FILE} into it (its other files are kept)")
    check_matplotlib()

    measured = []
    for index, (name, spec) in enumerate(variants, start=1):
        get_logger().info("polm compress: measuring %s (%d/%d): %s", name, index, len(variants), spec)
        figures = measure_in_fresh_process(name, spec, rows, arguments.max_new_tokens,
                                           speed_tokens=arguments.speed_tokens, repeats=arguments.repeats)
        get_logger().info("polm compress: %s measured in %.1f s", name, figures.seconds)
        measured.append(figures)
    settings = {"data": str(arguments.data), "split": arguments.split, "eval_rows": len(rows),
                "max_new_tokens": arguments.max_new_tokens, "speed_tokens": arguments.speed_tokens,
                "repeats": arguments.repeats}
    document = report_document(measured, settings)
    title = (f"polm compress: {arguments.data}, {len(rows)} rows; {document['cpu']}, "
             f"{document['threads']} thread{'' if document['threads'] == 1 else 's'}")
    chart = chart_png(measured, title)  # drawn before anything is written

    output.mkdir(parents=True, exist_ok=True)
    (output / JSON_FILE).write_text(json.dumps(document, indent=2) + "\n")
    (output / CHART_FILE).write_bytes(chart)
    print_table(figures_table(measured))
    print(f"polm compress: wrote {output / JSON_FILE} and {output / CHART_FILE}")
    return 0


COMPRESS_COMMAND = Command("compare variants of a model: parameters, bytes on disk, held-out exact_match, "
                           "tokens/s and peak memory (extra 'report' for the chart)",
                           _compress_arguments, _compress)
