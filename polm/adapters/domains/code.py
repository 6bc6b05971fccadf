"""The ``code`` domain: Python, from the standard library's own source files on this machine.

The corpus is the ``*.py`` files under the running interpreter's ``sysconfig.get_paths()["stdlib"]``, without
tests, ``site-packages`` and files over :data:`MAX_FILE_BYTES`; nothing is downloaded. Files are split whole
into train and test by a stable hash of their path (:func:`split_of`), so no file's text is on both sides, and
sampled in hash order up to :data:`SPLIT_BYTES` per split so that building takes a second.

Two datasets:

- ``polm:stdlib-code``: ``{text}`` rows, each file cut at line ends into chunks of at most :data:`CHUNK_CHARS`
  characters (an SFT stage trains on every token of a text row: continued pretraining).
- ``polm:stdlib-firstline``: ``{prompt, answer}`` rows, one per function: the prompt is the source up to and
  including the ``def`` line(s) and docstring (with as many whole lines before them as fit in
  :data:`PROMPT_CHARS`), the answer the first line of the body's first statement (:func:`first_line_rows`).

The evaluator reports held-out bits per byte of the test files (:func:`polm.engine.domains.bits_per_byte`) and
``first_line_exact_match``: greedy continuation of each prompt as raw text (no chat template), its first
non-blank line compared, stripped, with the answer.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polm.engine.data import Row
from polm.engine.domains import bits_per_byte
from polm.engine.errors import PolmError

#: Test files are those whose path hashes into the first ``TEST_BUCKETS`` of 100 buckets.
TEST_BUCKETS = 10
#: Folders left out of the corpus: tests and what is not the standard library's own source.
SKIPPED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
#: Larger files are mostly generated tables (``encodings``, ``pydoc_data``), not code written by people.
MAX_FILE_BYTES = 64_000
#: At most this much source per split (train, test), taken in hash order: a sample of every package.
SPLIT_BYTES = {"train": 3_000_000, "test": 400_000}
#: A text row holds whole lines up to this many characters (a longer line is cut): about 250 tokens of
#: polm-tiny, whose context is 256 positions.
CHUNK_CHARS = 320
#: A first-line prompt holds the ``def`` line(s) and docstring and the whole lines before them up to this.
PROMPT_CHARS = 1_000
#: Answers longer than this are left out: a first line is a line, not a paragraph.
MAX_ANSWER_CHARS = 100


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """``"test"`` or ``"train"`` for a file, by a hash of its path relative to the standard library: the same
    on every machine and run, whatever other files exist."""
    bucket = int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest(), 16) % 100
    return "test" if bucket < TEST_BUCKETS else "train"


def source_files(root: Path) -> list[str]:
    """The corpus's files under ``root``, as sorted POSIX paths relative to it."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in SKIPPED_FOLDERS]
        for name in names:
            path = Path(folder) / name
            if name.endswith(".py") and path.stat().st_size <= MAX_FILE_BYTES:
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


