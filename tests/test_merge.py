"""Merging full models: ``polm merge``, the ``merge`` stage and the functions behind them, on tiny random Llamas.

Notation: ``theta_X`` is model X's tensor of one name; a ``linear`` merge with weights ``w`` is
``sum_m w_m theta_m / sum_m w_m`` (divided only with ``normalize``), ``task_arithmetic`` is
``base + sum_m w_m (theta_m - base)``. Every failure is one stderr line, exit status 2 and nothing written.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import polm
from polm.engine.cli import main
from polm.plugins.integration.merge import (
    MergeConfig,
    find_merge_method,
    merge_models,
    plan_tensors,
    read_merge_config,
    resolve_keywords,
)
from polm.plugins.integration.merge.merge import open_inputs
from polm.plugins.integration.merge.parameters import layer_position
from tests.helpers import registered, save, tiny_llama

KEPT_FILE, KEPT_TEXT = "notes.txt", "an earlier merge\n"


@pytest.fixture
def models(tokenizer, tmp_path) -> dict[str, Path]:
    """Three folders of one architecture and tokenizer: ``base``, ``a`` and ``b`` (seeds 0, 1, 2)."""
    return {name: save(tiny_llama(tokenizer, seed), tokenizer, tmp_path / name)
            for seed, name in enumerate(("base", "a", "b"))}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for file in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(file).items()}


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    return path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def one_error_line(capsys) -> str:
    _out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("polm: error: ")
    return lines[0]


def test_linear_merge_is_the_weighted_average_and_loads_with_plain_transformers(models, tmp_path, tokenizer):
    """``linear`` with weights 0.25 / 0.75 (normalized: they sum to 1) is ``0.25 theta_a + 0.75 theta_b`` for
    every tensor, and the folder loads with ``AutoModelForCausalLM`` to the logits of a model given that
    averaged state dict (the tied output layer included)."""
    config = read_merge_config({"merge_method": "linear", "models": [
        {"model": str(models["a"]), "parameters": {"weight": 0.25}},
        {"model": str(models["b"]), "parameters": {"weight": 0.75}}]})
    output = tmp_path / "merged"

    report = merge_models(config, output)

    a, b, merged = tensors(models["a"]), tensors(models["b"]), tensors(output)
    assert set(merged) == set(a)
    for name in a:
        assert_close(merged[name], 0.25 * a[name] + 0.75 * b[name], msg=name)
    expected = tiny_llama(tokenizer, 0)
    expected.load_state_dict({name: 0.25 * a[name] + 0.75 * b[name] for name in a}, strict=False)
    expected.tie_weights()
    loaded = AutoModelForCausalLM.from_pretrained(output)
    input_ids = torch.tensor([tokenizer("What is 12 + 7?")["input_ids"]])
    with torch.no_grad():
        assert_close(loaded(input_ids).logits, expected.eval()(input_ids).logits)
    assert type(polm.load_model(output)[0]).__name__ == "LlamaForCausalLM"
    assert (report.tensors, report.merged_tensors, report.base) == (len(a), len(a), None)


def test_task_arithmetic_through_the_command_records_checksums_version_and_a_card(models, tmp_path, capsys):
    """``polm merge`` with ``task_arithmetic`` writes ``base + 0.5 (theta_a - base) + 0.25 (theta_b - base)`` in
    bfloat16 (``--dtype``), ``merge.json`` with the config as given, each input's file sha256 and polm's
    version, and a README.md model card; it prints where it wrote and a summary line."""
    path = write_config(tmp_path, f"""\
merge_method: task_arithmetic
base_model: {models['base']}
models:
  - model: {models['base']}
  - model: {models['a']}
    parameters: {{weight: 0.5}}
  - model: {models['b']}
    parameters: {{weight: 0.25}}
