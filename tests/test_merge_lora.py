"""Merging LoRA adapters (``lora`` key): into their base, or into a new adapter by concatenation or SVD.

Notation: a base weight ``W`` (out, in); adapter m's module holds ``A_m`` (r_m, in) and ``B_m`` (out, r_m) and its
update is ``delta_m = s_m B_m A_m`` with ``s_m = alpha_m / r_m`` (rsLoRA: ``alpha_m / sqrt(r_m)``). The fixture's
adapters on one tiny random Llama: ``a`` (r 4, alpha 8: ``s = 2``) and ``b`` (r 2, alpha 4, rsLoRA:
``s = 4 / sqrt 2``), both on ``q_proj`` and ``v_proj``, their B random so that ``delta != 0``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import polm
from polm.engine.cli import main
from polm.plugins.integration.merge import merge_models, read_merge_config
from tests.helpers import save, tiny_llama
from tests.test_merge import one_error_line, tensors, write_config

PREFIX = "base_model.model."
Q = "model.layers.1.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


def make_adapter(base: Path, folder: Path, tokenizer, seed: int, config) -> Path:
    """A peft adapter of ``config`` on the model in ``base``, its factors random (``init_lora_weights=False``)."""
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    get_peft_model(model, config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lora(r: int, alpha: float, targets=("q_proj", "v_proj"), **options) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **options)


@pytest.fixture
def adapters(tokenizer, tmp_path) -> dict[str, Path]:
    """``base`` (a tiny Llama) and the adapters ``a`` and ``b`` on it (see the module docstring)."""
    base = save(tiny_llama(tokenizer, 0), tokenizer, tmp_path / "base")
    return {"base": base,
            "a": make_adapter(base, tmp_path / "a", tokenizer, 1, lora(4, 8)),
            "b": make_adapter(base, tmp_path / "b", tokenizer, 2, lora(2, 4, use_rslora=True))}


def update(folder: Path, module: str, scaling: float) -> torch.Tensor:
    """``s B A`` of ``module`` in the adapter ``folder``, by hand."""
    weights = load_file(folder / "adapter_model.safetensors")
    return scaling * weights[f"{PREFIX}{module}.lora_B.weight"] @ weights[f"{PREFIX}{module}.lora_A.weight"]


SCALING = {"a": 2.0, "b": 4 / math.sqrt(2)}


def logits(model, tokenizer) -> torch.Tensor:
    input_ids = torch.tensor([tokenizer("What is 12 + 7?")["input_ids"]])
    with torch.no_grad():
        return model.eval()(input_ids).logits


def test_into_the_base_task_arithmetic_adds_the_weighted_updates(adapters, tmp_path, tokenizer):
    """``task_arithmetic`` with weights 0.5 and 0.25, into the base (the default): every adapted weight is
    ``W + 0.5 s_a B_a A_a + 0.25 s_b B_b A_b``, every other tensor the base's; a transformers folder that loads
    with plain transformers and polm, whose merge.json records the mode and each adapter as a lora input."""
    config = read_merge_config({"merge_method": "task_arithmetic", "base_model": str(adapters["base"]), "models": [
        {"model": str(adapters["a"]), "parameters": {"weight": 0.5}},
        {"model": str(adapters["b"]), "parameters": {"weight": 0.25}}]})
    output = tmp_path / "merged"

    report = merge_models(config, output)

    base, merged = tensors(adapters["base"]), tensors(output)
    assert set(merged) == set(base)
    adapted = {f"{layer}.self_attn.{name}.weight" for layer in ("model.layers.0", "model.layers.1")
               for name in ("q_proj", "v_proj")}
    for name in base:
        expected = base[name]
        if name in adapted:
            module = name[:-len(".weight")]
            expected = (expected + 0.5 * update(adapters["a"], module, SCALING["a"])
                        + 0.25 * update(adapters["b"], module, SCALING["b"]))
        assert_close(merged[name], expected, msg=name)
    assert not torch.equal(merged[f"{Q}.weight"], base[f"{Q}.weight"])
    record = json.loads((output / "merge.json").read_text())
    assert record["lora"] == {"output": "base"}
    assert [model["kind"] for model in record["models"]] == ["lora", "lora"]
    assert record["base_model"]["model"] == str(adapters["base"])
    assert "LoRA adapters merged into their base" in (output / "README.md").read_text()
    assert_close(logits(AutoModelForCausalLM.from_pretrained(output), tokenizer),
                 logits(polm.load_model(output)[0], tokenizer))
    assert report.base == str(adapters["base"])


PER_MODULE = {"uniform": None, "patterns": lora(4, 8, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})}


@pytest.mark.parametrize("config", PER_MODULE.values(), ids=PER_MODULE.keys())
def test_one_adapter_at_weight_1_is_peft_merge_and_unload(config, adapters, tokenizer, tmp_path):
    """``linear`` of one adapter at weight 1, no ``base_model`` (the adapter names its base): the state dict of
    peft's own ``merge_and_unload``, also for per-module ranks and alphas (``rank_pattern``: q_proj has r 2,
    ``alpha_pattern``: v_proj has alpha 3)."""
    adapter = adapters["a"] if config is None else make_adapter(adapters["base"], tmp_path / "c", tokenizer, 3, config)
    path = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {adapter}\n")
    output = tmp_path / "merged"

    assert main(["merge", str(path), "--output", str(output)]) == 0

    base = AutoModelForCausalLM.from_pretrained(adapters["base"])
    expected = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    ranks = {load_file(adapter / "adapter_model.safetensors")[f"{PREFIX}{module}.lora_A.weight"].shape[0]
             for module in (Q, V)}
    assert ranks == ({4} if config is None else {2, 4})
    merged = tensors(output)
    for name, tensor in merged.items():
        assert_close(tensor, expected[name], msg=name)


def test_concat_adapter_gives_the_logits_of_the_merge_into_the_base(adapters, tmp_path, tokenizer):
    """``combine: concat`` of ``task_arithmetic`` (weights 0.5, 0.25): ``B' = [0.5 s_a B_a, 0.25 s_b B_b]``,
    ``A' = [A_a; A_b]``, rank 4 + 2 = 6 and scale 1, so ``B' A'`` is the merged update exactly: the adapter,
    loaded with plain peft or polm, gives the logits of the merge into the base."""
    models = f"  - model: {adapters['a']}\n    parameters: {{weight: 0.5}}\n" \
             f"  - model: {adapters['b']}\n    parameters: {{weight: 0.25}}\n"
    head = f"merge_method: task_arithmetic\nbase_model: {adapters['base']}\nmodels:\n{models}"
    assert main(["merge", str(write_config(tmp_path, head)), "--output", str(tmp_path / "full")]) == 0
    concat = write_config(tmp_path, head + "lora: {output: adapter, combine: concat}\n")
    output = tmp_path / "adapter"

    assert main(["merge", str(concat), "--output", str(output)]) == 0

    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["use_rslora"]) == (6, 6, False)
    assert adapter_config["base_model_name_or_path"] == str(adapters["base"].resolve())
    weights = load_file(output / "adapter_model.safetensors")
    assert weights[f"{PREFIX}{Q}.lora_A.weight"].shape == (6, 32)
    expected = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "full"), tokenizer)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapters["base"]), output)
    assert_close(logits(peft_model, tokenizer), expected)
    loaded, _ = polm.load_model(output)
    assert_close(logits(loaded, tokenizer), expected)
    record = json.loads((output / "merge.json").read_text())
    assert record["lora"] == {"output": "adapter", "combine": "concat", "rank": 6}
    assert "library_name: peft" in (output / "README.md").read_text()


def test_svd_adapter_is_exact_at_full_rank_and_drops_the_tail_singular_values_below(adapters, tmp_path):
    """``linear`` (normalized weights 1, 1: ``delta = (delta_a + delta_b) / 2``, of rank at most 4 + 2 = 6) as an
    adapter by SVD: at rank 6 ``B' A'`` is ``delta``; at rank 2 it is the best rank-2 approximation, so
    ``||delta - B' A'||_F^2 = sum_{i > 2} sigma_i^2`` (Eckart-Young). The new adapter's scale is 1 (alpha = r);
    the default rank is the largest of the adapters', 4."""
    head = f"merge_method: linear\nmodels:\n  - model: {adapters['a']}\n  - model: {adapters['b']}\n"
    results = {}
    for rank in (6, 2, None):
        output = tmp_path / f"rank-{rank}"
        option = f", rank: {rank}" if rank else ""
        path = write_config(tmp_path, head + f"lora: {{output: adapter{option}}}\n")
        assert main(["merge", str(path), "--output", str(output)]) == 0
        results[rank] = output

    for module in (Q, V):
        delta = (update(adapters["a"], module, SCALING["a"]) + update(adapters["b"], module, SCALING["b"])) / 2
        sigma = torch.linalg.svdvals(delta)
        exact = update(results[6], module, 1.0)
        assert_close(exact, delta, atol=1e-5, rtol=1e-4, msg=module)
        low = update(results[2], module, 1.0)
        assert (delta - low).pow(2).sum().item() == pytest.approx(sigma[2:].pow(2).sum().item(), rel=1e-3)
    configs = {rank: json.loads((folder / "adapter_config.json").read_text()) for rank, folder in results.items()}
    assert [(configs[rank]["r"], configs[rank]["lora_alpha"]) for rank in (6, 2, None)] == [(6, 6), (2, 2), (4, 4)]
    assert json.loads((results[None] / "merge.json").read_text())["lora"] == {"output": "adapter",
                                                                             "combine": "svd", "rank": 4}


