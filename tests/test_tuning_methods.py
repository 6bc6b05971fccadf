"""Tuning methods: each trains exactly the parameters it should, and its errors say what to do.

The tiny Llama of ``random_model``: hidden size 32, 2 layers, 4 query heads and 2 key/value heads
of width 8 (so k_proj and v_proj give 16 features), MLP width 64, a vocabulary of 282 tied to the
output head; 27,616 parameters. The expected trainable counts below are worked out from these sizes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import polm
from polm.engine.models import count_parameters
from polm.engine.plugins import registry
from polm.plugins.finetuning.tuning import LORA_TARGETS, default_lora_targets

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_PARAMETERS = 27_616


def method(name: str) -> Any:
    return registry("tuning_methods").get(name)


@pytest.fixture
def prepared_models(monkeypatch) -> Callable[[str], list[torch.nn.Module]]:
    """``capture(name)`` returns a list that receives every model method ``name`` prepares in a run.

    The pipeline trains that very object, so after the run it is the trained model.
    """

    def capture(name: str) -> list[torch.nn.Module]:
        tuning = method(name)
        models: list[torch.nn.Module] = []
        original = tuning.prepare

        def prepare(model, options):
            models.append(original(model, options))
            return models[-1]

        monkeypatch.setattr(tuning, "prepare", prepare)
        return models

    return capture


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their original names (peft renames a wrapped ``w`` to ``base_layer.w``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name.replace(".base_layer", ""): tensor for name, tensor in base.state_dict().items()}


def logged_losses(stage_dir) -> list[float]:
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


@dataclass
class Case:
    """One row of the table: a method, its options, and what it must train."""

    name: str
    options: dict[str, Any]
    trainable: int  # parameters with requires_grad, worked out in the comment of each row
    base_trains: Callable[[str], bool] = lambda name: False  # which base tensors may change
    lr: float = 3e-2
    extra: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("full", {}, BASE_PARAMETERS, base_trains=lambda name: True, lr=3e-3),
    # One layer: q, o 32x32; k, v 32x16; gate, up, down 32x64; two norms of 32.
    Case("freeze", {"last_layers": 1}, 2 * 1024 + 2 * 512 + 3 * 2048 + 2 * 32,
         base_trains=lambda name: ".layers.1." in name, lr=3e-3),
    # Both o_proj (32x32) and the final norm (32).
    Case("freeze", {"trainable": ["o_proj", "model.norm"]}, 2 * 1024 + 32,
         base_trains=lambda name: "o_proj" in name or name.startswith("model.norm"), lr=3e-3),
    # r (in + out) per projection: q, o 8x64; k, v 8x48; gate, up, down 8x96; two layers.
    Case("lora", {}, 2 * (2 * 512 + 2 * 384 + 3 * 768), lr=1e-2),
    # LoRA plus a magnitude per output feature: 32 + 16 + 16 + 32 + 64 + 64 + 32 per layer.
    Case("dora", {}, 2 * (2 * 512 + 2 * 384 + 3 * 768) + 2 * 256, lr=1e-2),
    # peft's Llama choice: k_proj and v_proj outputs (16 each) and down_proj's input (64).
    Case("ia3", {}, 2 * (16 + 16 + 64), lr=0.1),
    # 4 positions x 2 layers x (key + value) x 16 key/value features.
    Case("prefix", {"num_virtual_tokens": 4}, 4 * 2 * 2 * 16, lr=0.1),
    # 4 embeddings of 32.
    Case("prompt", {"num_virtual_tokens": 4}, 4 * 32, lr=0.1),
    # Rank 4 per projection: A (4 x in), B (out x 4), E (4); q, o 260; k, v 196; gate, up, down 388.
    Case("adalora", {"init_r": 4, "target_r": 2}, 2 * (2 * 260 + 2 * 196 + 3 * 388), lr=3e-2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.name}-{'-'.join(map(str, case.options)) or 'default'}")
def test_method_trains_only_its_parameters_and_lowers_the_loss(case, random_model, tokenizer, arithmetic, tmp_path,
                                                                prepared_models):
    """Eight sft steps on one batch: the trainable count is the one worked out above, the base
    tensors the method leaves alone are bit-identical afterwards, the others changed, and the loss fell."""
    rows, _ = arithmetic
    start = copy.deepcopy(random_model).state_dict()
    models = prepared_models(case.name)
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "sft", data=rows[:8], max_steps=8, batch_size=8, lr=case.lr, log_every=1, eval_size=0,
        tuning=case.name, tuning_options=case.options,
    ).run(tmp_path / "run")

    (trained,) = models
    trainable, total = count_parameters(trained)
    assert trainable == case.trainable, f"{case.name}: {trainable} of {total} parameters trainable"

    after = base_weights(trained)
    assert after.keys() >= start.keys()
    changed = {name for name in start if not torch.equal(start[name], after[name])}
    expected = {name for name in start if case.base_trains(name)}
    assert changed == expected, f"changed but should not: {sorted(changed - expected)[:3]}; " \
                                f"unchanged but should: {sorted(expected - changed)[:3]}"

    losses = logged_losses(tmp_path / "run" / "00-sft")
    assert len(losses) == 8 and losses[-1] < losses[0], f"{case.name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"

    if case.name == "adalora":  # total_step defaults to the stage's steps
        saved = json.loads((result.checkpoint / "adapter_config.json").read_text())
        assert saved["total_step"] == 8 and saved["rank_pattern"]


@pytest.fixture(scope="module")
def wide_model():
    """A 2-layer Llama of realistic width (hidden 512, MLP 1376): 6.5M parameters, all but 144k in the layers."""
    config = LlamaConfig(vocab_size=282, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(("name", "at_most"), [
    ("lora", 0.05), ("dora", 0.05), ("adalora", 0.05), ("ia3", 0.001), ("prefix", 0.01), ("prompt", 0.005),
])
def test_adapters_train_a_small_fraction_of_a_realistic_model(name, at_most, wide_model):
    """With default options: LoRA-style methods under 5%, (IA)³ under 0.1%, virtual tokens under 1%."""
    model = method(name).prepare(copy.deepcopy(wide_model), method(name).Options())
    trainable, total = count_parameters(model)
    assert 0 < trainable / total < at_most, f"{name}: {trainable} / {total} = {trainable / total:.4%}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_qlora_without_a_gpu_fails_when_the_stage_is_added(random_model, tokenizer):
    """Before anything loads: one line that says CUDA is missing and to use lora."""
    with pytest.raises(polm.PolmError) as caught:
        polm.Pipeline(random_model, tokenizer=tokenizer).add("sft", data=[{"text": "x"}], tuning="qlora")
    message = str(caught.value)
    assert "CUDA" in message and "'lora'" in message and "\n" not in message, message


def test_qlora_without_bitsandbytes_says_so(monkeypatch, random_model, tokenizer):
    """On a GPU machine without bitsandbytes the message names the package, and lora again."""
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "bitsandbytes" else real_find_spec(name, *args))
    with pytest.raises(polm.PolmError, match="bitsandbytes.*'lora'"):
        polm.Pipeline(random_model, tokenizer=tokenizer).add("sft", data=[{"text": "x"}], tuning="qlora")


def tuning_error(tuning: str, **options: Any) -> str:
    with pytest.raises(polm.PolmError) as caught:
        polm.Pipeline().add("sft", data=[{"text": "x"}], tuning=tuning, tuning_options=options)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_option_errors_name_the_method_and_the_fix():
    """A misspelled option gets the right name; impossible values are refused with the reason."""
    assert "Did you mean 'r'?" in tuning_error("lora", rank=8)
    assert "Did you mean 'init_r'?" in tuning_error("adalora", r=8)
    assert "'r' must be positive, got 0" in tuning_error("lora", r=0)
    assert "tuning 'dora'" in tuning_error("dora", dropout=1.5)
    assert "set 'trainable'" in tuning_error("freeze")
    assert "no steps of 'total_step'" in tuning_error("adalora", total_step=10, tinit=6, tfinal=4)
    assert "'target_r' (16) must not exceed 'init_r' (12)" in tuning_error("adalora", target_r=16)


def test_freeze_pattern_that_matches_nothing_lists_module_names(random_model, tokenizer, tmp_path):
    """'attention' is not a module of a Llama; the error shows what is, layer numbers as '*'."""
    pipeline = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "sft", data=[{"text": "1 + 2 = 3"}], max_steps=1, eval_size=0, tuning="freeze",
        tuning_options={"trainable": ["attention"]})
    with pytest.raises(polm.PolmError) as caught:
        pipeline.run(tmp_path / "run")
    message = str(caught.value)
    assert "'attention'" in message and "model.layers.*.self_attn" in message, message


def test_target_module_that_matches_nothing_lists_the_linear_layers(random_model):
    """A LoRA target the model lacks fails before peft wraps anything, with the closest name."""
    options = method("lora").Options(target_modules=["q_projection"])
    with pytest.raises(polm.PolmError) as caught:
        method("lora").prepare(random_model, options)
    message = str(caught.value)
    assert "Did you mean 'q_proj'?" in message and ", ".join(PROJECTIONS + ["lm_head"]) in message, message


def test_default_targets_follow_the_architecture(random_model):
    """Llama: every projection; GPT-2: its Conv1D layers; anything else: peft's 'all-linear' (lora and ia3)."""
    assert default_lora_targets(random_model) == PROJECTIONS
    assert {"llama", "qwen2", "mistral", "gpt2"} <= LORA_TARGETS.keys()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    assert default_lora_targets(gpt2) == ["c_attn", "c_proj", "c_fc"]
    wrapped = method("lora").prepare(gpt2, method("lora").Options())
    adapted = {path.split(".")[-1] for path, module in wrapped.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"c_attn", "c_proj", "c_fc"}
    random_model.config.model_type = "some_new_arch"
    assert default_lora_targets(random_model) == "all-linear"
    for name, marker in (("lora", "lora_A"), ("ia3", "ia3_l")):  # every linear layer but the output head
        wrapped = method(name).prepare(copy.deepcopy(random_model), method(name).Options())
        adapted = {path.split(".")[-1] for path, module in wrapped.named_modules() if hasattr(module, marker)}
        assert adapted == set(PROJECTIONS), (name, adapted)