""")
    output = tmp_path / "merged"

    assert main(["merge", str(path), "--output", str(output), "--dtype", "bfloat16"]) == 0

    out, _ = capsys.readouterr()
    assert f"polm merge: wrote {output}" in out
    assert "polm merge: task_arithmetic of 2 models onto" in out
    base, a, b, merged = (tensors(folder) for folder in (models["base"], models["a"], models["b"], output))
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16, name
        expected = base[name] + 0.5 * (a[name] - base[name]) + 0.25 * (b[name] - base[name])
        assert_close(tensor, expected.to(torch.bfloat16), msg=name)
    record = json.loads((output / "merge.json").read_text())
    sha = {name: hashlib.sha256((models[name] / "model.safetensors").read_bytes()).hexdigest() for name in models}
    assert record["polm_version"] == polm.__version__
    assert record["merge_method"] == "task_arithmetic"
    assert record["dtype"] == "bfloat16" and "dtype" not in record["config"]  # --dtype, not the config's
    assert record["config"]["models"][1] == {"model": str(models["a"]), "parameters": {"weight": 0.5}}
    assert record["base_model"]["sha256"] == {"model.safetensors": sha["base"]}
    assert [model["sha256"]["model.safetensors"] for model in record["models"]] == [sha["a"], sha["b"]]
    card = (output / "README.md").read_text()
    assert card.startswith("---\n") and "task_arithmetic" in card and f"polm {polm.__version__}" in card
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"


def test_ties_merge_of_a_registered_model_with_a_folder_records_its_state_dict_checksum(tmp_path, capsys):
    """A registered name (``polm-tiny``) as the base: ``ties`` of polm-tiny's own saved copy onto polm-tiny is
    polm-tiny (every task vector is zero), and merge.json identifies the base by its state dict's sha256."""
    tiny_model, tiny_tokenizer = polm.load_model("polm-tiny")
    copy = save(tiny_model, tiny_tokenizer, tmp_path / "copy")
    path = write_config(tmp_path, "merge_method: ties\nbase_model: polm-tiny\nmodels:\n"
                                  "  - {model: copy, parameters: {weight: 1.0, density: 0.5}}\n")
    output = tmp_path / "merged"

    assert main(["merge", str(path), "--output", str(output)]) == 0

    for name, tensor in tensors(output).items():
        assert_close(tensor, tiny_model.state_dict()[name], msg=name)
    record = json.loads((output / "merge.json").read_text())
    assert set(record["base_model"]["sha256"]) == {"state_dict"}
    assert record["base_model"]["resolved"] == "registered model"
    assert record["models"][0]["resolved"] == str(copy)  # found beside the config