def test_ties_merges_adapters_into_the_base_and_as_an_svd_adapter(adapters, tmp_path):
    """``ties`` (density 0.5) works on the updates either way: into the base, ``W + ties(delta)``; as an adapter
    at a rank that keeps every singular value (32), ``B' A'`` is the same ``ties(delta)``."""
    head = (f"merge_method: ties\nbase_model: {adapters['base']}\nmodels:\n"
            f"  - {{model: {adapters['a']}, parameters: {{weight: 1.0, density: 0.5}}}}\n"
            f"  - {{model: {adapters['b']}, parameters: {{weight: 0.5, density: 0.5}}}}\n")
    assert main(["merge", str(write_config(tmp_path, head)), "--output", str(tmp_path / "full")]) == 0
    path = write_config(tmp_path, head + "lora: {output: adapter, combine: svd, rank: 32}\n")
    assert main(["merge", str(path), "--output", str(tmp_path / "adapter")]) == 0

    base, full = tensors(adapters["base"]), tensors(tmp_path / "full")
    for module in (Q, V):
        merged = full[f"{module}.weight"] - base[f"{module}.weight"]
        assert_close(update(tmp_path / "adapter", module, 1.0), merged, atol=1e-5, rtol=1e-4, msg=module)
    linear_ish = update(adapters["a"], Q, SCALING["a"]) + 0.5 * update(adapters["b"], Q, SCALING["b"])
    assert not torch.allclose(full[f"{Q}.weight"] - base[f"{Q}.weight"], linear_ish)  # trimmed and elected


