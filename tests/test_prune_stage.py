"""The ``prune`` stage: scores and masks on hand-made matrices, structured removal that computes what the model
with those neurons or heads zeroed computes, and runs that save a smaller or sparser plain transformers model.

The model is the random two-layer Llama of ``random_model`` (hidden 32, 64 MLP neurons, 4 query heads on 2
key/value heads). Whether Wanda keeps more held-out accuracy than magnitude at 50%, and how much a recovery
recovers, are learning tests on polm-tiny, not these.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import polm
from polm.engine.errors import PolmError
from polm.engine.pipeline import build_stage
from polm.plugins.efficiency.prune import (
    collect_input_statistics,
    decoder_linears,
    global_masks,
    head_importance,
    heads_to_keep,
    layer_mask,
    magnitude_scores,
    neuron_importance,
    neurons_to_keep,
    shrink_attention,
    shrink_mlp,
    wanda_scores,
)

T, F = True, False


def test_magnitude_removes_the_smallest_weights_of_the_whole_layer():
    """|W| = [[0.5, 3, 2], [1, 4, 0.1]]; 50% of 6 weights is 3: 0.1, 0.5 and 1 go, two of them from row 1."""
    weight = torch.tensor([[0.5, -3.0, 2.0], [-1.0, 4.0, 0.1]])
    keep = layer_mask(magnitude_scores(weight), 0.5, per_row=False)
    assert keep.tolist() == [[F, T, T], [F, T, F]]


def test_wanda_weighs_by_the_input_norms_and_chooses_otherwise_than_magnitude():
    """W = [[4, -1, 3], [2, 5, -0.5]], ||X|| = [0.1, 10, 1]: S = |W| * ||X|| = [[0.4, 10, 3], [0.2, 50, 0.5]].

    At 1/3 Wanda removes one weight per row, the smallest score of each: column 0 twice (the weights 4 and 2,
    on a feature that is nearly silent). Magnitude removes 1/3 of the layer, the two smallest |W|: -1 and -0.5,
    which multiply the loudest features."""
    weight = torch.tensor([[4.0, -1.0, 3.0], [2.0, 5.0, -0.5]])
    norms = torch.tensor([0.1, 10.0, 1.0])
    scores = wanda_scores(weight, norms)
    torch.testing.assert_close(scores, torch.tensor([[0.4, 10.0, 3.0], [0.2, 50.0, 0.5]]))

    assert layer_mask(scores, 1 / 3, per_row=True).tolist() == [[F, T, T], [F, T, T]]
    assert layer_mask(magnitude_scores(weight), 1 / 3, per_row=False).tolist() == [[T, F, T], [T, T, F]]
    # At 50% each row still loses floor(1.5) = 1; compared over the layer, row 1 would lose 0.2 and 0.5.
    assert layer_mask(scores, 0.5, per_row=True).tolist() == [[F, T, T], [F, T, T]]
    assert layer_mask(scores, 0.5, per_row=False).tolist() == [[F, T, T], [F, T, F]]


def test_global_sparsity_takes_more_from_the_layer_of_smaller_scores():
    """A = [[1, 2], [3, 4]], B = [[0.5, 5], [6, 7]]. Per layer, 50% takes two from each: {1, 2} and {0.5, 5}.
    Globally, 50% of 8 is the four smallest of all: 0.5, 1, 2, 3, so A keeps one weight and B three."""
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.5, 5.0], [6.0, 7.0]])
    assert [layer_mask(s, 0.5, per_row=False).tolist() for s in (a, b)] == [[[F, F], [T, T]], [[F, F], [T, T]]]
    assert [keep.tolist() for keep in global_masks([a, b], 0.5)] == [[[F, F], [F, T]], [[F, T], [T, T]]]
    # Ties at the threshold: exactly floor(0.5 * 6) = 3 go, the first ones in layer order.
    ties = global_masks([torch.ones(2, 2), torch.ones(1, 2)], 0.5)
    assert [keep.tolist() for keep in ties] == [[[F, F], [F, T]], [[T, T]]]


def test_structure_importance_is_the_energy_of_its_part_of_the_output():
    """Neuron j of down_proj adds the outer product x_j w_j^T; head h of o_proj adds X_h W_h^T. Their squared
    Frobenius norms over the tokens are the importances, computed from the summed squares and Gram blocks."""
    torch.manual_seed(0)
    x = torch.randn(7, 6)  # (tokens, 3 heads x head_dim 2, or 6 neurons)
    w = torch.randn(5, 6)  # (hidden, in)
    energy = [(x[:, [j]] @ w[:, [j]].T).pow(2).sum() for j in range(6)]
    torch.testing.assert_close(neuron_importance(w, x.pow(2).sum(0)), torch.stack(energy))

    xh = x.reshape(7, 3, 2)
    grams = torch.einsum("nhc,nhd->hcd", xh, xh)
    energy = [(x[:, 2 * h:2 * h + 2] @ w[:, 2 * h:2 * h + 2].T).pow(2).sum() for h in range(3)]
    torch.testing.assert_close(head_importance(w, grams), torch.stack(energy))


def test_each_key_value_group_loses_the_same_number_of_its_least_important_query_heads():
    """4 query heads on 2 key/value heads: heads 0, 1 read KV head 0 and heads 2, 3 KV head 1. Importances
    [3, 1, 0.5, 2], two heads removed: the least important of each group goes, heads 1 and 2. With
    [3, 1, 0.4, 0.5] the two least important overall are both of group 1, yet again heads 1 and 2 go, one from
    each group. Without GQA (4 key/value heads) they are the layer's two least important, 2 and 3."""
    assert heads_to_keep(torch.tensor([3.0, 1.0, 0.5, 2.0]), 2, 2).tolist() == [0, 3]
    assert heads_to_keep(torch.tensor([3.0, 1.0, 0.4, 0.5]), 2, 2).tolist() == [0, 3]
    assert heads_to_keep(torch.tensor([3.0, 1.0, 0.4, 0.5]), 4, 2).tolist() == [0, 1]
    assert neurons_to_keep(torch.tensor([2.0, 0.1, 5.0, 0.3, 1.0]), 2).tolist() == [0, 2, 4]