def test_filters_and_gradients_resolve_per_tensor_name():
    """mergekit's settings for tensors of a five-layer model, where layer i sits at t = i / 4:

    - model 0 ``density: [0.2, 0.5, 0.8]``: layer 1 (t 0.25) reads 0.5 of the way from 0.2 to 0.5, 0.35;
      layer 4 (t 1) 0.8; the embeddings (outside the layers, t 0) 0.2.
    - model 0 ``weight: [{filter: self_attn, value: 0.3}, {value: [0, 1]}]``: 0.3 for attention, else t.
    - model 1 ``weight: [{filter: mlp, value: 0.9}]``: 0.9 in MLPs; elsewhere no filter matches, so the
      top-level ``weight: 0.6``; no density anywhere, so ties' default 1.0.
    - slerp's own ``t: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]``: t in attention, else 0.5.
    """
    ties = find_merge_method("ties")
    config = MergeConfig(merge_method="ties", base_model="base", models=[
        {"model": "x", "parameters": {"density": [0.2, 0.5, 0.8],
                                      "weight": [{"filter": "self_attn", "value": 0.3}, {"value": [0.0, 1.0]}]}},
        {"model": "y", "parameters": {"weight": [{"filter": "mlp", "value": 0.9}]}}],
        parameters={"weight": 0.6, "normalize": True})
    cases = {
        "model.layers.1.mlp.up_proj.weight": ([0.25, 0.9], [0.35, 1.0]),
        "model.layers.1.self_attn.q_proj.weight": ([0.3, 0.6], [0.35, 1.0]),
        "model.layers.4.mlp.down_proj.weight": ([1.0, 0.9], [0.8, 1.0]),
        "model.embed_tokens.weight": ([0.0, 0.6], [0.2, 1.0]),
    }
    for name, (weight, density) in cases.items():
        keywords = resolve_keywords(config, ties, config.models, name, layer_position(name, 5))
        assert keywords["weight"] == pytest.approx(weight), name
        assert keywords["density"] == pytest.approx(density), name
        assert keywords["normalize"] is True
    slerp = find_merge_method("slerp")
    gradient = MergeConfig(merge_method="slerp", base_model="base", models=[{"model": "x"}],
                           parameters={"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]})
    at = {name: resolve_keywords(gradient, slerp, gradient.models, name, layer_position(name, 5))["t"]
          for name in ("model.layers.3.self_attn.o_proj.weight", "model.layers.3.mlp.up_proj.weight")}
    assert at == pytest.approx({"model.layers.3.self_attn.o_proj.weight": 0.75,
                                "model.layers.3.mlp.up_proj.weight": 0.5})


def test_filtered_weights_reach_the_merged_tensors(models, tmp_path):
    """Unnormalized ``linear`` with a's weight 0.3 in attention and 0.7 elsewhere, b's 1 - that: attention
    tensors are ``0.3 theta_a + 0.7 theta_b``, the others ``0.7 theta_a + 0.3 theta_b``; a two-layer model's
    layer-1 gradient ``[0, 2]`` reads 2 (t = 1)."""
    config = read_merge_config({"merge_method": "linear", "parameters": {"normalize": False}, "models": [
        {"model": str(models["a"]), "parameters": {"weight": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]}},
        {"model": str(models["b"]), "parameters": {"weight": [{"filter": "self_attn", "value": 0.7},
                                                              {"filter": "layers.1.mlp", "value": [0, 2]},
                                                              {"value": 0.3}]}}]})
    with ExitStack() as stack:
        plans = {plan.name: plan for plan in plan_tensors(
            config, find_merge_method("linear"), open_inputs(config, find_merge_method("linear"), stack))}
    assert plans["model.layers.1.mlp.up_proj.weight"].keywords["weight"] == pytest.approx([0.7, 2.0])

    merge_models(config, tmp_path / "merged")

    a, b, merged = tensors(models["a"]), tensors(models["b"]), tensors(tmp_path / "merged")
    attention, mlp = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    assert_close(merged[attention], 0.3 * a[attention] + 0.7 * b[attention])
    assert_close(merged[mlp], 0.7 * a[mlp] + 0.3 * b[mlp])
    late = "model.layers.1.mlp.up_proj.weight"
    assert_close(merged[late], 0.7 * a[late] + 2.0 * b[late])


def test_slerp_takes_the_base_listed_among_its_models_as_the_base(models, tmp_path):
    """mergekit's slerp configs list both models and name one the base: that one is the base, not a second
    model (slerp takes exactly one), and each tensor is slerp's own ``slerp([theta_a], theta_base, t=0.3)``."""
    config = read_merge_config({"merge_method": "slerp", "base_model": str(models["base"]),
                                "models": [{"model": str(models["base"])}, {"model": str(models["a"])}],
                                "parameters": {"t": 0.3}})
    merge_models(config, tmp_path / "merged")

    slerp = polm.components("merge_methods")["slerp"]
    base, a, merged = tensors(models["base"]), tensors(models["a"]), tensors(tmp_path / "merged")
    for name in base:
        assert_close(merged[name], slerp([a[name]], base[name], t=0.3), msg=name)


def test_tensors_that_are_not_floating_point_are_copied_from_the_base(models, tmp_path):
    """An integer tensor (a buffer) is no merge method's to touch: the output holds the base's, bit for bit."""
    from safetensors.torch import save_file

    for value, name in ((7, "base"), (8, "a"), (9, "b")):
        weights = tensors(models[name])
        weights["model.step_counts"] = torch.full((3,), value, dtype=torch.int64)
        save_file(weights, models[name] / "model.safetensors", metadata={"format": "pt"})
    config = read_merge_config({"merge_method": "task_arithmetic", "base_model": str(models["base"]),
                                "models": [{"model": str(models["a"])}, {"model": str(models["b"])}]})
    report = merge_models(config, tmp_path / "merged")

    assert torch.equal(tensors(tmp_path / "merged")["model.step_counts"], torch.full((3,), 7))
    assert report.tensors == report.merged_tensors + 1


def test_large_outputs_are_sharded_and_load_the_same(models, tmp_path):
    """Past ``max_shard_bytes`` the weights go to ``model-0000i-of-0000n.safetensors`` with an index, and
    transformers loads the same weights as from one file."""
    config = read_merge_config({"merge_method": "linear", "models": [{"model": str(models["a"])},
                                                                     {"model": str(models["b"])}]})
    merge_models(config, tmp_path / "one")
    merge_models(config, tmp_path / "sharded", max_shard_bytes=20_000)

    shards = sorted(path.name for path in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(tmp_path / "one"))
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").state_dict()
    for name in one:
        assert torch.equal(one[name], sharded[name]), name


def other_architecture(tokenizer, folder: Path) -> Path:
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True))
    return save(model, tokenizer, folder)