def test_concat_is_refused_for_a_method_not_linear_in_the_updates(adapters, tmp_path, capsys):
    """``ties`` with ``combine: concat``: one line at the key saying to use svd, exit 2, nothing written."""
    path = write_config(tmp_path, f"merge_method: ties\nbase_model: {adapters['base']}\nmodels:\n"
                                  f"  - {{model: {adapters['a']}, parameters: {{density: 0.5}}}}\n"
                                  "lora: {output: adapter, combine: concat}\n")
    output = tmp_path / "merged"

    assert main(["merge", str(path), "--output", str(output)]) == 2

    line = one_error_line(capsys)
    assert line.startswith(f"polm: error: {path}:5: lora.combine: concat is exact only for linear and "
                           "task_arithmetic")
    assert "use combine: svd" in line
    assert not output.exists() and not list(tmp_path.glob(".merged*"))


def other_base(adapters, tokenizer, tmp_path) -> tuple[Path, str]:
    """An adapter trained on another base (other weights, another folder)."""
    elsewhere = save(tiny_llama(tokenizer, 5), tokenizer, tmp_path / "elsewhere")
    return (make_adapter(elsewhere, tmp_path / "odd", tokenizer, 3, lora(4, 8)),
            (f"adapter '{tmp_path / 'odd'}': base_model_name_or_path is '{elsewhere}', and '{adapters['a']}' was "
             f"trained on '{adapters['base']}'"))


