"""``polm export``: write a checkpoint in another runtime's format (GGUF, for llama.cpp)."""

from __future__ import annotations

import argparse
from pathlib import Path

from polm.engine.commands import Command
from polm.engine.errors import PolmError, did_you_mean
from polm.plugins.efficiency.export.gguf_export import FORMATS, TYPES, export_gguf


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a model folder (save_pretrained, with its tokenizer) or a run's "
                                           "stage folder (its final/)")
    parser.add_argument("--format", default="gguf", help="the file format: gguf (llama.cpp), the default")
    parser.add_argument("--output", required=True, help="the file to write, e.g. model-q8_0.gguf")
    # Checked by the export rather than argparse's choices, so that a wrong type is one line and status 2.
    parser.add_argument("--type", default="f16", help=f"the matrices' type: {', '.join(TYPES)} (default f16; "
                                                      "norms stay f32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _export(arguments: argparse.Namespace) -> int:
    if arguments.format not in FORMATS:
        raise PolmError(f"unknown --format '{arguments.format}'; choose {', '.join(FORMATS)}."
                        f"{did_you_mean(arguments.format, FORMATS)}")
    report = export_gguf(Path(arguments.checkpoint), Path(arguments.output), arguments.type,
                         overwrite=arguments.overwrite)
    print(f"polm export: {report.summary()}")
    return 0


EXPORT_COMMAND = Command("write a Llama-architecture checkpoint as a GGUF file for llama.cpp (extra 'export')",
                         _export_arguments, _export)