def other_tokenizer(tokenizer, folder: Path) -> Path:
    from polm.modalities.text.tiny.tokenizer import build_tokenizer

    theirs = build_tokenizer(["The cat sat on the mat, and the dog ran far away."] * 4)
    return save(tiny_llama(theirs, 4), theirs, folder)


MISMATCHES = {
    "shape": (lambda tokenizer, folder: save(tiny_llama(tokenizer, 4, intermediate_size=48), tokenizer, folder),
              "tensor model.layers.0.mlp.down_proj.weight has shape [32, 64] in '{a}' and [32, 48] in '{odd}'"),
    "architecture": (other_architecture,
                     "their architectures differ, LlamaForCausalLM (llama) and Qwen2ForCausalLM (qwen2)"),
    "tokenizer": (other_tokenizer, "their tokenizers differ, a vocabulary of"),
}


@pytest.mark.parametrize("make, expected", MISMATCHES.values(), ids=MISMATCHES.keys())
def test_mismatched_inputs_are_one_line_exit_2_and_nothing_written(make, expected, models, tokenizer, tmp_path,
                                                                   capsys):
    """Another MLP width, another architecture, another tokenizer: refused before writing, naming both inputs and
    the tensor with both shapes, the two architectures, or the two vocabularies."""
    odd = make(tokenizer, tmp_path / "odd")
    capsys.readouterr()  # transformers' own lines from saving the odd model
    path = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['a']}\n  - model: {odd}\n")
    output = tmp_path / "merged"

    assert main(["merge", str(path), "--output", str(output)]) == 2

    line = one_error_line(capsys)
    assert f"cannot merge '{models['a']}' and '{odd}'" in line
    assert expected.format(a=models["a"], odd=odd) in line
    assert not output.exists() and not list(tmp_path.glob(".merged*"))