def other_targets(adapters, tokenizer, tmp_path) -> tuple[Path, str]:
    return (make_adapter(adapters["base"], tmp_path / "odd", tokenizer, 3, lora(4, 8, targets=("q_proj", "k_proj"))),
            "target_modules differ from")


def full_model(adapters, tokenizer, tmp_path) -> tuple[Path, str]:
    return (save(tiny_llama(tokenizer, 3), tokenizer, tmp_path / "odd"),
            (f"cannot merge '{adapters['a']}' and '{tmp_path / 'odd'}': one is a LoRA adapter and the other a "
             "transformers model"))


def ia3(adapters, tokenizer, tmp_path) -> tuple[Path, str]:
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    return (make_adapter(adapters["base"], tmp_path / "odd", tokenizer, 3, config),
            f"adapter '{tmp_path / 'odd'}': peft_type is IA3; polm merges LoRA adapters")


def dora(adapters, tokenizer, tmp_path) -> tuple[Path, str]:
    return (make_adapter(adapters["base"], tmp_path / "odd", tokenizer, 3, lora(4, 8, use_dora=True)),
            f"adapter '{tmp_path / 'odd'}': use_dora is set in adapter_config.json; merging DoRA is not supported")


def no_base(adapters, tokenizer, tmp_path) -> tuple[Path, str]:
    folder = make_adapter(adapters["base"], tmp_path / "odd", tokenizer, 3, lora(4, 8))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    return folder, f"adapter '{folder}': adapter_config.json has no base_model_name_or_path; set base_model"


MISMATCHES = {"base": other_base, "target-modules": other_targets, "full-model": full_model, "ia3": ia3,
              "dora": dora, "missing-base": no_base}


@pytest.mark.parametrize("make", MISMATCHES.values(), ids=MISMATCHES.keys())
def test_adapters_that_cannot_merge_are_one_line_exit_2_and_nothing_written(make, adapters, tokenizer, tmp_path,
                                                                          capsys):
    """An adapter of another base, of other target modules (for a new adapter), a full model among adapters, an
    IA3 or DoRA adapter, an adapter naming no base (alone, so that no other adapter names it) without
    ``base_model``: refused before writing, naming the adapter and the field."""
    odd, expected = make(adapters, tokenizer, tmp_path)
    capsys.readouterr()
    models = [odd] if make is no_base else [adapters["a"], odd]
    path = write_config(tmp_path, "merge_method: linear\nmodels:\n" + "".join(f"  - model: {m}\n" for m in models)
                        + "lora: {output: adapter}\n")
    output = tmp_path / "merged"

    assert main(["merge", str(path), "--output", str(output)]) == 2

    assert expected in one_error_line(capsys)
    assert not output.exists() and not list(tmp_path.glob(".merged*"))


