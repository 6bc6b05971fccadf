"""Retrieval: the bundled ``polm:lore`` task, the ``bm25`` retriever, the document store, the prompt format and
the ``rag_sft`` stage, as a user meets them (``polm eval --documents``, a recipe, a retriever plugin).

BM25 (Lucene's variant, bm25s' default, which drops Robertson's constant factor ``k1 + 1``) scores a document
``d`` for a query ``q`` as ``sum_{t in q} idf(t) * tf(t, d) / (tf(t, d) + k1 (1 - b + b |d| / avgdl))`` with
``idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5))``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import polm
from polm.engine.cli import main
from polm.engine.data import load_rows
from polm.engine.errors import PolmError
from polm.engine.hookspecs import hookimpl
from polm.engine.retrieval import DocumentStore, Passage, read_passages, retrieval_prompt, with_passages
from polm.modalities.text.tasks.lore import TOWN_COUNTS, lore_towns
from polm.plugins.integration.retrieval import BM25Retriever
from tests.helpers import registered, tiny_llama

CORPUS = ["amber amber salt", "salt road", "glass"]


def test_lore_splits_ask_about_disjoint_towns_whose_passages_hold_every_answer():
    """Four questions per town; the train, test and added towns are disjoint and every name is unique; each
    answer is written in its town's passage; the store holds the train and test towns' passages, not the
    added ones; the same seed gives the same rows."""
    towns = lore_towns()
    assert {split: len(group) for split, group in towns.items()} == TOWN_COUNTS
    names = [name.casefold() for group in towns.values() for town in group
             for name in (town.name, town.river, *town.ruler.split())]
    assert len(names) == len(set(names))
    passages = {row["id"]: row["text"] for row in load_rows("polm:lore-passages", "all")}
    for split in ("train", "test", "added"):
        rows = load_rows("polm:lore", split)
        assert len(rows) == 4 * TOWN_COUNTS[split]
        for row in rows:
            assert row["answer"] in passages[row["passage"]] and row["town"] in row["prompt"], row
    stored = {row["id"] for row in load_rows("polm:lore-passages", "train")}
    assert {row["passage"] for row in load_rows("polm:lore", "test")} <= stored
    assert not {row["passage"] for row in load_rows("polm:lore", "added")} & stored
    assert load_rows("polm:lore", "test") == load_rows("polm:lore", "test")


def test_bm25_scores_match_the_formula_worked_by_hand():
    """Query ``salt`` on three documents (lengths 3, 2, 1; avgdl 2; k1 1.5, b 0.75): ``n_salt = 2`` so
    ``idf = ln(1 + 1.5 / 2.5) = ln 1.6``; document 0 (tf 1, |d| 3) scores ``idf / (1 + 1.5 * 1.375)`` and
    document 1 (tf 1, |d| 2) ``idf / 2.5``, which ranks it first."""
    retriever = BM25Retriever(CORPUS, stopwords=None)
    idf = math.log(1 + 1.5 / 2.5)

    [hits] = retriever.search(["salt"], k=2)

    assert [index for index, _ in hits] == [1, 0]
    assert hits[0][1] == pytest.approx(idf / 2.5, rel=1e-5)
    assert hits[1][1] == pytest.approx(idf / (1 + 1.5 * (1 - 0.75 + 0.75 * 3 / 2)), rel=1e-5)


def test_bm25_finds_the_answering_passage_first_for_every_lore_question():
    """Each question names its town, a word of one passage only: recall@1 is 1.0 on the train and test
    questions, and on the added towns' questions once their passages are added to the store."""
    store = DocumentStore.from_spec("polm:lore-passages")
    for split in ("train", "test"):
        rows = load_rows("polm:lore", split)
        found = store.search([row["prompt"] for row in rows], k=1)
        assert [passages[0].id for passages in found] == [row["passage"] for row in rows], split
    added = load_rows("polm:lore", "added")
    assert all(passages[0].id != row["passage"]
               for row, passages in zip(added, store.search([row["prompt"] for row in added], k=1)))

    store.add(load_rows("polm:lore-passages", "added"))

    found = store.search([row["prompt"] for row in added], k=1)
    assert [passages[0].id for passages in found] == [row["passage"] for row in added]
    assert len(store) == sum(TOWN_COUNTS.values())


def test_the_prompt_numbers_the_passages_before_the_question_and_shuffling_is_seeded():
    store = DocumentStore([Passage("a", "amber amber salt"), Passage("b", "salt road", title="Road"),
                           Passage("c", "glass")], options={"stopwords": None})
    rows = [{"prompt": "salt", "answer": "road"}]

    [plain] = with_passages(rows, store, k=2)
    [shuffled] = with_passages(rows * 1, store, k=3, shuffle_seed=7)

    assert plain["prompt"] == "Passages:\n[1] Road: salt road\n[2] amber amber salt\nQuestion: salt"
    assert plain["prompt"] == retrieval_prompt("salt", [store.passages[1], store.passages[0]])
    assert (plain["question"], plain["passages"], plain["answer"]) == ("salt", ["b", "a"], "road")
    assert sorted(shuffled["passages"]) == ["a", "b", "c"]
    assert with_passages(rows, store, k=3, shuffle_seed=7) == [shuffled]


