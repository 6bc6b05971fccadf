"""Compression report: ``polm compress`` (:mod:`.command`) measures variants of a model side by side.

:mod:`.measure` measures one variant in a fresh process (parameters, bytes on disk, held-out exact_match,
generation tokens/s, peak memory); :mod:`.report` compares them with the first as a rich table, a JSON
document and a PNG bar chart (matplotlib, extra ``report``).
"""

from polm.plugins.efficiency.compress.command import COMPRESS_COMMAND, parse_variant
from polm.plugins.efficiency.compress.measure import (
    VariantFigures,
    measure_in_fresh_process,
    measure_variant,
    peak_rss_bytes,
    tokens_per_second,
    weight_files,
)
from polm.plugins.efficiency.compress.report import chart_png, comparisons, figures_table, report_document

__all__ = ["COMPRESS_COMMAND", "VariantFigures", "chart_png", "comparisons", "figures_table",
           "measure_in_fresh_process", "measure_variant", "parse_variant", "peak_rss_bytes",
           "report_document", "tokens_per_second", "weight_files"]