def test_lora_adapter_loads_with_peft_and_gives_the_same_logits(random_model, tokenizer, arithmetic, tmp_path,
                                                              prepared_models):
    """The final folder is a peft adapter: from_pretrained on a copy of the base reproduces polm's model."""
    from peft import PeftModel

    rows, _ = arithmetic
    base = copy.deepcopy(random_model)
    models = prepared_models("lora")
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "sft", data=rows, max_steps=3, batch_size=4, lr=1e-2, eval_size=0, tuning="lora",
        tuning_options={"r": 4, "alpha": 8, "use_rslora": True}).run(tmp_path / "run")
    folder = result.checkpoint
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(base, folder).eval()
    trained = models[0].eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)
        with loaded.disable_adapter():  # and the adapter is not a no-op
            assert not torch.allclose(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_virtual_token_models_generate_what_their_forward_pass_predicts(name, random_model):
    """Greedy generation (left-padded batch, KV cache) equals greedy decoding by full forward passes.

    Larger random weights make the next token depend on the context (the fixture's model repeats the
    last token), so that generating without the virtual tokens, or inserting them twice, shows.
    """
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter_name, parameter in random_model.named_parameters():
            if "norm" not in parameter_name:
                parameter.normal_(0.0, 0.3)
    model = method(name).prepare(random_model, method(name).Options(num_virtual_tokens=3)).eval()
    with torch.no_grad():
        for parameter in model.prompt_encoder.parameters():
            parameter.normal_(0.0, 1.0)
    prompts = [[5, 6, 7, 8, 9], [3, 4, 5]]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5,
                                   do_sample=False, pad_token_id=0, eos_token_id=[])[:, width:]
        for row, prompt in zip(generated.tolist(), prompts):
            sequence = torch.tensor([prompt])
            for _ in range(5):
                logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits
                assert logits.shape[1] == sequence.shape[1]  # no logits for the virtual tokens
                sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            assert row == sequence[0, len(prompt):].tolist()