def test_store_errors_name_the_row_the_id_or_the_retrievers(tmp_path):
    bad = tmp_path / "passages.jsonl"
    bad.write_text(json.dumps({"id": "a", "text": "fine"}) + "\n" + json.dumps({"id": "b", "body": "x"}) + "\n")
    with pytest.raises(PolmError, match=r"passages.jsonl:2: cannot tell the row format from its fields"):
        read_passages(bad)
    bad.write_text(json.dumps({"id": "a", "text": "fine"}) + "\n" + json.dumps({"id": "b", "text": " "}) + "\n")
    with pytest.raises(PolmError, match=r"passages.jsonl:2: a passage needs a non-empty 'text' field"):
        read_passages(bad)
    with pytest.raises(PolmError, match="passage id 'a' is in the store twice"):
        DocumentStore([Passage("a", "one"), Passage("a", "two")])
    with pytest.raises(PolmError, match="unknown retriever 'dense'. Available: bm25"):
        DocumentStore([Passage("a", "one")], retriever="dense")
    with pytest.raises(PolmError, match="retriever 'bm25': .*unexpected keyword argument 'k3'"):
        DocumentStore([Passage("a", "one")], options={"k3": 1})
    with pytest.raises(PolmError, match="top_k must be at least 1"):
        DocumentStore([Passage("a", "one")]).search(["one"], k=0)


class FirstPassageRetriever:
    """A retriever plugin's: every query gets the passages in store order, scored 1."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def search(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        return [[(index, 1.0) for index in range(min(k, len(self.texts)))] for _ in queries]


class FirstPassagePlugin:
    @hookimpl
    def polm_register_retrievers(self, register):
        register("first", FirstPassageRetriever, description="store order")


def test_a_retriever_plugin_serves_the_store_and_polm_eval(tmp_path, model_dir, capsys):
    """Registered the way a plugin registers it, the retriever is found by name by the store and by
    ``polm eval --retriever``, and listed by ``polm plugins``."""
    passages = tmp_path / "passages.jsonl"
    passages.write_text("".join(json.dumps({"id": f"p{i}", "text": f"passage {i}"}) + "\n" for i in range(3)))
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"prompt": "Which?", "answer": "passage 0"}) + "\n")
    with registered(FirstPassagePlugin(), "first-passage"):
        store = DocumentStore.from_spec(passages, retriever="first")
        assert [p.id for p in store.search(["anything"], k=2)[0]] == ["p0", "p1"]
        assert main(["eval", str(model_dir), "--data", str(questions), "--documents", str(passages),
                     "--retriever", "first", "--top-k", "2", "--max-new-tokens", "2"]) == 0
        assert '"exact_match"' in capsys.readouterr().out
        assert main(["plugins"]) == 0
        assert "first" in capsys.readouterr().out


@pytest.mark.parametrize(("arguments", "message"), [
    (["--top-k", "2"], "--top-k is a setting of retrieval; give --documents as well"),
    (["--documents", "polm:lore-passages", "--retriever", "dense"], "unknown retriever 'dense'. Available: bm25"),
    (["--documents", "missing.jsonl"], "missing.jsonl"),
])
def test_polm_eval_retrieval_errors_are_one_line_exit_2(model_dir, capsys, arguments, message):
    assert main(["eval", str(model_dir), "--data", "polm:lore", "--size", "2", *arguments]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_rag_sft_trains_on_prompts_with_shuffled_retrieved_passages_and_evaluates_in_retrieval_order(
        tokenizer, tmp_path):
    """On 8 lore towns (their 32 questions, 24 to train on and 8 held out, and their 8 passages): the stage's
    training rows are the questions with their ``top_k`` passages (the answering one among them, order
    shuffled), its held-out rows the held-out questions with theirs in retrieval order, and a short run lowers
    the loss (a conftest-shaped random Llama with room for two passages)."""
    model = tiny_llama(tokenizer, 0, max_position_embeddings=256)
    towns = lore_towns()["train"][:8]
    questions = [question for town in towns for question in town.questions()]
    stage_options = {"data": str(write_jsonl(tmp_path / "train.jsonl", questions[:24])),
                     "eval_data": str(write_jsonl(tmp_path / "test.jsonl", questions[24:])),
                     "documents": str(write_jsonl(tmp_path / "passages.jsonl", [town.passage() for town in towns])),
                     "top_k": 2, "max_length": 256, "max_steps": 12, "batch_size": 4, "lr": 3e-3, "eval_size": 8,
                     "max_new_tokens": 4, "log_every": 1}
    pipeline = polm.Pipeline(model, tokenizer=tokenizer, seed=0).add("rag_sft", **stage_options)
    stage = pipeline.stages[0]
    training = stage.retrieved(stage.rows(), 0)
    assert all(row["passage"] in row["passages"] and len(row["passages"]) == 2 for row in training)
    assert any(row["passages"][0] != row["passage"] for row in training)
    held_out = stage.eval_rows()
    assert len(held_out) == 8 and all(row["passages"][0] == row["passage"] for row in held_out)
    assert held_out[0]["prompt"].startswith("Passages:\n[1] ") and held_out[0]["prompt"].endswith(
        f"Question: {held_out[0]['question']}")

    result = pipeline.run(tmp_path / "run")

    logged = [json.loads(line) for line in (result.stages[0].checkpoint.parent / "metrics.jsonl").read_text()
              .splitlines()]
    losses = [record["loss"] for record in logged if "loss" in record]
    assert losses[-1] < losses[0], losses


def test_rag_sft_without_documents_fails_at_validation_naming_the_option(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: polm-tiny\nstages:\n  - {name: rag_sft, data: polm:lore, max_steps: 1}\n")
    assert main(["run", str(recipe), "--output", str(tmp_path / "run")]) == 2
    assert "rag_sft needs 'documents'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
