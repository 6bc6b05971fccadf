"""Merging polm multimodal models part by part: ``polm merge``, the ``merge`` stage, on tiny random models.

Each model is conftest's two-layer Llama (width 32) joined to the tiny ViT (``open_clip:polm-tiny-vit``, random,
so its weights are saved) by a small resampler connector; ``base``, ``a`` and ``b`` differ only in their seed.
Notation as in ``tests/test_merge.py``: ``theta_X`` is model X's tensor of one name; a ``linear`` merge with
weights ``w`` is ``sum_m w_m theta_m / sum_m w_m``; ``task_arithmetic`` with ``lambda`` is
``base + lambda sum_m w_m (theta_m - base)``. The output's tensors are read back from its files:
``language_model/model.safetensors``, ``connectors.safetensors``, ``encoders.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.testing import assert_close

import polm
from polm.engine.cli import main
from polm.engine.rl.rollout import sample
from polm.modalities.multimodal.build import build_multimodal
from polm.plugins.integration.merge import merge_models, read_merge_config
from polm.plugins.integration.merge.methods import ties
from tests.helpers import save, tiny_llama

ENCODER = "open_clip:polm-tiny-vit"
RESAMPLER = {"name": "resampler", "num_queries": 4, "depth": 1}
FILES = {"language_model": "language_model/model.safetensors", "connectors": "connectors.safetensors",
         "encoders": "encoders.safetensors"}


def tiny_multimodal(tokenizer, seed: int, connector=None, encoder=ENCODER, intermediate_size: int = 64):
    """A random multimodal model: every weight (language model, ViT, connector) drawn after ``manual_seed(seed)``."""
    lm = tiny_llama(tokenizer, seed, intermediate_size=intermediate_size)
    return build_multimodal(lm, {"image": encoder}, {"image": connector or RESAMPLER})


@pytest.fixture
def models(tokenizer, tmp_path) -> dict[str, Path]:
    """Three saved multimodal models of one make: ``base``, ``a`` and ``b`` (seeds 0, 1, 2)."""
    return {name: save(tiny_multimodal(tokenizer, seed), tokenizer, tmp_path / name)
            for seed, name in enumerate(("base", "a", "b"))}


def part_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each part's tensors, read from the part's file of a saved multimodal model."""
    return {part: load_file(folder / file) for part, file in FILES.items()}


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    return path


def one_error_line(capsys) -> str:
    _out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("polm: error: ")
    return lines[0]


def image_prompt(tmp_path: Path) -> list[dict]:
    Image.new("RGB", (32, 32), (230, 40, 40)).save(tmp_path / "red.png")
    return [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "red.png")},
                                         {"type": "text", "text": "What colour is it?"}]}]


def test_linear_merge_averages_every_part_and_loads_and_generates(models, tokenizer, tmp_path):
    """``linear`` with weights 0.25 / 0.75 is ``0.25 theta_a + 0.75 theta_b`` for every tensor of every part (the
    language model, the connector and the encoder), written in the multimodal layout; the folder loads with
    ``polm.load_model`` into a model holding those weights, which generates for a row with an image."""
    config = read_merge_config({"merge_method": "linear", "models": [
        {"model": str(models["a"]), "parameters": {"weight": 0.25}},
        {"model": str(models["b"]), "parameters": {"weight": 0.75}}]})
    output = tmp_path / "merged"

    report = merge_models(config, output)

    a, b, merged = part_tensors(models["a"]), part_tensors(models["b"]), part_tensors(output)
    for part in FILES:
        assert set(merged[part]) == set(a[part]) and merged[part], part
        for name in a[part]:
            assert_close(merged[part][name], 0.25 * a[part][name] + 0.75 * b[part][name], msg=f"{part} {name}")
    assert json.loads((output / "multimodal.json").read_text()) == json.loads((models["a"] / "multimodal.json")
                                                                              .read_text())
    assert report.tensors == sum(len(tensors) for tensors in a.values())
    model, loaded_tokenizer = polm.load_model(str(output))
    assert type(model).__name__ == "MultimodalModel"
    assert_close(model.connectors.state_dict(), merged["connectors"])
    assert_close(model.lm.state_dict()["model.norm.weight"], merged["language_model"]["model.norm.weight"])
    rollout = sample(model, loaded_tokenizer, [image_prompt(tmp_path)], max_new_tokens=4)
    assert rollout.completion_ids.shape == (1, 4) and rollout.media is not None


