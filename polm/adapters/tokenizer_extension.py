"""Tokenizer extension: a domain's frequent strings as new tokens, the model's embeddings resized to them.

:func:`learn_new_tokens` picks the strings of a corpus that the tokenizer splits into several tokens and that
save the most tokens; :func:`extend_tokenizer` adds them and gives each new row of the input embeddings (and of
an untied output layer) the mean of the rows of the tokens the string used to take (the initialisation of Gee
et al. 2022, "Fast Vocabulary Transfer for Language Model Compression", EMNLP Industry Track), so that a new
token starts close to what the model made of its pieces. The ``extend_vocabulary`` stage runs both on its
``data`` before the stages that train on the domain (continued pretraining, SFT), and hands the later stages
the larger tokenizer; its ``final/`` loads with plain ``AutoModelForCausalLM`` / ``AutoTokenizer``.

The new tokens are ordinary (non-special) added tokens holding the text itself, ``" foo"`` with its space, not
the byte-level spelling ``"Ġfoo"``: added tokens are matched in the raw text before the tokenizer's
pre-tokenizer runs, so ``"Ġfoo"`` would only ever match a literal ``Ġ``. Being non-special, they are kept by
``decode(..., skip_special_tokens=True)`` and never stand for a chat role, and a byte-level BPE tokenizer
decodes them back to exactly the text they matched. They are matched wherever the text holds them (the
longest first), even inside a longer word, which is why :func:`learn_new_tokens` measures what each one saves
rather than trusting its count.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polm.engine.data import Row
from polm.engine.distributed import process_state
from polm.engine.errors import PolmError
from polm.engine.log import get_logger
from polm.engine.media import reads_media
from polm.engine.models import load_model
from polm.engine.option_groups import DataOptions
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.tuning import unwrap_peft

#: The candidate strings: a word or identifier (letters and underscores, ``__init__``), a run of punctuation
#: (``):``, ``==``), either with the one space before it, and runs of whitespace (``"\n   "``: a newline and
#: an indentation, whose last space goes with the word after it, as in GPT-2's pre-tokenizer). Numbers are
#: matched so that they are not read as parts of words, and are never candidates.
UNIT = re.compile(r" ?[^\W\d]+| ?\d+| ?[^\w\s]+|\s+(?!\S)|\s+")
#: The file of the stage folder that maps each token the stage added to its id (a LoRA stage after it may train
#: just those rows of the embeddings).
NEW_TOKENS_FILE = "new_tokens.json"
#: Rounds of :func:`learn_new_tokens`' measure-and-refill.
ROUNDS = 4


def learn_new_tokens(tokenizer: Any, texts: Iterable[str], count: int, min_frequency: int = 3) -> list[str]:
    """The at most ``count`` strings of ``texts`` that save the most tokens as new tokens of ``tokenizer``.

    The rule: cut each text into :data:`UNIT` strings (words and identifiers with their leading space,
    punctuation runs, whitespace and indentation runs; no numbers) and count them. A unit seen at least
    ``min_frequency`` times that ``tokenizer`` encodes in ``pieces > 1`` tokens is a candidate, worth
    ``frequency x (pieces - 1)`` tokens; the ``count`` worth most are taken (ties by the string). A unit whose
    end could begin one of the tokenizer's special or added tokens (`` <|`` before ``<|end|>``) is left out:
    a match starting there would split that token.

    Then the choice is measured: every distinct unit is encoded with the candidates added, and what it saves
    (its count times the tokens it no longer takes; negative where a new token matched inside a longer word and
    split it worse) goes to the new tokens its encoding uses, shared equally. A token that saves fewer than
    ``min_frequency`` tokens so (one shadowed by a longer one, or one that splits the words around it) is
    replaced by the next candidate, for up to :data:`ROUNDS` rounds. Deterministic: the same texts give the
    same list.

    Args:
        tokenizer: a transformers tokenizer (left unchanged).
        texts: the domain's corpus.
        count: how many tokens to return at most.
        min_frequency: fewest occurrences of a candidate, and fewest tokens a kept one saves.

    Returns:
        The new tokens, the ones that save most first (ties by the string).
    """
    units = Counter(match.group() for text in texts for match in UNIT.finditer(text))
    distinct = sorted(units)
    before = dict(zip(distinct, _piece_counts(tokenizer, distinct)))
    vocabulary = tokenizer.get_vocab()
    added = [token.content for token in tokenizer.added_tokens_decoder.values()]
    candidates = sorted((unit for unit in distinct if units[unit] >= min_frequency and before[unit] > 1
                         and unit not in vocabulary and not any(char.isdigit() for char in unit)
                         and not _overlaps(unit, added)),
                        key=lambda unit: (-units[unit] * (before[unit] - 1), unit))
    chosen, waiting = candidates[:count], candidates[count:]
    saved: dict[str, float] = {}
    for round_ in range(ROUNDS):
        saved = _measured_savings(tokenizer, chosen, units, before)
        kept = [token for token in chosen if saved[token] >= min_frequency]
        if len(kept) == len(chosen) or not waiting or round_ == ROUNDS - 1:
            chosen = kept
            break
        refill = count - len(kept)
        chosen, waiting = kept + waiting[:refill], waiting[refill:]
    return sorted(chosen, key=lambda token: (-saved[token], token))


def _overlaps(candidate: str, added: Sequence[str]) -> bool:
    """Whether ``candidate`` could match across the start of one of the tokenizer's ``added`` tokens (its special
    tokens): a match starting before ``<|end|>`` would win over it and leave ``end|>`` as text."""
    return any(candidate[-k:] == token[:k] for token in added for k in range(1, min(len(candidate), len(token)) + 1))


def _piece_counts(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """How many tokens each of ``texts`` takes, without special tokens."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]


