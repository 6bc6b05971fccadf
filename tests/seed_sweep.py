"""Rerun learning tests across pipeline seeds and thread counts, and print what each cell measured.

A learning test passes on the trajectory of the machine it runs on; another CPU sums in another order, and
over a thousand steps that difference grows into another model. Seeds and thread counts are the stand-ins
available on one machine: a test is sound when every cell of this table passes with margin. ::

    python -m tests.seed_sweep tests/test_learning.py --seeds 0 1 2 --threads 1 2
    python -m tests.seed_sweep "tests/test_alignment_learning.py::test_dpo_ranks_held_out_pairs_without_losing_exact_match"

Each cell is one pytest process with ``POLM_TEST_SEED`` and ``OMP_NUM_THREADS`` set (see ``tests/conftest.py``),
slow tests included; cells run side by side while their threads fit the machine's cores. The figures are
the ``record_property`` values of each test, read from pytest's JUnit XML report; the logs and reports stay
in ``--out``, and ``--json`` writes the table for a docstring or a closing note. ``--reports`` tabulates
reports already made, by several sweeps or on several machines, without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
CELL_REPORT = re.compile(r"seed(\d+)-threads(\d+)\.xml")


@dataclass(frozen=True)
class Cell:
    """One trajectory: a pipeline seed and a torch thread count."""

    seed: int
    threads: int

    @property
    def name(self) -> str:
        return f"seed{self.seed}-threads{self.threads}"


@dataclass
class Outcome:
    """What one test did in one cell."""

    outcome: str  # passed, failed, error or skipped
    seconds: float
    figures: dict[str, str] = field(default_factory=dict)
    message: str = ""


def _command(tests: list[str], report: Path) -> list[str]:
    # -m "" lifts the default 'not slow' filter, so slow tests named here run too; the xunit1 report
    # family is the one that holds record_property figures without a warning.
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", "-o", "junit_family=xunit1",
            f"--junitxml={report}", *tests]


def _start(cell: Cell, tests: list[str], out: Path) -> subprocess.Popen:
    environment = {**os.environ, "POLM_TEST_SEED": str(cell.seed), "OMP_NUM_THREADS": str(cell.threads)}
    log = (out / f"{cell.name}.log").open("w")
    return subprocess.Popen(_command(tests, out / f"{cell.name}.xml"), cwd=ROOT, env=environment,
                            stdout=log, stderr=subprocess.STDOUT)


def run_cells(cells: list[Cell], tests: list[str], out: Path, cores: int, console: Console) -> None:
    """Run every cell's pytest, as many at once as their threads fit in ``cores``."""
    waiting, running = list(cells), {}
    while waiting or running:
        while waiting and (not running or sum(c.threads for c in running) + waiting[0].threads <= cores):
            cell = waiting.pop(0)
            running[cell] = (_start(cell, tests, out), time.perf_counter())
            console.print(f"started {cell.name}")
        time.sleep(1)
        for cell, (process, started) in list(running.items()):
            if process.poll() is not None:
                del running[cell]
                console.print(f"finished {cell.name}: pytest exit {process.returncode} "
                              f"in {time.perf_counter() - started:.0f} s")


def read_report(report: Path) -> dict[str, Outcome]:
    """``{test id: Outcome}`` from a JUnit XML report; empty when pytest wrote none."""
    if not report.exists():
        return {}
    outcomes = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = (element.get("message") or "").splitlines()[0] if element.get("message") else ""
                break
        figures = {prop.get("name"): prop.get("value") for prop in case.iter("property")}
        outcomes[test_id] = Outcome(outcome, float(case.get("time", 0)), figures, message)
    return outcomes