@functools.lru_cache(maxsize=4)
def split_files(split: str, root: Path | None = None) -> tuple[tuple[str, str], ...]:
    """The ``(relative path, text)`` of each file of ``split``, in hash order, up to ``SPLIT_BYTES[split]``.

    Raises:
        PolmError: an unknown split, or no source files under the folder.
    """
    if split not in SPLIT_BYTES:
        raise PolmError(f"the stdlib code datasets have the splits {', '.join(SPLIT_BYTES)}; got '{split}'")
    root = root or stdlib_root()
    files = [path for path in source_files(root) if split_of(path) == split]
    if not files:
        raise PolmError(f"no Python source files found under {root} for the code domain")
    chosen, total = [], 0
    for path in sorted(files, key=lambda path: hashlib.sha256(path.encode("utf-8")).hexdigest()):
        try:
            text = (root / path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if total + len(text) > SPLIT_BYTES[split]:
            continue
        chosen.append((path, text))
        total += len(text)
    return tuple(chosen)


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """``text`` as consecutive pieces of whole lines, each at most ``size`` characters (a longer line is cut);
    joined they give ``text`` back."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > size:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:size])
            line = line[size:]
        if len(current) + len(line) > size:
            pieces.append(current)
            current = ""
        current += line
    if current:
        pieces.append(current)
    return pieces


def code_rows(split: str) -> list[Row]:
    """``polm:stdlib-code``: one ``{text, file}`` row per chunk of each file of ``split``."""
    return [{"text": piece, "file": path} for path, text in split_files(split) for piece in chunks(text)
            if piece.strip()]


def first_line_rows(source: str, file: str = "", prompt_chars: int = PROMPT_CHARS) -> list[Row]:
    """One ``{prompt, answer, file, function}`` row per function of ``source`` whose body starts on a line of
    its own.

    The prompt ends with the line before the body's first statement: the ``def`` line(s), the docstring if
    there is one, and whole lines before them while the prompt stays within ``prompt_chars`` (a function whose
    header alone is longer is left out). The answer is that statement's first line, stripped. Functions whose
    body is only a docstring, or that do not parse, give no row.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.split("\n")  # as ast counts lines (str.splitlines also breaks at form feeds)
    rows = []
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in sorted(functions, key=lambda node: node.lineno):  # in source order
        body = node.body[1:] if ast.get_docstring(node, clean=False) is not None else node.body
        if not body:
            continue
        line = body[0].lineno  # 1-based
        if lines[line - 1].encode("utf-8")[:body[0].col_offset].strip():
            continue  # ``def f(): return 1``: the statement shares a line with the header
        answer = lines[line - 1].strip()
        if not answer or len(answer) > MAX_ANSWER_CHARS:
            continue
        start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1  # 0-based
        prompt = "".join(text + "\n" for text in lines[start:line - 1])
        if len(prompt) > prompt_chars:
            continue
        while start > 0 and len(lines[start - 1]) + 1 + len(prompt) <= prompt_chars:
            start -= 1
            prompt = lines[start] + "\n" + prompt
        rows.append({"prompt": prompt, "answer": answer, "file": file, "function": node.name})
    return rows


def firstline_rows(split: str) -> list[Row]:
    """``polm:stdlib-firstline``: the first-line rows of every file of ``split``, file by file."""
    return [row for path, text in split_files(split) for row in first_line_rows(text, path)]


def first_nonblank_line(text: str) -> str:
    """The first line of ``text`` with anything but whitespace, stripped; ``""`` if none."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


@torch.no_grad()
def continue_text(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                  batch_size: int = 16) -> list[str]:
    """Greedy continuations of raw-text ``prompts`` (no chat template: code is continued, not answered).

    A prompt keeps its last tokens that leave room for ``max_new_tokens`` in the model's context.
    """
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    keep = max(1, context - max_new_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    completions = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"][-keep:]
                   for prompt in prompts[start:start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)  # (B, T)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        completions += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return completions


def evaluate_code(model: torch.nn.Module, tokenizer: Any, max_bytes: int = 100_000, tasks: int = 200,
                  max_new_tokens: int = 48) -> dict[str, float]:
    """The ``code`` domain's held-out metrics.

    Args:
        max_bytes: characters of held-out files read for ``bits_per_byte``, in the split's order (the last
            file read is cut at a line end).
        tasks: first-line rows completed for ``first_line_exact_match`` (0: skip it).
        max_new_tokens: tokens generated per first-line prompt.

    Returns:
        ``bits_per_byte`` (lower is better), ``first_line_exact_match`` (a fraction) and the ``bytes`` and
        ``tasks`` they were measured on.
    """
    texts, left = [], max_bytes
    for _, text in split_files("test"):
        if len(text) > left:  # the last file read is cut at a line end
            texts.append(text[:text.rfind("\n", 0, left) + 1] or text[:left])
            break
        texts.append(text)
        left -= len(text)
    metrics = {"bits_per_byte": bits_per_byte(model, tokenizer, texts),
               "bytes": float(sum(len(text.encode("utf-8")) for text in texts))}
    rows = firstline_rows("test")[:tasks]
    if rows:
        completions = continue_text(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens)
        hits = [first_nonblank_line(completion) == row["answer"] for completion, row in zip(completions, rows)]
        metrics.update(first_line_exact_match=sum(hits) / len(hits), tasks=float(len(rows)))
    return metrics