def test_each_part_is_merged_by_the_method_its_parts_entry_names(models, tmp_path, capsys):
    """``ties`` for the language model (density 0.5, weights 0.5 / 0.5, onto the base), ``parts`` giving the
    connectors ``linear`` over all three listed models (the base's weight 1, so ``(theta_base + 0.5 theta_a +
    0.5 theta_b) / 2``) and the encoders ``task_arithmetic`` with ``lambda: 0.5`` (``base + 0.5 (0.5 (theta_a -
    base) + 0.5 (theta_b - base))``). The language model equals polm's ``ties`` on its tensors; ``merge.json``
    records each part's method, the config as given and the sha256 of every input file; the card says it."""
    path = write_config(tmp_path, f"""\
merge_method: ties
base_model: {models['base']}
models:
  - model: {models['base']}
  - model: {models['a']}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {models['b']}
    parameters: {{weight: 0.5, density: 0.5}}
parts:
  connectors: {{merge_method: linear}}
  encoders: {{merge_method: task_arithmetic, parameters: {{lambda: 0.5}}}}
""")
    output = tmp_path / "merged"

    assert main(["merge", str(path), "--output", str(output)]) == 0

    assert "polm merge: ties of 2 models onto" in capsys.readouterr().out
    base, a, b, merged = (part_tensors(folder) for folder in (models["base"], models["a"], models["b"], output))
    for name, tensor in merged["language_model"].items():
        expected = ties([a["language_model"][name], b["language_model"][name]], base["language_model"][name],
                        weight=[0.5, 0.5], density=[0.5, 0.5])
        assert_close(tensor, expected, msg=name)
    for name, tensor in merged["connectors"].items():
        theta = (base["connectors"][name], a["connectors"][name], b["connectors"][name])
        assert_close(tensor, (theta[0] + 0.5 * theta[1] + 0.5 * theta[2]) / 2, msg=name)
    for name, tensor in merged["encoders"].items():
        theta = (base["encoders"][name], a["encoders"][name], b["encoders"][name])
        assert_close(tensor, theta[0] + 0.5 * (0.5 * (theta[1] - theta[0]) + 0.5 * (theta[2] - theta[0])), msg=name)
    record = json.loads((output / "merge.json").read_text())
    assert record["parts"] == {"language_model": "ties", "connectors": "linear", "encoders": "task_arithmetic"}
    assert record["config"]["parts"]["encoders"] == {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5}}
    assert record["polm_version"] == polm.__version__
    described = {entry["model"]: entry for entry in [record["base_model"], *record["models"]]}
    for name in ("base", "a", "b"):
        entry = described[str(models[name])]
        assert entry["kind"] == "multimodal"
        for file in ("multimodal.json", *FILES.values()):
            assert entry["sha256"][file] == hashlib.sha256((models[name] / file).read_bytes()).hexdigest(), file
    assert "language_model by `ties`, connectors by `linear`, encoders by `task_arithmetic`" in \
        (output / "README.md").read_text()


def test_gradients_run_over_each_parts_own_layers(models, tmp_path):
    """``linear`` with ``a``'s weight a gradient ``[0, 1]`` and ``b``'s 1: a tensor at ``t = 0`` is ``theta_b``, one
    at ``t = 1`` is ``(theta_a + theta_b) / 2``. The language model's layer 1 of 2 is at ``t = 1``, its layer 0 and
    its embeddings at 0; the connector's one block (``image.blocks.0``) is at ``t = 1`` among the connector's own
    layers, though layer 0 of the model's; its queries, outside its layers, and the ViT's tensors (``resblocks``
    is not a layer name polm reads) at 0."""
    config = read_merge_config({"merge_method": "linear", "models": [
        {"model": str(models["a"]), "parameters": {"weight": [0.0, 1.0]}}, {"model": str(models["b"])}]})

    merge_models(config, tmp_path / "merged")

    a, b, merged = part_tensors(models["a"]), part_tensors(models["b"]), part_tensors(tmp_path / "merged")
    at_one = {("language_model", "model.layers.1.mlp.up_proj.weight"),
              ("connectors", "image.blocks.0.mlp.0.weight")}
    at_zero = {("language_model", "model.layers.0.mlp.up_proj.weight"), ("language_model", "model.embed_tokens.weight"),
               ("connectors", "image.queries"), ("encoders", "image.visual.transformer.resblocks.1.mlp.c_fc.weight")}
    for part, name in at_one:
        assert_close(merged[part][name], (a[part][name] + b[part][name]) / 2, msg=name)
    for part, name in at_zero:
        assert_close(merged[part][name], b[part][name], msg=name)