TIES = "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n"
FAILING_CONFIGS = {
    "unknown-method": (TIES.replace("ties", "tiez"), 1,
                       "merge_method: unknown merge method 'tiez'. Did you mean 'ties'? Available: "),
    "unknown-key": (TIES.replace("base_model", "base_modle"), 2,
                    "base_modle: unknown key 'base_modle'. Did you mean 'base_model'? Valid merge config keys: "),
    "slices": ("merge_method: ties\nbase_model: {base}\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n",
               3, "slices: 'slices' is not supported: layer slices"),
    "layer-range": (TIES.replace("model: {a}", "{{model: {a}, layer_range: [0, 2]}}"), 4,
                    "models[0].layer_range: 'layer_range' is not supported"),
    "per-model-parameter": (TIES + "    parameters: {{densty: 0.5}}\n", 5,
                            ("models[0].parameters.densty: 'densty' is not a per-model parameter of merge method "
                             "'ties'. Did you mean 'density'? Per-model parameters: weight, density")),
    "method-parameter": (TIES + "parameters: {{normalise: true}}\n", 5,
                         ("parameters.normalise: 'normalise' is not a parameter of merge method 'ties'. Did you "
                          "mean 'normalize'?")),
    "tokenizer-union": (TIES + "tokenizer_source: union\n", 5, "tokenizer_source: 'union' is not supported"),
    "bad-gradient": (TIES + "parameters: {{weight: [0.5, high]}}\n", 5, "parameters.weight: a list is a gradient"),
    "missing-model": (TIES.replace("model: {a}", "model: ./nowhere"), 4,
                      "models[0].model: model './nowhere' is neither a folder nor a registered model"),
}


@pytest.mark.parametrize("text, line, expected", FAILING_CONFIGS.values(), ids=FAILING_CONFIGS.keys())
def test_config_mistakes_are_one_line_naming_file_and_line(text, line, expected, models, tmp_path, capsys):
    """A ties config (method, base, a model) with one mistake: an unknown method (with the available ones), an
    unknown key (with the closest), mergekit keys polm refuses, parameters the method does not take (with the
    valid ones), a malformed gradient, a missing model. One line with ``file:line``, exit 2, nothing written."""
    path = write_config(tmp_path, text.format(base=models["base"], a=models["a"]))
    output = tmp_path / "merged"

    assert main(["merge", str(path), "--output", str(output)]) == 2

    assert one_error_line(capsys).startswith(f"polm: error: {path}:{line}: {expected}")
    assert not output.exists()


def test_a_non_empty_output_folder_is_refused_and_left_as_it_was(models, tmp_path, capsys):
    """An output folder that holds something is refused before the config is read: exit 2, its files intact."""
    path = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['a']}\n")
    output = tmp_path / "merged"
    output.mkdir()
    (output / KEPT_FILE).write_text(KEPT_TEXT)
    before = snapshot(output)

    assert main(["merge", str(path), "--output", str(output)]) == 2

    line = one_error_line(capsys)
    assert f"output folder {output} is not empty" in line
    assert snapshot(output) == before