def test_other_target_modules_merge_into_the_base_as_zero_updates(adapters, tokenizer, tmp_path):
    """Into the base, an adapter that leaves a module out adds nothing to it: ``linear`` (unnormalized, weight 1
    each) of ``a`` (q, v) and ``c`` (q, k) onto one base ``W`` gives ``k_proj: 2 W + delta_c`` and
    ``v_proj: 2 W + delta_a``."""
    c = make_adapter(adapters["base"], tmp_path / "c", tokenizer, 3, lora(4, 8, targets=("q_proj", "k_proj")))
    config = read_merge_config({"merge_method": "linear", "parameters": {"normalize": False},
                                "models": [{"model": str(adapters["a"])}, {"model": str(c)}]})
    merge_models(config, tmp_path / "merged")

    base, merged = tensors(adapters["base"]), tensors(tmp_path / "merged")
    k = "model.layers.0.self_attn.k_proj"
    assert_close(merged[f"{k}.weight"], 2 * base[f"{k}.weight"] + update(c, k, 2.0))
    assert_close(merged[f"{V}.weight"], 2 * base[f"{V}.weight"] + update(adapters["a"], V, SCALING["a"]))


LORA_MISTAKES = {
    "combine-into-base": ("lora: {combine: svd}\n", "lora: 'combine' applies to output: adapter"),
    "rank-with-concat": ("lora: {output: adapter, combine: concat, rank: 4}\n", "lora: 'rank' applies to combine: svd"),
    "unknown-output": ("lora: {output: adaptor}\n", "lora: 'output' must be one of base, adapter, got 'adaptor'"),
    "unknown-key": ("lora: {ranks: 4}\n", "lora: unknown option 'ranks'"),
}


@pytest.mark.parametrize("line, expected", LORA_MISTAKES.values(), ids=LORA_MISTAKES.keys())
def test_lora_key_mistakes_are_one_line_with_the_file_and_line(line, expected, adapters, tmp_path, capsys):
    path = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {adapters['a']}\n" + line)

    assert main(["merge", str(path), "--output", str(tmp_path / "merged")]) == 2

    assert one_error_line(capsys).startswith(f"polm: error: {path}:4: {expected}")
    assert not (tmp_path / "merged").exists()


def test_the_lora_key_is_refused_for_full_models(adapters, tokenizer, tmp_path, capsys):
    full = save(tiny_llama(tokenizer, 3), tokenizer, tmp_path / "full")
    capsys.readouterr()
    path = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {full}\nlora: {{output: adapter}}\n")

    assert main(["merge", str(path), "--output", str(tmp_path / "merged")]) == 2

    assert "lora: applies to LoRA adapters, and the models are full models" in one_error_line(capsys)
    assert not (tmp_path / "merged").exists()


def test_merge_stage_merges_saved_adapters_into_the_pipeline_model(adapters, tmp_path):
    """A ``merge`` stage on the base folder with ``task_arithmetic`` of adapter ``a`` at weight 0.5: its final/ is
    ``W + 0.5 delta_a``; ``output: adapter`` is refused when the stage is added."""
    result = (polm.Pipeline(str(adapters["base"]), seed=0)
              .add("merge", merge_method="task_arithmetic", models=[{"model": str(adapters["a"])}],
                   parameters={"weight": 0.5})
              .run(tmp_path / "run"))

    base, merged = tensors(adapters["base"]), tensors(result.stages[0].checkpoint)
    assert_close(merged[f"{Q}.weight"], base[f"{Q}.weight"] + 0.5 * update(adapters["a"], Q, SCALING["a"]))
    with pytest.raises(polm.PolmError, match="a merge stage hands a model on, not an adapter"):
        polm.Pipeline("polm-tiny").add("merge", merge_method="linear", models=[{"model": str(adapters["a"])}],
                                       lora={"output": "adapter"})