@pytest.mark.parametrize("through", ["merge_models", "stage"])
def test_a_language_model_saved_as_a_peft_adapter_is_merged_into_its_base(through, models, tokenizer, tmp_path):
    """A multimodal model whose ``language_model/`` is a LoRA adapter (B random, so it changes the weights) over a
    base folder merges as the full model ``W + s B A``: ``linear`` at 0.5 / 0.5 with ``a`` gives the average of
    ``a``'s tensors and the adapted model's merged weights, whether the folder is read (``merge_models``) or a
    pipeline loaded it, adapter and all, and hands it to a ``merge`` stage."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tiny_multimodal(tokenizer, 3).lm.save_pretrained(tmp_path / "lm-base")
    model = tiny_multimodal(tokenizer, 3)
    model.lm = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "lm-base"),
                              LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.nn.init.normal_(model.lm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    adapted = save(model, tokenizer, tmp_path / "adapted")
    assert (adapted / "language_model" / "adapter_config.json").is_file()
    full = model.lm.merge_and_unload().state_dict()
    if through == "stage":
        result = (polm.Pipeline(str(adapted), seed=0)
                  .add("merge", merge_method="linear", models=[{"model": str(models["a"])}], parameters={"weight": 0.5})
                  .run(tmp_path / "run"))
        output = Path(result.stages[0].checkpoint)
    else:
        output = tmp_path / "merged"
        merge_models(read_merge_config({"merge_method": "linear", "models": [{"model": str(models["a"])},
                                                                             {"model": str(adapted)}]}), output)

    a, merged = part_tensors(models["a"]), part_tensors(output)
    for name, tensor in merged["language_model"].items():
        assert_close(tensor, 0.5 * a["language_model"][name] + 0.5 * full[name], msg=name)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    unadapted = AutoModelForCausalLM.from_pretrained(tmp_path / "lm-base").state_dict()
    assert not torch.equal(full[q_proj], unadapted[q_proj])


def test_the_merge_stage_merges_a_pipeline_multimodal_model(models, tmp_path):
    """A pipeline starting from ``base`` with a ``merge`` stage (``linear``, ``weight: 0.5``, with ``b``) ends with
    ``0.5 theta_base + 0.5 theta_b`` in every part of its ``final/``, which loads as a multimodal model."""
    result = (polm.Pipeline(str(models["base"]), seed=0)
              .add("merge", merge_method="linear", models=[{"model": str(models["b"])}], parameters={"weight": 0.5})
              .run(tmp_path / "run"))

    final = Path(result.stages[0].checkpoint)
    base, b, merged = part_tensors(models["base"]), part_tensors(models["b"]), part_tensors(final)
    for part in FILES:
        for name in base[part]:
            assert_close(merged[part][name], 0.5 * base[part][name] + 0.5 * b[part][name], msg=f"{part} {name}")
    assert type(polm.load_model(str(final))[0]).__name__ == "MultimodalModel"
    record = json.loads((tmp_path / "run" / "00-merge" / "merge.json").read_text())
    assert record["parts"] == {"language_model": "linear", "connectors": "linear", "encoders": "linear"}


def other_connector(tokenizer, a: Path, odd: Path) -> Path:
    return save(tiny_multimodal(tokenizer, 4, connector="mlp2x_gelu"), tokenizer, odd)


def other_connector_options(tokenizer, a: Path, odd: Path) -> Path:
    return save(tiny_multimodal(tokenizer, 4, {**RESAMPLER, "num_queries": 8}), tokenizer, odd)


def other_encoder_spec(tokenizer, a: Path, odd: Path) -> Path:
    """``a`` with another encoder spec in ``multimodal.json`` (the check reads the file, not the weights)."""
    shutil.copytree(a, odd)
    spec = json.loads((odd / "multimodal.json").read_text())
    spec["encoders"]["image"]["spec"] = "open_clip:ViT-B-32"
    (odd / "multimodal.json").write_text(json.dumps(spec))
    return odd


def other_encoder_options(tokenizer, a: Path, odd: Path) -> Path:
    return save(tiny_multimodal(tokenizer, 4, encoder={"spec": ENCODER, "cache_size": 16}), tokenizer, odd)


def other_width(tokenizer, a: Path, odd: Path) -> Path:
    return save(tiny_multimodal(tokenizer, 4, intermediate_size=48), tokenizer, odd)


def text_model(tokenizer, a: Path, odd: Path) -> Path:
    return save(tiny_multimodal(tokenizer, 4).lm, tokenizer, odd)


MISMATCHES = {
    "connector-type": (other_connector,
                       "their image connectors differ, name 'resampler' in '{a}' and 'mlp2x_gelu' in '{odd}'"),
    "connector-options": (other_connector_options,
                          "their image connectors differ, option num_queries 4 in '{a}' and 8 in '{odd}'"),
    "encoder-spec": (other_encoder_spec, ("their image encoders differ, spec 'open_clip:polm-tiny-vit' in '{a}' and "
                                          "'open_clip:ViT-B-32' in '{odd}'")),
    "encoder-options": (other_encoder_options,
                        "their image encoders differ, option cache_size 4096 in '{a}' and 16 in '{odd}'"),
    "language-model-shape": (other_width, ("tensor language_model.model.layers.0.mlp.down_proj.weight has shape "
                                           "[32, 64] in '{a}' and [32, 48] in '{odd}'")),
    "text-model": (text_model, "one is a multimodal model and the other a transformers"),
}


@pytest.mark.parametrize("make, expected", MISMATCHES.values(), ids=MISMATCHES.keys())
def test_mismatched_multimodal_inputs_are_one_line_exit_2_and_nothing_written(make, expected, models, tokenizer,
                                                                              tmp_path, capsys):
    """Another connector, connector option, encoder spec or encoder option (one line naming the modality and the
    field of ``multimodal.json``), another language model width (naming the tensor with both shapes), or a text
    model beside a multimodal one: refused before writing, exit 2."""
    odd = make(tokenizer, models["a"], tmp_path / "odd")
    capsys.readouterr()
    path = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['a']}\n  - model: {odd}\n")
    output = tmp_path / "merged"

    assert main(["merge", str(path), "--output", str(output)]) == 2

    line = one_error_line(capsys)
    assert f"cannot merge '{models['a']}' and '{odd}'" in line
    assert expected.format(a=models["a"], odd=odd) in line
    assert not output.exists() and not list(tmp_path.glob(".merged*"))


PARTS_MISTAKES = {
    "unknown-part": ("parts:\n  conectors: {merge_method: linear}\n", 6,
                     ("parts.conectors: unknown key 'conectors'. Did you mean 'connectors'? Valid parts (of a "
                      "polm multimodal model): language_model, connectors, encoders")),
    "unknown-method": ("parts:\n  connectors: {merge_method: lineer}\n", 6,
                       "parts.connectors.merge_method: unknown merge method 'lineer'. Did you mean 'linear'?"),
    "unknown-part-key": ("parts:\n  connectors: {merge_method: linear, weights: 0.5}\n", 6,
                         "parts.connectors.weights: unknown key 'weights'. Valid part keys: merge_method, parameters"),
    "part-parameter": ("parts:\n  connectors: {merge_method: linear, parameters: {density: 0.5}}\n", 6,
                       "parts.connectors.parameters.density: 'density' is not a parameter of merge method 'linear'"),
    "part-needs-base": ("parts:\n  encoders: {merge_method: ties}\n", 6,
                        "parts.encoders.base_model: merge method 'ties' needs a base_model"),
}


@pytest.mark.parametrize("text, line, expected", PARTS_MISTAKES.values(), ids=PARTS_MISTAKES.keys())
def test_parts_mistakes_are_one_line_naming_file_and_line(text, line, expected, models, tmp_path, capsys):
    """A linear config with a ``parts`` mistake: an unknown part (with the closest and the valid ones), an unknown
    method or key in a part, a parameter the part's method does not take, a part's method that needs a base the
    config lacks. One line with ``file:line``, exit 2, nothing written."""
    models_text = f"models:\n  - model: {models['a']}\n  - model: {models['b']}\n"
    path = write_config(tmp_path, f"merge_method: linear\n{models_text}{text}")
    output = tmp_path / "merged"

    assert main(["merge", str(path), "--output", str(output)]) == 2

    assert one_error_line(capsys).startswith(f"polm: error: {path}:{line}: {expected}")
    assert not output.exists()


def test_parts_for_text_models_are_refused_before_writing(tokenizer, tmp_path, capsys):
    """``parts`` names parts of multimodal models; merging two text language models with it fails in one line."""
    folders = [save(tiny_multimodal(tokenizer, seed).lm, tokenizer, tmp_path / f"text{seed}") for seed in (0, 1)]
    path = write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {folders[0]}\n  - model: {folders[1]}\n"
                                  "parts:\n  connectors: {merge_method: linear}\n")
    capsys.readouterr()

    assert main(["merge", str(path), "--output", str(tmp_path / "merged")]) == 2

    line = one_error_line(capsys)
    assert f"parts: '{folders[0]}' is a transformers model, which has no parts" in line
    assert not (tmp_path / "merged").exists()
