"""Knowledge editing: ROME's rank-one update and MEMIT's batched one worked on small tensors, the ``edit`` stage
on a tiny random Llama, bad requests named by their row, and the bundled fact task."""

from __future__ import annotations

import json
import math

import pytest
import torch

import polm
from polm.engine.errors import PolmError
from polm.modalities.text.tasks.facts import EDITED, RELATIONS, fact_world, facts_rows
from polm.plugins.integration.editing import (
    ValueOptions,
    edit,
    load_requests,
    memit_update,
    mlp_effects,
    rome_update,
    traced_layer,
    yields,
)


def _problem(d_out: int = 4, d_in: int = 6, seed: int = 0):
    """A weight ``W`` (d_out x d_in), a symmetric positive definite ``C = A A^T + I``, a key and a value."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    a = torch.randn(d_in, d_in, generator=generator, dtype=torch.float64)
    covariance = a @ a.T + torch.eye(d_in, dtype=torch.float64)
    key = torch.randn(d_in, generator=generator, dtype=torch.float64)
    value = torch.randn(d_out, generator=generator, dtype=torch.float64)
    return weight, covariance, key, value


def test_rome_update_maps_the_key_to_the_value_and_keeps_keys_orthogonal_in_the_inverse_covariance():
    """W' = W + (v* - W k*) u^T / (u^T k*), u = C^-1 k*: W' k* = W k* + (v* - W k*) = v*, and for any k with
    u^T k = 0 the added term vanishes, W' k = W k (three such keys: random ones with their u-component removed)."""
    weight, covariance, key, value = _problem()
    updated = rome_update(weight, covariance, key, value)
    torch.testing.assert_close(updated @ key, value)
    u = torch.linalg.solve(covariance, key)
    others = torch.randn(3, key.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    others = others - torch.outer(others @ u, u) / (u @ u)  # (3, d_in), each with u^T k = 0
    torch.testing.assert_close(others @ updated.T, others @ weight.T)
    assert torch.linalg.matrix_rank(updated - weight) == 1


def test_memit_with_one_request_on_one_layer_is_rome_damped_by_lambda():
    """One key k, one residual r = v* - W k: R K^T (lambda C + K K^T)^-1 = r (C^-1 k)^T / (lambda + k^T C^-1 k)
    (Sherman-Morrison), which tends to ROME's r (C^-1 k)^T / (k^T C^-1 k) as lambda goes to 0."""
    weight, covariance, key, value = _problem()
    residual = value - weight @ key
    u = torch.linalg.solve(covariance, key)
    for prior in (0.5, 3.0):
        expected = weight + torch.outer(residual, u) / (prior + u @ key)
        torch.testing.assert_close(memit_update(weight, covariance, key[:, None], residual[:, None], prior), expected)
    torch.testing.assert_close(memit_update(weight, covariance, key[:, None], residual[:, None], 1e-9),
                               rome_update(weight, covariance, key, value), rtol=1e-6, atol=1e-6)


def test_memit_writes_a_batch_of_keys_as_lambda_vanishes():
    """With n < d_in independent keys and lambda -> 0 the least-squares update is exact: W' K = W K + R."""
    weight, covariance, _, _ = _problem(d_out=5, d_in=8)
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    residuals = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    updated = memit_update(weight, covariance, keys, residuals, 1e-9)
    torch.testing.assert_close(updated @ keys, weight @ keys + residuals, rtol=1e-5, atol=1e-5)


# A random model's attention carries little from one token to the next, so these prompts end with their subject,
# where the edited value reaches the prediction directly, and the target is one token of the tokenizer (" sum").
REQUEST = {"prompt": "What is 12 + 7", "subject": "12 + 7", "target": "sum", "paraphrases": ["The sum of 12 + 7"],
           "neighbourhood": [{"prompt": "3 * 4 =", "target": "12"}, {"prompt": "9 - 5 =", "target": "4"}]}
CORPUS = [{"text": "What is 12 + 7? The sum of 12 and 7 is 19. 3 * 4 = 12; 9 - 5 = 4."}] * 8
EASY_VALUES = {"steps": 8, "weight_decay": 0.0, "kl_factor": 0.0, "clamp_norm": 100.0}


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_edit_stage_makes_the_prompt_yield_the_new_target(method, model_dir, tokenizer, tmp_path):
    requests = tmp_path / "edits.jsonl"
    requests.write_text(json.dumps(REQUEST) + "\n")
    before, _ = polm.load_model(model_dir)
    assert yields(before, tokenizer, [(REQUEST["prompt"], " sum")]) == [False]
    result = (polm.Pipeline(str(model_dir), seed=0)
              .add("edit", requests=str(requests), method=method, covariance_corpus=CORPUS, prior_weight=0.1,
                   **EASY_VALUES)
              .run(tmp_path / "run"))
    metrics = result.stages[0].metrics
    assert metrics["eval/efficacy_before"] == 0.0 and metrics["eval/efficacy"] == 1.0, metrics
    assert {"eval/paraphrase", "eval/neighbourhood", "eval/neighbourhood_before"} <= metrics.keys()
    edited, _ = polm.load_model(result.stages[0].checkpoint)
    assert yields(edited, tokenizer, [(REQUEST["prompt"], REQUEST["target"])]) == [True]
    changed = [name for name, tensor in edited.state_dict().items()
               if not torch.equal(tensor, before.state_dict()[name])]
    assert changed == ["model.layers.0.mlp.down_proj.weight"]


def test_edit_api_writes_requests_one_after_another_with_rome(random_model, tokenizer):
    """Two ROME edits of the same layer, the second after the first: both prompts yield their targets."""
    second = {"prompt": "What is 3 * 4", "subject": "3 * 4", "target": "and"}
    result = edit(random_model, tokenizer, [REQUEST, second], method="rome", layers=[1], covariance_corpus=CORPUS,
                  value_options=ValueOptions(**EASY_VALUES))
    assert result.layers == [1] and result.metrics["requests"] == 2.0
    assert result.metrics["efficacy_before"] == 0.0 and result.metrics["efficacy"] == 1.0, result.metrics


@pytest.mark.parametrize(("row", "complaint"), [
    ({"prompt": "What is 12 + 7", "target": "sum"}, "needs 'subject'"),
    ({"prompt": "What is 12 + 7", "subject": "9 - 5", "target": "sum"}, "does not occur in prompt"),
])
def test_a_bad_request_fails_in_one_line_naming_its_row(row, complaint, model_dir, tmp_path):
    requests = tmp_path / "edits.jsonl"
    requests.write_text(json.dumps(REQUEST) + "\n" + json.dumps(row) + "\n")
    pipeline = polm.Pipeline(str(model_dir), seed=0).add("edit", requests=str(requests))
    with pytest.raises(PolmError) as raised:
        pipeline.run(tmp_path / "run")
    message = str(raised.value)
    assert f"{requests}:2" in message and complaint in message and "\n" not in message, message
    assert not (tmp_path / "run").exists()


def test_edit_options_refuse_rome_on_several_layers():
    with pytest.raises(PolmError, match="rome edits one layer"):
        polm.Pipeline("polm-tiny").add("edit", requests="polm:facts", method="rome", layers=[0, 1])


def test_fact_task_teaches_every_fact_in_every_phrasing_and_edits_to_new_objects_of_the_pool():
    places, pools = fact_world()
    text = " ".join(row["text"] for row in facts_rows("train"))
    assert all(sentence in text for place in places for sentence in place.sentences())
    edits = facts_rows("edits")
    edited = {row["subject"] for row in edits}
    assert len(edits) == EDITED == len(edited)
    for row in edits:
        assert row["target"] != row["answer"] and row["target"] in pools[row["relation"]]
        assert len(row["paraphrases"]) == len(RELATIONS[row["relation"]]) - 1
        assert all(row["subject"] in prompt for prompt in [row["prompt"], *row["paraphrases"]])
        assert not any(name in neighbour["prompt"] for neighbour in row["neighbourhood"] for name in edited)
    assert [request.prompt for request in load_requests("polm:facts")] == [row["prompt"] for row in edits]
    facts = facts_rows("facts")
    assert len(facts) == len(places) * len(RELATIONS)
    assert {(row["prompt"], row["answer"]) for row in edits} <= {(row["prompt"], row["answer"]) for row in facts}


def test_causal_tracing_measures_each_mlp_and_chooses_the_layer_of_the_largest_effect(random_model, tokenizer):
    """Without noise the corrupted run is the clean one, so restoring any MLP gives back nothing (every effect
    0); with noise there is one effect per layer, and the traced layer is the largest one's."""
    requests = load_requests([REQUEST])
    assert mlp_effects(random_model, tokenizer, requests, samples=2, noise=0.0) == [0.0, 0.0]
    effects = mlp_effects(random_model, tokenizer, requests, samples=4)
    assert len(effects) == 2 and all(math.isfinite(effect) for effect in effects)
    assert traced_layer(random_model, tokenizer, requests, samples=4) == max(range(2), key=effects.__getitem__)
    result = edit(random_model, tokenizer, requests, method="memit", trace=True, covariance_corpus=CORPUS, prior_weight=0.1,
                  value_options=ValueOptions(**EASY_VALUES))
    assert result.layers == list(range(effects.index(max(effects)) + 1)) and result.metrics["efficacy"] == 1.0