def test_the_console_script_reports_an_unknown_method_with_exit_status_2(models, tmp_path):
    """The installed ``polm`` command, as a real process: one stderr line naming the method, exit 2."""
    path = write_config(tmp_path, f"merge_method: lineer\nmodels:\n  - model: {models['a']}\n")
    script = Path(sys.executable).with_name("polm")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "polm.engine.cli"]

    completed = subprocess.run([*command, "merge", str(path), "--output", str(tmp_path / "merged")],
                               check=False, capture_output=True, text=True, timeout=300)

    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr.splitlines() == [
        (f"polm: error: {path}:1: merge_method: unknown merge method 'lineer'. Did you mean 'linear'? Available: "
         f"{', '.join(sorted(polm.components('merge_methods')))}")]
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_merge_stage_after_sft_merges_the_pipeline_model_with_a_saved_one(method, models, tmp_path):
    """sft (2 steps) then ``merge`` with another saved model at weight 0.5 (top-level ``parameters``): ``linear``
    merges the pipeline's model as its first model, ``0.5 theta_sft + 0.5 theta_b``; ``task_arithmetic`` takes it
    as the base, ``theta_sft + 0.5 (theta_b - theta_sft)``: the same tensors. The stage's ``final/`` loads with
    plain transformers and ``merge.json`` sits in the stage folder."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {n} + 1?", "completion": str(n + 1)}) + "\n"
                            for n in range(8)))
    result = (polm.Pipeline(str(models["base"]), seed=0)
              .add("sft", data=str(data), max_steps=2, batch_size=2)
              .add("merge", merge_method=method, models=[{"model": str(models["b"])}], parameters={"weight": 0.5})
              .run(tmp_path / "run"))

    sft, b = tensors(result.stages[0].checkpoint), tensors(models["b"])
    final = result.stages[1].checkpoint
    merged = tensors(final)
    assert set(merged) == set(sft)
    for name in sft:
        assert_close(merged[name], 0.5 * sft[name] + 0.5 * b[name], msg=name)
    assert not torch.equal(sft["model.norm.weight"], tensors(models["base"])["model.norm.weight"])  # sft trained
    AutoModelForCausalLM.from_pretrained(final)
    record = json.loads((tmp_path / "run" / "01-merge" / "merge.json").read_text())
    assert record["merge_method"] == method and record["models"][-1]["model"] == str(models["b"])


def test_merge_stage_options_are_checked_when_the_stage_is_added(models):
    """A stage with a parameter its method does not take fails at ``Pipeline.add``, naming the stage."""
    with pytest.raises(polm.PolmError, match=r"stage 0 'merge': models\[0\]\.parameters\.density: 'density' is "
                                             r"not a per-model parameter of merge method 'linear'"):
        polm.Pipeline("polm-tiny").add("merge", merge_method="linear",
                                       models=[{"model": str(models["a"]), "parameters": {"density": 0.5}}])


def noisy_mean(tensors, base, *, weight, noise: float = 0.0, generator=None):
    """A throwaway plugin method: the weighted mean plus ``noise`` times standard normal noise."""
    mean = sum(w * t for w, t in zip(weight, tensors)) / sum(weight)
    return mean + noise * torch.randn(mean.shape, generator=generator)


class NoisyMeanPlugin:
    @polm.hookimpl
    def polm_register_merge_methods(self, register):
        register("noisy_mean", noisy_mean, base="unused", model_parameters={"weight": 1.0})


def test_a_plugin_method_gets_its_parameters_and_a_seeded_generator(models, tmp_path, capsys):
    """A method registered by a runtime plugin is found through the registry and its signature like a built-in:
    its own ``noise`` is taken (a misspelling is answered with it), and its ``generator`` is seeded by
    ``--seed``: the same seed gives the same tensors, another seed others; with ``noise: 0`` it is the mean."""
    with registered(NoisyMeanPlugin(), "noisy"):
        def run(seed: int, noise: str = "0.1") -> dict[str, torch.Tensor]:
            output = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
            path = write_config(tmp_path, f"merge_method: noisy_mean\nparameters: {{noise: {noise}}}\nmodels:\n"
                                          f"  - model: {models['a']}\n  - model: {models['b']}\n")
            assert main(["merge", str(path), "--output", str(output), "--seed", str(seed)]) == 0
            return tensors(output)

        first, again, other, quiet = run(1), run(1), run(2), run(1, "0")
        name = "model.layers.0.mlp.up_proj.weight"
        assert torch.equal(first[name], again[name])
        assert not torch.equal(first[name], other[name])
        assert_close(quiet[name], (tensors(models["a"])[name] + tensors(models["b"])[name]) / 2)
        capsys.readouterr()
        path = write_config(tmp_path, f"merge_method: noisy_mean\nparameters: {{nois: 0.1}}\nmodels:\n"
                                      f"  - model: {models['a']}\n")
        assert main(["merge", str(path), "--output", str(tmp_path / "misspelt")]) == 2
        assert f"{path}:2: parameters.nois: 'nois' is not a parameter of merge method 'noisy_mean'. Did you mean " \
               "'noise'?" in one_error_line(capsys)
    assert "noisy_mean" not in polm.components("merge_methods")
