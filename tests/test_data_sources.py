"""Data from every source a user keeps it in (Hugging Face ``datasets`` underneath): the same rows, the same
encoding and the same trained weights whatever the file format, and errors that name the source and row."""

from __future__ import annotations

import copy
import json

import datasets
import pytest
import torch
from safetensors.torch import load_file

import polm
from polm.engine.data import load_rows
from polm.engine.encoding import encode_row
from polm.modalities.text.tasks.arithmetic import arithmetic_rows

ROWS = [{"prompt": row["prompt"], "answer": row["answer"]} for row in arithmetic_rows("train", 24)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 24 arithmetic rows as JSONL, JSON, CSV, parquet, a save_to_disk folder and a Dataset."""
    folder = tmp_path_factory.mktemp("sources")
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    (folder / "rows.json").write_text(json.dumps(ROWS), encoding="utf-8")
    table = datasets.Dataset.from_list(ROWS)
    table.to_csv(str(folder / "rows.csv"), index=False)
    table.to_parquet(str(folder / "rows.parquet"))
    datasets.DatasetDict({"train": table, "test": table.select(range(4))}).save_to_disk(str(folder / "saved"))
    return {"jsonl": folder / "rows.jsonl", "json": folder / "rows.json", "csv": folder / "rows.csv",
            "parquet": folder / "rows.parquet", "save_to_disk": folder / "saved", "Dataset": table}


@pytest.mark.parametrize("kind", ["json", "csv", "parquet", "save_to_disk", "Dataset"])
def test_every_source_gives_the_rows_and_encoding_of_the_jsonl_file(sources, kind, tokenizer):
    """Rows equal the JSONL file's, field for field, and encode to the same ids and labels."""
    expected = load_rows(sources["jsonl"])
    rows = load_rows(sources[kind] if kind == "Dataset" else str(sources[kind]))
    assert list(rows) == list(expected) == ROWS
    assert [encode_row(tokenizer, row) for row in rows] == [encode_row(tokenizer, row) for row in expected]


def test_a_saved_dataset_dict_gives_the_split_asked_for(sources):
    """A save_to_disk DatasetDict has splits: ``test`` is the 4-row one; a missing split lists those there are."""
    assert list(load_rows(str(sources["save_to_disk"]), "test")) == ROWS[:4]
    with pytest.raises(polm.PolmError, match="has no split 'validation'; it has: train, test"):
        load_rows(str(sources["save_to_disk"]), "validation")


def test_sft_trains_the_same_weights_from_every_source(sources, random_model, tokenizer, tmp_path):
    """Three sft steps from each source end with bit-identical weights."""
    finals = {}
    for kind, source in sources.items():
        spec = source if kind == "Dataset" else str(source)
        result = polm.Pipeline(copy.deepcopy(random_model), tokenizer=tokenizer, seed=0).add(
            "sft", data=spec, max_steps=3, batch_size=4, lr=1e-2, eval_size=0).run(tmp_path / kind)
        finals[kind] = load_file(result.checkpoint / "model.safetensors")
    reference = finals.pop("jsonl")
    for kind, weights in finals.items():
        assert all(torch.equal(weights[key], value) for key, value in reference.items()), kind


def test_columns_rename_a_datasets_fields(tmp_path):
    """``columns`` maps a CSV's own column names to polm's fields and keeps the others; a column that is not
    there is named, with the ones that are."""
    path = tmp_path / "questions.csv"
    path.write_text("question,solution,source\nWhat is 2 + 3?,5,book\nWhat is 1 + 1?,007,web\n", encoding="utf-8")
    rows = load_rows(str(path), columns={"question": "prompt", "solution": "answer"})
    assert list(rows) == [{"prompt": "What is 2 + 3?", "answer": "5", "source": "book"},
                          {"prompt": "What is 1 + 1?", "answer": "007", "source": "web"}]  # CSV fields stay text
    with pytest.raises(polm.PolmError, match=r"has no column 'query'; its columns are: question, solution, source"):
        load_rows(str(path), columns={"query": "prompt"})


def test_a_bad_row_names_where_it_is(tmp_path):
    """A CSV whose columns make no row format fails at its first row, line 2 (the header is line 1); in a
    JSON array the item is named by its index."""
    path = tmp_path / "rows.csv"
    path.write_text("question,solution\nWhat is 2 + 3?,5\n", encoding="utf-8")
    with pytest.raises(polm.PolmError, match=f"^{path}:2: cannot tell the row format"):
        load_rows(str(path))
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"prompt": "What is 2 + 3?", "completion": "5"}, {"prompt": 7, "completion": "5"}]))
    with pytest.raises(polm.PolmError, match=f"^{array} row 1: "):
        load_rows(str(array))


def test_an_unreadable_file_fails_in_one_line_naming_it(tmp_path):
    """A parquet file that is not parquet: one line naming the file, not a traceback."""
    path = tmp_path / "broken.parquet"
    path.write_text("not parquet", encoding="utf-8")
    with pytest.raises(polm.PolmError, match=f"^{path}: cannot read it with datasets") as raised:
        load_rows(str(path))
    assert "\n" not in str(raised.value)


def test_a_stage_checks_its_data_source_when_added(sources):
    """A missing file is refused when the stage is added; a folder, a Dataset and a Hub id pass the check (the
    Hub id is loaded, or refused in one line, when the stage runs)."""
    with pytest.raises(polm.PolmError, match="data file not found: missing.parquet"):
        polm.Pipeline("polm-tiny").add("sft", data="missing.parquet")
    for spec in (str(sources["save_to_disk"]), sources["Dataset"], "openai/gsm8k:main"):
        polm.Pipeline("polm-tiny").add("sft", data=spec)


def test_a_data_file_is_encoded_once_into_the_cache_and_again_when_it_changes(tmp_path, tokenizer):
    """A JSONL file's rows are encoded into an Arrow table in datasets' cache, read back as the same examples as
    encoding them in memory; a second encode reuses the table (as a rerun, a --resume or another process does);
    a changed file is encoded again."""
    from polm.engine.encoded_rows import EncodedRows

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS[:12]), encoding="utf-8")
    stage = polm.Pipeline("polm-tiny").add("sft", data=str(path), max_length=64).stages[0]
    first = stage.encode(tokenizer)
    assert isinstance(first, EncodedRows)
    assert list(first) == [encode_row(tokenizer, row) for row in ROWS[:12]]
    assert stage.encode(tokenizer).table.cache_files == first.table.cache_files
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(ROWS[12]) + "\n")
    changed = stage.encode(tokenizer)
    assert len(changed) == 13 and changed.table.cache_files != first.table.cache_files