def _format(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def _numbers(values: list[str]) -> list[float]:
    numbers = []
    for value in values:
        try:
            numbers.append(float(value))
        except ValueError:
            pass
    return numbers


def tables(cells: list[Cell], results: dict[Cell, dict[str, Outcome]]) -> list[Table]:
    """One table per test: a row per cell with its outcome, figures and time, then the spread (min and max
    of each figure over the cells that ran it)."""
    test_ids = sorted({test_id for outcomes in results.values() for test_id in outcomes})
    made = []
    for test_id in test_ids:
        figure_names = sorted({name for outcomes in results.values() if test_id in outcomes
                               for name in outcomes[test_id].figures})
        table = Table(title=test_id, title_justify="left")
        for column in ("seed", "threads", "outcome", *figure_names, "s"):
            table.add_column(column, justify="right" if column not in ("outcome",) else "left")
        for cell in cells:
            outcome = results[cell].get(test_id)
            if outcome is None:
                table.add_row(str(cell.seed), str(cell.threads), "not run", *[""] * len(figure_names), "")
                continue
            style = "green" if outcome.outcome == "passed" else "red"
            table.add_row(str(cell.seed), str(cell.threads), f"[{style}]{outcome.outcome}[/{style}]",
                          *[_format(outcome.figures.get(name, "")) for name in figure_names],
                          f"{outcome.seconds:.0f}")
        ran = [results[cell][test_id] for cell in cells if test_id in results[cell]]
        table.add_section()
        for label, pick in (("min", min), ("max", max)):
            spread = [_numbers([outcome.figures.get(name, "") for outcome in ran]) for name in figure_names]
            table.add_row(label, "", "", *[f"{pick(numbers):.4g}" if numbers else "" for numbers in spread], "")
        made.append(table)
    return made


def collect_reports(folders: list[Path]) -> dict[Cell, dict[str, Outcome]]:
    """The cells of the ``seed<S>-threads<T>.xml`` reports in ``folders``; one cell's reports are merged."""
    results: dict[Cell, dict[str, Outcome]] = {}
    for folder in folders:
        for report in sorted(folder.glob("seed*-threads*.xml")):
            match = CELL_REPORT.fullmatch(report.name)
            if match:
                cell = Cell(int(match.group(1)), int(match.group(2)))
                results.setdefault(cell, {}).update(read_report(report))
    return results


def show(cells: list[Cell], results: dict[Cell, dict[str, Outcome]], console: Console,
         json_path: Path | None) -> int:
    """Print the tables and the failures, write ``json_path``; 1 when a test failed or a cell has no report."""
    for table in tables(cells, results):
        console.print(table)
    failures = [(cell, test_id, outcome) for cell, outcomes in results.items()
                for test_id, outcome in outcomes.items() if outcome.outcome in ("failed", "error")]
    for cell, test_id, outcome in failures:
        console.print(f"[red]{cell.name} {test_id}: {outcome.message}[/red]")
    if json_path:
        json_path.write_text(json.dumps(
            [{"seed": cell.seed, "threads": cell.threads, "test": test_id, "outcome": outcome.outcome,
              "seconds": outcome.seconds, "figures": outcome.figures}
             for cell, outcomes in results.items() for test_id, outcome in outcomes.items()], indent=1))
    missing = [cell.name for cell, outcomes in results.items() if not outcomes]
    if missing:
        console.print(f"[red]no report from {', '.join(missing)}[/red]")
    return 1 if failures or missing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.seed_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="*", help="pytest test ids or files, as pytest takes them")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="pipeline seeds (default 0 1 2)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch thread counts (default 1 2)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="threads the cells may use at once (default: this machine's cores)")
    parser.add_argument("--out", type=Path, help="folder for each cell's log and report (default: a new temp folder)")
    parser.add_argument("--json", type=Path, help="also write the table here as JSON")
    parser.add_argument("--reports", nargs="+", type=Path, metavar="FOLDER",
                        help="run nothing: tabulate the seed<S>-threads<T>.xml reports in these folders "
                             "(earlier sweeps, or cells run on other machines)")
    arguments = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    if arguments.reports:
        results = collect_reports(arguments.reports)
        if not results:
            parser.error(f"no seed<S>-threads<T>.xml report in {' '.join(map(str, arguments.reports))}")
        return show(sorted(results, key=lambda cell: (cell.threads, cell.seed)), results, console, arguments.json)
    if not arguments.tests:
        parser.error("name the tests to run, or give --reports")
    if min(arguments.seeds) < 0 or min(arguments.threads) < 1:
        parser.error("seeds must be non-negative and thread counts at least 1")
    out = arguments.out or Path(tempfile.mkdtemp(prefix="polm-seed-sweep-"))
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty; give a new folder so no earlier report is overwritten")
    out.mkdir(parents=True, exist_ok=True)

    cells = [Cell(seed, threads) for threads in arguments.threads for seed in arguments.seeds]
    console.print(f"{len(cells)} cells of {' '.join(arguments.tests)}; logs and reports in {out}")
    run_cells(cells, arguments.tests, out, arguments.cores, console)
    return show(cells, {cell: read_report(out / f"{cell.name}.xml") for cell in cells}, console, arguments.json)


if __name__ == "__main__":
    sys.exit(main())