def test_prompt_init_text_starts_from_the_text_embeddings(random_model, tokenizer, tmp_path):
    """init_text: the virtual tokens start as the embeddings of the text's tokens, repeated to fill."""
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    options = method("prompt").Options(num_virtual_tokens=6, init_text="12 + 7", tokenizer=str(tmp_path / "tokenizer"))
    model = method("prompt").prepare(random_model, options)
    ids = (tokenizer("12 + 7")["input_ids"] * 6)[:6]
    torch.testing.assert_close(model.prompt_encoder.default.embedding.weight,
                               random_model.get_input_embeddings().weight[ids])


def test_adapters_chain_across_stages(random_model):
    """A second method merges the first one's adapter: same function, a plain model underneath."""
    lora = method("lora").prepare(random_model, method("lora").Options(r=2))
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    lora.eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
        again = method("lora").prepare(lora, method("lora").Options(r=2)).eval()
        torch.testing.assert_close(again(input_ids=ids).logits, expected)
        full = method("full").prepare(again, None)
        assert not hasattr(full, "peft_config") and all(p.requires_grad for p in full.parameters())
        torch.testing.assert_close(full(input_ids=ids).logits, expected)


def test_nothing_can_tune_on_top_of_virtual_tokens(random_model):
    """Virtual tokens cannot be merged into weights, so the next method refuses, saying what to do."""
    prefix = method("prefix").prepare(random_model, method("prefix").Options(num_virtual_tokens=2))
    with pytest.raises(polm.PolmError, match="prefix tuning.*make it the last stage, or train that stage with lora"):
        method("full").prepare(prefix, None)