def test_calibration_sums_over_real_tokens_only(random_model):
    """Two rows padded into one batch give the sums of each row alone: padding is left out."""
    torch.manual_seed(0)
    short, long = torch.randint(3, 50, (1, 3)), torch.randint(3, 50, (1, 5))
    padded = {"input_ids": torch.cat([torch.cat([short, torch.zeros(1, 2, dtype=torch.long)], 1), long]),
              "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    alone = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in (short, long)]
    o_proj = {"o": random_model.model.layers[1].self_attn.o_proj, "down": random_model.model.layers[0].mlp.down_proj}

    together = collect_input_statistics(random_model, o_proj, [padded], {"o": 8})
    apart = collect_input_statistics(random_model, o_proj, alone, {"o": 8})

    assert together.tokens == apart.tokens == 8
    for name in o_proj:
        torch.testing.assert_close(together.squares[name], apart.squares[name])
    torch.testing.assert_close(together.grams["o"], apart.grams["o"])
    assert together.grams["o"].shape == (4, 8, 8)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_removing_mlp_neurons_computes_what_zeroing_their_down_proj_columns_computes(random_model):
    torch.manual_seed(1)
    ids = torch.randint(3, 50, (2, 6))
    keep = torch.tensor(sorted(torch.randperm(64)[:48].tolist()))
    zeroed = copy.deepcopy(random_model)
    removed = torch.ones(64, dtype=torch.bool)
    removed[keep] = False
    for layer in zeroed.model.layers:
        layer.mlp.down_proj.weight.data[:, removed] = 0
    for layer in random_model.model.layers:
        shrink_mlp(layer.mlp, keep)

    assert random_model.model.layers[0].mlp.gate_proj.weight.shape == (48, 32)
    assert random_model.model.layers[0].mlp.down_proj.weight.shape == (32, 48)
    torch.testing.assert_close(_logits(random_model, ids), _logits(zeroed, ids))


def test_removing_query_heads_with_gqa_computes_what_zeroing_their_o_proj_columns_computes(random_model):
    """Heads 0 (KV group 0) and 3 (KV group 1) go; 1 and 2 stay, one on each KV head, which stay whole."""
    torch.manual_seed(2)
    ids = torch.randint(3, 50, (2, 6))
    zeroed = copy.deepcopy(random_model)
    for layer in zeroed.model.layers:
        layer.self_attn.o_proj.weight.data[:, [*range(8), *range(24, 32)]] = 0
    for layer in random_model.model.layers:
        shrink_attention(layer.self_attn, torch.tensor([1, 2]), head_dim=8, kv_heads=2)

    attention = random_model.model.layers[0].self_attn
    assert (attention.q_proj.weight.shape, attention.k_proj.weight.shape, attention.o_proj.weight.shape) == (
        (16, 32), (16, 32), (32, 16))
    assert attention.num_key_value_groups == 1
    torch.testing.assert_close(_logits(random_model, ids), _logits(zeroed, ids))


def test_removing_whole_heads_without_gqa_computes_what_zeroing_their_o_proj_columns_computes(random_model):
    """Multi-head attention (4 key/value heads): heads 0 and 3 go with their key and value rows."""
    config = copy.deepcopy(random_model.config)
    config.num_key_value_heads = 4
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(3, 50, (2, 6))
    zeroed = copy.deepcopy(model)
    for layer in zeroed.model.layers:
        layer.self_attn.o_proj.weight.data[:, [*range(8), *range(24, 32)]] = 0
    for layer in model.model.layers:
        shrink_attention(layer.self_attn, torch.tensor([1, 2]), head_dim=8, kv_heads=4)

    attention = model.model.layers[0].self_attn
    assert (attention.q_proj.weight.shape, attention.k_proj.weight.shape, attention.v_proj.weight.shape,
            attention.o_proj.weight.shape) == ((16, 32), (16, 32), (16, 32), (32, 16))
    torch.testing.assert_close(_logits(model, ids), _logits(zeroed, ids))


def test_a_multi_head_model_saves_fewer_key_value_heads_too(random_model, tokenizer, arithmetic, tmp_path):
    """Without GQA, half the heads of each layer go with their keys and values: the config says 2 heads on 2
    key/value heads, and the saved model computes what the pruned one (the pipeline's model, pruned in place)
    does."""
    config = copy.deepcopy(random_model.config)
    config.num_key_value_heads = 4
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    result = polm.Pipeline(model, tokenizer=tokenizer).add(
        "prune", data=arithmetic[0], eval_size=0, heads_fraction=0.5, calibration_rows=8).run(tmp_path / "run")

    saved = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert (saved.config.num_attention_heads, saved.config.num_key_value_heads, saved.config.head_dim) == (2, 2, 8)
    assert saved.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)
    ids = torch.randint(3, 50, (2, 7))
    torch.testing.assert_close(_logits(saved, ids), _logits(model, ids))