def _measured_savings(tokenizer: Any, tokens: Sequence[str], units: Counter, before: dict[str, int]
                      ) -> dict[str, float]:
    """The tokens each of ``tokens`` saves over the units of the corpus when all of them are added (see
    :func:`learn_new_tokens`)."""
    extended = with_added_tokens(tokenizer, tokens)
    new_ids = dict(zip(extended.convert_tokens_to_ids(list(tokens)), tokens))
    saved = dict.fromkeys(tokens, 0.0)
    distinct = list(before)
    for unit, ids in zip(distinct, extended(distinct, add_special_tokens=False, verbose=False)["input_ids"]):
        used = sorted({new_ids[i] for i in ids if i in new_ids})
        for token in used:
            saved[token] += units[unit] * (before[unit] - len(ids)) / len(used)
    return saved


def with_added_tokens(tokenizer: Any, tokens: Sequence[str]) -> Any:
    """A copy of ``tokenizer`` with ``tokens`` added as ordinary tokens matched in the raw text (see the module
    docstring); ``tokenizer`` itself is left unchanged."""
    from tokenizers import AddedToken

    extended = copy.deepcopy(tokenizer)
    extended.add_tokens([AddedToken(token, normalized=False, special=False, single_word=False, lstrip=False,
                                    rstrip=False) for token in tokens])
    return extended