def test_two_stage_run_lora_then_full(random_model, tokenizer, arithmetic, tmp_path):
    """sft with lora, then sft in full: an adapter folder, then a plain checkpoint that transformers loads."""
    rows, _ = arithmetic
    result = (
        polm.Pipeline(random_model, tokenizer=tokenizer)
        .add("sft", data=rows, max_steps=2, batch_size=4, lr=1e-2, eval_size=0, tuning="lora")
        .add("sft", data=rows, max_steps=2, batch_size=4, lr=1e-3, eval_size=0)
        .run(tmp_path / "run")
    )
    first, second = result.stages
    assert (first.checkpoint / "adapter_model.safetensors").is_file()
    assert (second.checkpoint / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(second.checkpoint)
    assert not any("lora" in name for name in loaded.state_dict())


def test_adalora_checkpoint_reloads_into_a_fresh_adapter(random_model, tokenizer, arithmetic, tmp_path,
                                                         prepared_models):
    """AdaLoRA saves only the ranks it kept; resuming puts them back in a full-rank adapter, same logits."""
    rows, _ = arithmetic
    base = copy.deepcopy(random_model)
    options = {"init_r": 4, "target_r": 1}
    models = prepared_models("adalora")
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "sft", data=rows, max_steps=4, batch_size=4, lr=3e-2, eval_size=0, tuning="adalora",
        tuning_options=options).run(tmp_path / "run")
    saved = json.loads((result.checkpoint / "adapter_config.json").read_text())
    assert any(not all(kept) for kept in saved["rank_pattern"].values())  # some ranks were dropped
    fresh = method("adalora").prepare(base, method("adalora").Options(**options))
    method("adalora").load_weights(fresh, result.checkpoint)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, models[0].eval()(input_ids=ids).logits)


def test_pipeline_refuses_a_stage_after_a_virtual_token_stage(random_model, tokenizer, arithmetic):
    """The problem is caught when the pipeline is built, before the prompt-tuning stage trains."""
    rows, _ = arithmetic
    pipeline = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "sft", data=rows, max_steps=1, tuning="prompt", tuning_options={"num_virtual_tokens": 2})
    with pytest.raises(polm.PolmError, match="stage 1 'sft' cannot follow stage 0 'sft' tuned with 'prompt'"):
        pipeline.add("sft", data=rows, max_steps=1)


def test_merged_adapters_load_with_plain_transformers_and_match_the_adapter_model(random_model, tokenizer,
                                                                                   arithmetic, tmp_path):
    """merge_adapters writes final/merged: a plain transformers model with the adapter model's logits."""
    from peft import PeftModel

    rows, _ = arithmetic
    base = copy.deepcopy(random_model)
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "sft", data=rows, max_steps=3, batch_size=4, lr=1e-2, eval_size=0, tuning="lora", merge_adapters=True,
    ).run(tmp_path / "run")
    final = result.stages[0].checkpoint
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    adapter = PeftModel.from_pretrained(base, final)
    assert not hasattr(merged, "peft_config") and (final / "merged" / "model.safetensors").is_file()
    ids = torch.tensor([tokenizer("What is 12 + 7?")["input_ids"]])
    merged.eval()
    adapter.eval()
    torch.testing.assert_close(merged(input_ids=ids).logits, adapter(input_ids=ids).logits)
