"""``polm compress``: the figures it reports for three variants of the random two-layer Llama, against the
same figures measured directly in the test; and bad input refused in one line, exit 2, nothing written.

The held-out rows are arithmetic questions (``polm:arithmetic``'s test prompts) whose first half is answered
with what the base model itself generates, so that its exact_match is at least 50% rather than a random
model's 0% and the comparison with the test's own ``exact_match`` is not of zeros alone.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from PIL import Image
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from polm.engine.cli import main
from polm.engine.data import load_rows
from polm.engine.errors import PolmError
from polm.engine.evaluation import exact_match, generate
from polm.engine.models import load_model
from polm.plugins.efficiency.compress.measure import SPEED_PROMPTS

pytest.importorskip("matplotlib")
pytest.importorskip("torchao")

EVAL_SIZE, MAX_NEW_TOKENS, SPEED_TOKENS = 8, 4, 4


@pytest.fixture
def variants(model_dir, random_model, tokenizer, tmp_path):
    """``(name, folder, command-line argument)`` of the base model, a one-layer model of half the MLP width
    (random, same tokenizer), and the base quantized to int8 saved as a run's stage folder ``01-quantize``."""
    from polm.plugins.efficiency.quantize import quantize

    config = LlamaConfig(**{**random_model.config.to_dict(), "num_hidden_layers": 1, "intermediate_size": 32})
    small = tmp_path / "small"
    LlamaForCausalLM(config).save_pretrained(small)
    tokenizer.save_pretrained(small)
    final = tmp_path / "run" / "01-quantize" / "final"
    quantize(random_model, "int8_weight_only").save_pretrained(final)
    tokenizer.save_pretrained(final)
    return [("base", model_dir, f"base={model_dir}"), ("small", small, str(small)),
            ("01-quantize", final, str(final.parent))]


@pytest.fixture
def held_out(random_model, tokenizer, tmp_path):
    """Eight arithmetic prompts as JSONL, the first four answered with the base model's greedy completions."""
    rows = [dict(row) for row in load_rows("polm:arithmetic", "test")[:EVAL_SIZE]]
    completions = generate(random_model, tokenizer, [row["prompt"] for row in rows], MAX_NEW_TOKENS)
    for row, completion in zip(rows[: EVAL_SIZE // 2], completions):
        row["answer"] = completion
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _stored_numel(folder):
    """Values stored in the folder's safetensors files (a tied output layer is stored once, as embeddings)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as tensors:
            keys = tensors.keys()  # safe_open is not iterable
            total += sum(math.prod(tensors.get_slice(key).get_shape()) for key in keys)
    return total


def test_compress_reports_the_figures_measured_directly(variants, held_out, tmp_path, capsys):
    output = tmp_path / "report"
    status = main(["compress", *[argument for _, _, argument in variants], "--data", str(held_out),
                   "--eval-size", str(EVAL_SIZE), "--max-new-tokens", str(MAX_NEW_TOKENS),
                   "--speed-tokens", str(SPEED_TOKENS), "--repeats", "2", "--output", str(output)])

    out = capsys.readouterr().out
    assert status == 0
    assert sorted(path.name for path in output.iterdir()) == ["compress.json", "compress.png"]
    document = json.loads((output / "compress.json").read_text())
    assert {"polm_version", "torch_version", "threads", "cpu", "date"} <= set(document)
    reported = {variant["name"]: variant for variant in document["variants"]}
    assert list(reported) == [name for name, _, _ in variants]
    rows = load_rows(str(held_out), "test")[:EVAL_SIZE]
    for name, folder, _ in variants:
        figures = reported[name]
        model, tokenizer = load_model(folder)
        assert figures["parameters"] == sum(parameter.numel() for parameter in model.parameters())
        assert figures["disk_bytes"] == sum(os.stat(path).st_size for path in folder.glob("*.safetensors"))
        assert figures["metrics"] == exact_match(model, tokenizer, rows, MAX_NEW_TOKENS), name
        assert figures["tokens_per_s"] > 0 and len(figures["tokens_per_s_runs"]) == 2
        assert figures["generated_tokens"] == SPEED_PROMPTS * SPEED_TOKENS
        assert figures["peak_rss_bytes"] >= figures["baseline_rss_bytes"] > 0
        assert name in out
    base, small, int8 = (reported[name] for name, _, _ in variants)
    # Float weights: the logical count is what the files store; int8 keeps the count and shrinks the bytes.
    assert base["parameters"] == _stored_numel(variants[0][1])
    assert small["parameters"] == _stored_numel(variants[1][1])
    assert int8["parameters"] == base["parameters"]
    assert int8["size_ratio"] < 1 < base["disk_bytes"] / small["disk_bytes"]
    assert base["size_ratio"] == base["speed_ratio"] == 1 and base["exact_match_delta"] == 0
    assert base["metrics"]["exact_match"] >= 0.5
    delta = int8["metrics"]["exact_match"] - base["metrics"]["exact_match"]
    assert int8["exact_match_delta"] == pytest.approx(delta)
    with Image.open(output / "compress.png") as chart:
        assert chart.format == "PNG" and chart.width >= 1200 and 250 <= chart.height <= 600


@pytest.mark.parametrize("case, expected", [
    ("missing", "is neither a folder nor a registered model"),
    ("data", "unknown dataset 'arithmetc'. Did you mean 'arithmetic'?"),
    ("not-empty", "is not empty; pass --overwrite"),
], ids=["missing-variant", "unknown-data", "non-empty-output"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, expected, model_dir, tmp_path, capsys):
    output = tmp_path / "report"
    if case == "not-empty":
        output.mkdir()
        (output / "compress.json").write_text("an earlier report\n")
    arguments = [str(model_dir), str(tmp_path / "missing") if case == "missing" else f"copy={model_dir}",
                 "--data", "polm:arithmetc" if case == "data" else "polm:arithmetic", "--output", str(output)]

    status = main(["compress", *arguments])

    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("polm: error: ") and expected in lines[0], captured.err
    if case == "not-empty":
        assert [path.name for path in output.iterdir()] == ["compress.json"]
        assert (output / "compress.json").read_text() == "an earlier report\n"
    else:
        assert not output.exists()


def test_a_variant_is_named_after_its_folder_or_its_stage(model_dir, tmp_path):
    from polm.plugins.efficiency.compress import parse_variant

    final = tmp_path / "run" / "02-prune" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    assert parse_variant(f"base={model_dir}") == ("base", str(model_dir))
    assert parse_variant(str(model_dir)) == ("model", str(model_dir))
    assert parse_variant(str(final.parent)) == parse_variant(str(final))[:1] + (str(final.parent),)
    assert parse_variant(str(final))[0] == "02-prune"
    assert parse_variant("polm-tiny") == ("polm-tiny", "polm-tiny")
    with pytest.raises(PolmError, match="is not a model folder"):
        parse_variant(str(tmp_path))
    with pytest.raises(PolmError, match="expected NAME=PATH or PATH"):
        parse_variant(f"={model_dir}")