def extend_tokenizer(model: torch.nn.Module, tokenizer: Any, new_tokens: Sequence[str]) -> tuple[torch.nn.Module, Any]:
    """``tokenizer`` with ``new_tokens`` added, and ``model``'s embeddings resized to it.

    Each new token's row of the input embeddings is the mean of the rows of the tokens ``tokenizer`` encodes
    the string in; so is its row of an untied output layer (and its bias, if the layer has one). Tied
    embeddings stay tied. The rows of the old tokens are unchanged, and so are the model's logits over them on
    any text that holds none of the new strings. A model whose embeddings already have rows past the tokenizer's
    (a vocabulary padded to a multiple) gives those rows to the new tokens before it grows.

    Strings already in the vocabulary, strings the tokenizer encodes as one token, and repeats are left out.

    Args:
        model: a transformers causal LM; resized in place.
        tokenizer: its tokenizer; left unchanged.
        new_tokens: the strings to add (from :func:`learn_new_tokens`).

    Returns:
        ``(model, extended_tokenizer)``.

    Raises:
        PolmError: an empty string among ``new_tokens``, or a model without input embeddings to resize.
    """
    if any(not isinstance(token, str) or not token for token in new_tokens):
        raise PolmError("new tokens must be non-empty strings")
    vocabulary = tokenizer.get_vocab()
    unique = [token for token in dict.fromkeys(new_tokens) if token not in vocabulary]
    pieces = [tokenizer.encode(token, add_special_tokens=False) for token in unique]
    tokens = [token for token, ids in zip(unique, pieces) if len(ids) > 1]
    pieces = [ids for ids in pieces if len(ids) > 1]
    extended = with_added_tokens(tokenizer, tokens)
    if not tokens:
        return model, extended
    embeddings = model.get_input_embeddings()
    if embeddings is None:
        raise PolmError(f"{type(model).__name__} has no input embeddings to resize")
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embeddings.weight
    with torch.no_grad():
        input_rows = _mean_rows(embeddings.weight, pieces)  # (N, C)
        output_rows = None if output is None or tied else _mean_rows(output.weight, pieces)  # (N, C)
        bias = getattr(output, "bias", None) if output_rows is not None else None
        bias_rows = None if bias is None else _mean_rows(bias[:, None], pieces)[:, 0]  # (N,)
    ids = extended.convert_tokens_to_ids(tokens)
    rows = max(embeddings.weight.shape[0], len(extended))
    if rows > embeddings.weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] = input_rows
        if output_rows is not None:
            resized = model.get_output_embeddings()
            resized.weight[ids] = output_rows
            if bias_rows is not None:
                resized.bias[ids] = bias_rows
    return model, extended


def _mean_rows(weight: torch.Tensor, pieces: Sequence[Sequence[int]]) -> torch.Tensor:
    """(N, C): row ``n`` the mean of ``weight``'s rows ``pieces[n]``, summed in float32, in ``weight``'s dtype."""
    return torch.stack([weight[list(ids)].float().mean(0) for ids in pieces]).to(weight.dtype)


def row_text(row: Row) -> str:
    """The text of a data row for counting: ``text``, else its prompt, completion, answer, preferred and
    rejected completions and message contents (text parts of a list content), joined by newlines."""
    if isinstance(row.get("text"), str):
        return row["text"]
    parts: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    add(item.get("content") if "content" in item else item.get("text"))

    for key in ("prompt", "messages", "completion", "answer", "chosen", "rejected"):
        add(row.get(key))
    return "\n".join(parts)


def tokens_per_byte(tokenizer: Any, texts: Sequence[str]) -> float:
    """Tokens ``tokenizer`` takes for ``texts`` (no special tokens) over their UTF-8 bytes."""
    size = sum(len(text.encode()) for text in texts)
    return sum(_piece_counts(tokenizer, texts)) / size if size else 0.0


def round_trip_failures(tokenizer: Any, texts: Sequence[str]) -> int:
    """How many of ``texts`` ``decode(encode(text))`` does not give back."""
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    return sum(tokenizer.decode(ids) != text for ids, text in zip(encoded, texts))


@dataclass
class ExtendVocabularyOptions(DataOptions):
    """Options of ``extend_vocabulary``: the corpus whose strings become tokens, how many, and the held-out rows
    on which the saving is measured."""

    data: Any = field(metadata={
        "help": "the domain's corpus, rows with 'text' (other formats: their prompt, completion and messages): "
                "'polm:<name>', a .jsonl / .json / .csv / .parquet file, a save_to_disk folder, a Hub dataset "
                "id or a list of rows", "aliases": ("corpus",)})
    new_tokens: int = field(default=1000, metadata={
        "help": "most tokens added (fewer when fewer strings are frequent enough)", "min": 1,
        "aliases": ("count", "num_tokens")})
    min_frequency: int = field(default=3, metadata={
        "help": "fewest occurrences in data of a string made a token, and fewest tokens it must save there",
        "min": 1})
    eval_size: int = field(default=200, metadata={
        "help": "held-out rows (eval_data, or the test split of a bundled data) whose tokens per byte are "
                "reported before and after (0: none)", "min": 0})