def test_modules_to_save_merge_as_full_tensors_either_way(adapters, tokenizer, tmp_path):
    """Adapters that train ``model.norm`` in full (``modules_to_save``, their copies moved off the base's by
    ``n_a``, ``n_b``): ``task_arithmetic`` (0.5, 0.25) gives ``W + 0.5 (theta_a - W) + 0.25 (theta_b - W)`` for
    the norm into the base, and a concat adapter holds that tensor under peft's name and gives the same logits."""
    saved = {}
    for name, seed in (("a", 3), ("b", 4)):
        folder = make_adapter(adapters["base"], tmp_path / f"saved-{name}", tokenizer, seed,
                              lora(2, 4, modules_to_save=["model.norm"]))
        weights = load_file(folder / "adapter_model.safetensors")
        weights[f"{PREFIX}model.norm.weight"] = weights[f"{PREFIX}model.norm.weight"] + torch.randn(32)
        save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        saved[name] = (folder, weights[f"{PREFIX}model.norm.weight"])
    head = (f"merge_method: task_arithmetic\nbase_model: {adapters['base']}\nmodels:\n"
            f"  - {{model: {saved['a'][0]}, parameters: {{weight: 0.5}}}}\n"
            f"  - {{model: {saved['b'][0]}, parameters: {{weight: 0.25}}}}\n")
    assert main(["merge", str(write_config(tmp_path, head)), "--output", str(tmp_path / "full")]) == 0
    path = write_config(tmp_path, head + "lora: {output: adapter, combine: concat}\n")
    assert main(["merge", str(path), "--output", str(tmp_path / "adapter")]) == 0

    norm = tensors(adapters["base"])["model.norm.weight"]
    expected = norm + 0.5 * (saved["a"][1] - norm) + 0.25 * (saved["b"][1] - norm)
    assert_close(tensors(tmp_path / "full")["model.norm.weight"], expected)
    assert_close(load_file(tmp_path / "adapter" / "adapter_model.safetensors")[f"{PREFIX}model.norm.weight"],
                 expected)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["model.norm"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapters["base"]), tmp_path / "adapter")
    assert_close(logits(peft_model, tokenizer),
                 logits(AutoModelForCausalLM.from_pretrained(tmp_path / "full"), tokenizer))


def test_a_transposed_base_weight_gets_the_update_transposed(tokenizer, tmp_path):
    """GPT-2 stores its Conv1D weights as (in, out) and peft's adapters on them say ``fan_in_fan_out``: one
    adapter at weight 1 into the base is peft's own ``merge_and_unload``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64))
    base = save(gpt2, tokenizer, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "a", tokenizer, 1, lora(4, 8, targets=("c_attn",), fan_in_fan_out=True))
    path = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {adapter}\n")

    assert main(["merge", str(path), "--output", str(tmp_path / "merged")]) == 0

    model = AutoModelForCausalLM.from_pretrained(base)
    expected = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    merged = tensors(tmp_path / "merged")
    assert not torch.equal(merged["transformer.h.0.attn.c_attn.weight"],
                           tensors(base)["transformer.h.0.attn.c_attn.weight"])
    for name, tensor in merged.items():
        assert_close(tensor, expected[name], msg=name)


def test_a_lora_stage_folder_merges_as_its_final_adapter(adapters, tmp_path):
    """A polm ``lora`` stage (one step) and its run's stage folder as the model: ``task_arithmetic`` at weight 1
    into the base is the stage's adapter merged by peft (``merge_and_unload``)."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {n} + 1?", "completion": str(n + 1)}) + "\n"
                            for n in range(8)))
    polm.Pipeline(str(adapters["base"]), seed=0).add("sft", data=str(data), max_steps=1, batch_size=2,
                                                     tuning="lora").run(tmp_path / "run")
    path = write_config(tmp_path, f"merge_method: task_arithmetic\nmodels:\n  - model: {tmp_path / 'run' / '00-sft'}\n")

    assert main(["merge", str(path), "--output", str(tmp_path / "merged")]) == 0

    base = AutoModelForCausalLM.from_pretrained(adapters["base"])
    expected = PeftModel.from_pretrained(base, tmp_path / "run" / "00-sft" / "final").merge_and_unload().state_dict()
    for name, tensor in tensors(tmp_path / "merged").items():
        assert_close(tensor, expected[name], msg=name)
    record = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert record["models"][0]["resolved"] == str(tmp_path / "run" / "00-sft" / "final")