def _safetensors_bytes(folder):
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def test_a_structured_prune_saves_a_smaller_model_that_plain_transformers_loads(model_dir, tokenizer, arithmetic,
                                                                                tmp_path):
    """25% of the MLP neurons and half the query heads: config 48 neurons, 2 heads on 2 KV heads of head_dim
    8 (16 attention features on hidden 32), smaller files, and the logits of the same prune done in memory
    (pruning is deterministic: a resumed recovery relies on it)."""
    rows, test_rows = arithmetic
    options = {"data": rows, "eval_data": test_rows, "eval_size": 4, "max_new_tokens": 4, "mlp_fraction": 0.25,
               "heads_fraction": 0.5, "calibration_rows": 16}
    result = polm.Pipeline(str(model_dir)).add("prune", **options).run(tmp_path / "run")

    saved = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    config = saved.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        48, 2, 2, 8)
    assert _safetensors_bytes(result.checkpoint) < _safetensors_bytes(model_dir)
    metrics = result.stages[0].metrics
    assert metrics["parameters"] == sum(p.numel() for p in saved.parameters()) < metrics["parameters_before"]
    assert (metrics["intermediate_size"], metrics["num_attention_heads"], metrics["sparsity"]) == (48, 2, 0)
    assert "eval/exact_match" in metrics

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    stage = build_stage("prune", options)
    stage.prune(model, tokenizer, seed=0)  # stage 0 of a pipeline of seed 0
    ids = torch.randint(3, 50, (2, 7))
    torch.testing.assert_close(_logits(saved, ids), _logits(model, ids))


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_recovery_keeps_the_unstructured_zeros_exactly(method, random_model, tokenizer, arithmetic, tmp_path):
    """50% of every decoder Linear (wanda: of every row), three recovery steps at a large learning rate: the
    zeros are those pruning made, exactly, and the weights around them have moved."""
    rows, _ = arithmetic
    options = {"data": rows, "eval_size": 0, "method": method, "sparsity": 0.5, "calibration_rows": 16}
    pruned = copy.deepcopy(random_model)
    build_stage("prune", options).prune(pruned, tokenizer, seed=0)
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "prune", **options, max_steps=3, lr=1e-2, batch_size=8).run(tmp_path / "run")

    saved = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert result.stages[0].metrics["sparsity"] == 0.5
    for name, linear in decoder_linears(saved).items():
        before = pruned.get_submodule(name).weight
        assert torch.equal(linear.weight == 0, before == 0), name
        assert (linear.weight == 0).float().mean() == 0.5
        if method == "wanda":
            assert ((linear.weight == 0).sum(1) == linear.weight.shape[1] // 2).all()  # half of every row
        assert not torch.equal(linear.weight, before)


def _stop_at_first_step_of(stage_name: str, stop: threading.Event):
    def on_log(record):
        if record["stage"] == stage_name and record.get("step") == 1:
            stop.set()
    return on_log


def test_an_interrupted_recovery_resumes_on_the_pruned_shapes_and_zeros(model_dir, arithmetic, tmp_path):
    rows, _ = arithmetic

    def pipeline():
        return polm.Pipeline(str(model_dir)).add(
            "prune", data=rows, eval_size=0, mlp_fraction=0.25, sparsity=0.5, method="magnitude", max_steps=3,
            lr=1e-2, log_every=1, calibration_rows=16, lr_scheduler="constant")

    stop = threading.Event()
    first = pipeline().run(tmp_path / "run", on_log=_stop_at_first_step_of("prune", stop), stop=stop)
    assert first.interrupted
    assert (tmp_path / "run/00-prune/checkpoint-000001").is_dir()

    result = pipeline().run(tmp_path / "run", resume=True)
    saved = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert saved.config.intermediate_size == 48
    assert result.stages[0].metrics["sparsity"] == 0.5


def test_a_stage_after_a_finished_prune_resumes_on_the_saved_pruned_model(model_dir, arithmetic, tmp_path):
    """prune -> sft, sft stopped after its first step: on resume the finished prune is read from its final/
    (load_finished), whose shapes the sft checkpoint has; loading it into the unpruned model would fail."""
    rows, _ = arithmetic

    def pipeline():
        return polm.Pipeline(str(model_dir)).add(
            "prune", data=rows, eval_size=0, mlp_fraction=0.25, heads_fraction=0.5, calibration_rows=16).add(
            "sft", data=rows, eval_size=0, max_steps=2, log_every=1, lr_scheduler="constant")

    stop = threading.Event()
    assert pipeline().run(tmp_path / "run", on_log=_stop_at_first_step_of("sft", stop), stop=stop).interrupted

    result = pipeline().run(tmp_path / "run", resume=True)
    saved = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert (saved.config.intermediate_size, saved.config.num_attention_heads) == (48, 2)


@pytest.mark.parametrize(("options", "message"), [
    ({"sparsity": 0.5, "method": "sparsegpt"}, "'method' must be one of magnitude, wanda, got 'sparsegpt'"),
    ({"sparsity": 1.0}, r"'sparsity' must be in \[0, 1\), got 1.0"),
    ({"sparsity": 0.5, "scope": "row"}, "'scope' must be one of layer, global"),
    ({"mlp_fraction": -0.1}, r"'mlp_fraction' must be in \[0, 1\)"),
    ({}, "nothing to prune: set 'sparsity'"),
    ({"sparsity": 0.5, "tuning": "lora"}, "option 'tuning': prune's recovery trains the pruned weights"),
    ({"sparsity": 0.5, "calibration_rows": 0}, "'calibration_rows' must be at least 1"),
])
def test_bad_options_are_refused_when_the_stage_is_added(options, message, arithmetic):
    with pytest.raises(PolmError, match=message):
        polm.Pipeline("polm-tiny").add("prune", data=arithmetic[0], **options)


@pytest.mark.parametrize(("options", "message"), [
    ({"mlp_fraction": 0.005}, "option 'mlp_fraction': 0.005 of the 64 MLP neurons of each layer removes 0"),
    ({"mlp_fraction": 0.999}, "option 'mlp_fraction': 0.999 of the 64 MLP neurons of each layer removes 64"),
    ({"heads_fraction": 0.25}, ("option 'heads_fraction': 0.25 of the 2 query heads of each of the 2 key/value "
                                "groups removes 0 of them")),
    ({"heads_fraction": 0.9}, "must leave one head per group"),
])
def test_fractions_that_remove_none_or_all_are_refused_before_anything_is_written(options, message, random_model,
                                                                                  tokenizer, arithmetic, tmp_path):
    pipeline = polm.Pipeline(random_model, tokenizer=tokenizer).add("prune", data=arithmetic[0], **options)
    with pytest.raises(PolmError, match=message):
        pipeline.run(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_architecture_without_the_projections_is_refused_naming_the_module(random_model, tokenizer, arithmetic,
                                                                             tmp_path):
    random_model.model.layers[1].mlp = torch.nn.Identity()
    pipeline = polm.Pipeline(random_model, tokenizer=tokenizer).add("prune", data=arithmetic[0], mlp_fraction=0.25)
    with pytest.raises(PolmError, match="option 'mlp_fraction': decoder layer 1 of LlamaForCausalLM has no Linear "
                                        "mlp.gate_proj"):
        pipeline.run(tmp_path / "run")
    assert not (tmp_path / "run").exists()

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64))
    pipeline = polm.Pipeline(gpt2, tokenizer=tokenizer).add("prune", data=arithmetic[0], sparsity=0.5)
    with pytest.raises(PolmError, match="option 'sparsity': GPT2LMHeadModel has no model.layers"):
        pipeline.run(tmp_path / "run")
    assert not (tmp_path / "run").exists()