class ExtendVocabularyStage(Stage):
    """Add the corpus's frequent strings as tokens and resize the model's embeddings to them; no training."""

    Options = ExtendVocabularyOptions
    headline_metric = "tokens_per_byte"

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The starting model with an earlier stage's adapters merged in.

        Raises:
            PolmError: a model that reads media (its language model's embeddings sit behind its connectors).
        """
        if reads_media(model):
            raise PolmError(f"{self.name}: {type(model).__name__} reads media; extend_vocabulary takes text "
                            "language models")
        return unwrap_peft(model)

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """``tokens_per_byte`` of the held-out rows with ``tokenizer``."""
        texts = [row_text(row) for row in self.eval_rows()]
        return {"tokens_per_byte": tokens_per_byte(tokenizer, texts)} if texts else {}

    def run(self, context: StageContext) -> StageOutput:
        options, tokenizer = self.options, context.tokenizer
        texts = [row_text(row) for row in self.rows()]
        new_tokens = learn_new_tokens(tokenizer, texts, options.new_tokens, options.min_frequency)
        if not new_tokens:
            raise PolmError(f"{self.name}: no string of 'data' occurs {options.min_frequency} times or more and "
                            "takes several tokens; give more text or lower 'min_frequency'")
        held_out = [row_text(row) for row in self.eval_rows()]
        before = {"train": tokens_per_byte(tokenizer, texts), "eval": tokens_per_byte(tokenizer, held_out)}
        model, extended = extend_tokenizer(context.model, tokenizer, new_tokens)
        after = {"train": tokens_per_byte(extended, texts), "eval": tokens_per_byte(extended, held_out)}
        metrics = {"new_tokens": float(len(new_tokens)), "vocab_size": float(len(extended)),
                   "tokens_per_byte_before": before["train"], "tokens_per_byte": after["train"],
                   "token_reduction": 1 - after["train"] / before["train"]}
        if held_out:
            metrics.update({"eval/tokens_per_byte_before": before["eval"], "eval/tokens_per_byte": after["eval"],
                            "eval/token_reduction": 1 - after["eval"] / before["eval"]})
        sample = texts[:200] + held_out
        broken = round_trip_failures(extended, sample) - round_trip_failures(tokenizer, sample)
        if broken > 0:
            get_logger().warning("%s: %d of %d rows no longer decode back to their text with the new tokens",
                                 self.name, broken, len(sample))
        get_logger().info("%s: %d tokens added (vocabulary %d); %.1f%% fewer tokens on data%s", self.name,
                          len(new_tokens), len(extended), 100 * metrics["token_reduction"],
                          f", {100 * metrics['eval/token_reduction']:.1f}% on the held-out rows" if held_out else "")
        if process_state().is_main_process:
            ids = dict(zip(new_tokens, extended.convert_tokens_to_ids(new_tokens)))
            (context.stage_dir / NEW_TOKENS_FILE).write_text(json.dumps(ids, indent=1, ensure_ascii=False))
        return StageOutput(model, metrics, tokenizer=extended)

    def load_finished(self, model: torch.nn.Module, final_dir: Path) -> torch.nn.Module:
        """The extended model saved in ``final_dir`` (its vocabulary is larger than ``model``'s), on ``model``'s
        device."""
        return load_model(final_dir)[0].to(next(model.parameters()).device)

    def load_finished_tokenizer(self, tokenizer: Any, final_dir: Path) -> Any:
        """The extended tokenizer saved in ``final_dir``."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(final_dir)
