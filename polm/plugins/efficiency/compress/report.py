"""The comparison of measured variants: a rich table, a JSON document and a PNG bar chart.

The first variant is the base the others are compared with: their size and speed as ratios of its figures,
their metric as a difference from it. The chart is drawn with matplotlib (extra ``report``) on its
non-interactive Agg canvas, without pyplot, so that drawing it changes no global matplotlib state.
"""

from __future__ import annotations

import importlib.util
import io
import platform
from collections.abc import Sequence
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from polm.engine.errors import PolmError
from polm.plugins.efficiency.compress.measure import SPEED_PROMPTS, WEIGHT_SUFFIXES, VariantFigures

MB = 1e6
#: The chart's panels: title, and the figure each variant's bar shows.
PANELS = (
    ("disk (MB)", lambda figures: figures.disk_bytes / MB),
    ("parameters (M)", lambda figures: figures.parameters / 1e6),
    ("exact_match", lambda figures: figures.exact_match),
    ("tokens/s", lambda figures: figures.tokens_per_s),
    ("peak memory (MB)", lambda figures: figures.peak_rss_bytes / MB),
)


def check_matplotlib() -> None:
    """Raises PolmError when matplotlib, which draws the chart, is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PolmError("polm compress draws its chart with matplotlib, which is not installed: "
                        "pip install 'polm[report]'")


def comparisons(variants: Sequence[VariantFigures]) -> list[dict[str, float | None]]:
    """Each variant against the first: ``size_ratio`` (disk bytes), ``parameters_ratio``, ``speed_ratio``
    (tokens/s), ``memory_ratio`` (peak resident memory) and ``exact_match_delta``."""
    base = variants[0]

    def ratio(value: float, reference: float) -> float | None:
        return value / reference if reference else None

    return [{"size_ratio": ratio(figures.disk_bytes, base.disk_bytes),
             "parameters_ratio": ratio(figures.parameters, base.parameters),
             "speed_ratio": ratio(figures.tokens_per_s, base.tokens_per_s),
             "memory_ratio": ratio(figures.peak_rss_bytes, base.peak_rss_bytes),
             "exact_match_delta": figures.exact_match - base.exact_match} for figures in variants]


def environment() -> dict[str, Any]:
    """What the figures depend on: polm's and torch's versions, torch's thread count, the CPU, the date."""
    try:
        polm_version = version("polm")
    except PackageNotFoundError:
        polm_version = "unknown"
    return {"polm_version": polm_version, "torch_version": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(),
            "date": datetime.now().astimezone().isoformat(timespec="seconds")}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def report_document(variants: Sequence[VariantFigures], settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: the environment, the settings, and per variant every figure and its comparison."""
    return {**environment(), "settings": {**settings, "speed_prompts": SPEED_PROMPTS,
                                          "weight_files": [f"*{suffix}" for suffix in WEIGHT_SUFFIXES]},
            "variants": [{**figures.as_dict(), **compared}
                         for figures, compared in zip(variants, comparisons(variants))]}


def figures_table(variants: Sequence[VariantFigures], title: str = "polm compress") -> Table:
    """A row per variant: parameters, disk, held-out exact_match, tokens/s and memory, with the size and speed
    as ratios of the base's and exact_match as a difference from it, in points."""
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("variant", no_wrap=True)
    for column in ("params", "disk MB", "size", "exact_match", "delta", "tokens/s", "speed", "peak MB",
                   "model MB"):
        table.add_column(column, justify="right")
    for figures, compared in zip(variants, comparisons(variants)):
        table.add_row(figures.name, _count(figures.parameters), f"{figures.disk_bytes / MB:.3g}",
                      _times(compared["size_ratio"]), f"{100 * figures.exact_match:.1f}%",
                      f"{100 * compared['exact_match_delta']:+.1f}", f"{figures.tokens_per_s:.1f}",
                      _times(compared["speed_ratio"]), f"{figures.peak_rss_bytes / MB:.0f}",
                      f"{figures.model_rss_bytes / MB:.0f}")
    return table


def print_table(table: Table) -> None:
    """Print ``table`` on standard output; written to a file or a pipe, as wide as it needs to be (rich would
    otherwise squeeze it into 80 columns)."""
    console = Console()
    if not console.is_terminal:
        needed = console.measure(table, options=console.options.update_width(1000)).maximum
        console.width = max(console.width, needed)
    console.print(table)


def _count(value: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return str(value)


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def chart_png(variants: Sequence[VariantFigures], title: str) -> bytes:
    """One row of bar charts (:data:`PANELS`), a bar per variant, as PNG bytes.

    Raises:
        PolmError: matplotlib is not installed.
    """
    check_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [figures.name for figures in variants]
    figure = Figure(figsize=(3.2 * len(PANELS), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    colours = [f"C{index % 10}" for index in range(len(variants))]
    for axes, (panel, value) in zip(figure.subplots(1, len(PANELS)), PANELS):
        values = [value(figures) for figures in variants]
        if panel.startswith("peak memory"):  # the baseline (interpreter and libraries) in grey beneath
            baselines = [figures.baseline_rss_bytes / MB for figures in variants]
            axes.bar(range(len(names)), baselines, color="lightgrey", label="before the load")
            bars = axes.bar(range(len(names)), [v - b for v, b in zip(values, baselines)], bottom=baselines,
                            color=colours)
            axes.legend(loc="lower right", fontsize=7)
        else:
            bars = axes.bar(range(len(names)), values, color=colours)
        axes.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values], fontsize=8)
        axes.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axes.set_title(panel, fontsize=10)
        if panel == "exact_match":
            axes.set_ylim(0, 1.05)
        else:
            axes.margins(y=0.15)
    figure.suptitle(title, fontsize=11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
