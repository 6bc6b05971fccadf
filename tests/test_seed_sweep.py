"""The seed sweep runs a test once per (seed, threads) cell and reports each cell's outcome and figures."""

from __future__ import annotations

import json

import pytest

from tests import seed_sweep

PROBE = '''
import os

def test_probe(record_property):
    record_property("seed", os.environ["POLM_TEST_SEED"])
    record_property("threads", os.environ["OMP_NUM_THREADS"])
    assert os.environ["POLM_TEST_SEED"] != "1", "fails on seed 1"
'''


def test_each_cell_runs_with_its_seed_and_threads_and_reports_failures(tmp_path):
    """Seeds 0 and 1 at 1 and 2 threads: four cells, each seeing its own variables; seed 1 fails in both."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    status = seed_sweep.main([str(probe), "--seeds", "0", "1", "--threads", "1", "2",
                              "--out", str(tmp_path / "out"), "--json", str(tmp_path / "sweep.json")])
    cells = json.loads((tmp_path / "sweep.json").read_text())
    assert status == 1
    assert sorted((cell["seed"], cell["threads"], cell["outcome"]) for cell in cells) == [
        (0, 1, "passed"), (0, 2, "passed"), (1, 1, "failed"), (1, 2, "failed")]
    assert all(cell["figures"] == {"seed": str(cell["seed"]), "threads": str(cell["threads"])} for cell in cells)


def test_earlier_reports_are_tabulated_without_running(tmp_path):
    """--reports reads the cells' JUnit reports back: the same cells, outcomes and figures as the sweep's JSON."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    seed_sweep.main([str(probe), "--seeds", "0", "1", "--threads", "1", "--out", str(tmp_path / "out"),
                     "--json", str(tmp_path / "ran.json")])
    status = seed_sweep.main(["--reports", str(tmp_path / "out"), "--json", str(tmp_path / "read.json")])
    assert status == 1  # seed 1 failed
    ran, read = (sorted(json.loads((tmp_path / name).read_text()), key=lambda cell: cell["seed"])
                 for name in ("ran.json", "read.json"))
    assert read == ran and len(read) == 2


def test_a_non_empty_output_folder_is_refused(tmp_path, capsys):
    (tmp_path / "earlier.log").write_text("kept")
    with pytest.raises(SystemExit) as exit_info:
        seed_sweep.main(["tests/test_options.py", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "earlier.log").read_text() == "kept"
