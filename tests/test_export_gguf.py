"""``polm export --format gguf``: a Llama checkpoint as a GGUF file for llama.cpp.

Each file is read back with the gguf package's own reader and compared with the checkpoint: every tensor
(llama.cpp's names taken from gguf's ``TENSOR_NAMES``, the q/k rows put back in transformers' order), the
hyperparameters, and the tokenizer's vocabulary, merges, special ids and chat template. That the q/k row
order is the one llama.cpp's rope needs is checked by computing both ropes. A bad input is one line and
status 2, with nothing written. Needs the 'export' extra (skipped without it).
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

gguf = pytest.importorskip("gguf")

from polm.engine.cli import main
from polm.engine.errors import PolmError
from polm.plugins.efficiency.export import (
    export_gguf,
    gguf_tensors,
    llama3_rope_factors,
    llama_hyperparameters,
    permute_for_rope,
    pre_tokenizer_name,
    unpermute_for_rope,
)

T = gguf.MODEL_TENSOR
#: transformers' module names and the tensors llama.cpp names them, spelled by gguf's constants.
BLOCK_TENSORS = {"input_layernorm": T.ATTN_NORM, "self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K,
                 "self_attn.v_proj": T.ATTN_V, "self_attn.o_proj": T.ATTN_OUT, "post_attention_layernorm": T.FFN_NORM,
                 "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN}
GLOBAL_TENSORS = {"model.embed_tokens": T.TOKEN_EMBD, "model.norm": T.OUTPUT_NORM, "lm_head": T.OUTPUT}


def expected_tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """GGUF name -> the checkpoint's tensor (transformers' row order), by gguf's naming, not polm's."""
    expected = {}
    for name, tensor in model.state_dict().items():
        module = name.removesuffix(".weight")
        if module in GLOBAL_TENSORS:
            if module == "lm_head" and model.config.tie_word_embeddings:
                continue  # llama.cpp reuses token_embd
            target = gguf.TENSOR_NAMES[GLOBAL_TENSORS[module]]
        else:
            _, _, block, inner = module.split(".", 3)
            target = gguf.TENSOR_NAMES[BLOCK_TENSORS[inner]].format(bid=int(block))
        expected[f"{target}.weight"] = tensor.float().numpy()
    return expected


def read(path) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a GGUF file; tensors as ``(type name, transformers-order shape, data)``
    with q/k rows put back in transformers' order (quantized data stay bytes)."""
    reader = gguf.GGUFReader(path)
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    heads = metadata["llama.attention.head_count"], metadata["llama.attention.head_count_kv"]
    tensors = {}
    for tensor in reader.tensors:
        data, shape = np.array(tensor.data), tuple(int(n) for n in reversed(tensor.shape))
        if tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            data = gguf.quants.dequantize(data, tensor.tensor_type)
        if tensor.name.endswith((".attn_q.weight", ".attn_k.weight")):
            data = unpermute_for_rope(data, heads[0] if ".attn_q." in tensor.name else heads[1])
        tensors[tensor.name] = (tensor.tensor_type.name, shape, data)
    return metadata, tensors


def export(model_dir, tmp_path, type: str, name: str | None = None):
    output = tmp_path / "out" / (name or f"model-{type}.gguf")
    report = export_gguf(model_dir, output, type)
    return output, report


@pytest.mark.parametrize("type", ["f32", "f16"])
def test_every_tensor_and_hyperparameter_is_the_checkpoints(model_dir, random_model, tmp_path, type):
    """f32 holds the checkpoint bit for bit, f16 the checkpoint cast to f16; norms stay f32; the tied
    embedding is written once (no output.weight)."""
    output, report = export(model_dir, tmp_path, type)
    metadata, tensors = read(output)
    expected = expected_tensors(random_model)
    assert len(expected) == 2 * 9 + 2 and "output.weight" not in expected
    assert sorted(tensors) == sorted(expected) and report.tensors == len(expected)
    for name, want in expected.items():
        kind, shape, data = tensors[name]
        assert shape == want.shape, name
        if want.ndim == 1 or type == "f32":
            assert kind == "F32" and np.array_equal(data, want), name
        else:
            assert kind == "F16" and np.array_equal(data, want.astype(np.float16)), name
    config = random_model.config
    assert metadata["general.architecture"] == "llama"
    assert metadata["general.file_type"] == {"f32": 0, "f16": 1}[type]
    assert metadata["llama.block_count"] == config.num_hidden_layers == 2
    assert metadata["llama.embedding_length"] == config.hidden_size == 32
    assert metadata["llama.feed_forward_length"] == config.intermediate_size
    assert metadata["llama.attention.head_count"] == config.num_attention_heads == 4
    assert metadata["llama.attention.head_count_kv"] == config.num_key_value_heads == 2
    assert metadata["llama.context_length"] == config.max_position_embeddings == 128
    assert metadata["llama.rope.dimension_count"] == 8
    assert metadata["llama.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert metadata["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps, rel=1e-6)
    assert metadata["llama.vocab_size"] == config.vocab_size


def test_the_tokenizer_travels_whole(model_dir, tokenizer, tmp_path):
    output, _ = export(model_dir, tmp_path, "f16")
    metadata, _ = read(output)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    assert metadata["tokenizer.ggml.pre"] == "smollm"  # digits one by one, then GPT-2's regex
    assert metadata["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert metadata["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges] and len(merges) > 0
    special = set(tokenizer.all_special_ids)
    assert metadata["tokenizer.ggml.token_type"] == [3 if i in special else 1 for i in range(len(tokenizer))]
    assert tokenizer.bos_token_id is None and "tokenizer.ggml.bos_token_id" not in metadata
    assert metadata["tokenizer.ggml.add_bos_token"] is False  # the tokenizer prepends nothing; nor may llama.cpp
    assert metadata["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert metadata["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert metadata["tokenizer.chat_template"] == tokenizer.chat_template


@pytest.fixture
def untied_model_dir(tokenizer, tmp_path):
    """An untied Llama with 10 embedding rows beyond the tokenizer, whose tokenizer has a BOS token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with_bos = copy.deepcopy(tokenizer)
    with_bos.bos_token = "<|endoftext|>"
    config = LlamaConfig(vocab_size=len(tokenizer) + 10, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=with_bos.bos_token_id)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    path = tmp_path / "untied"
    model.save_pretrained(path)
    with_bos.save_pretrained(path)
    return path, model, with_bos


def test_untied_embeddings_write_output_and_spare_rows_become_unused_tokens(untied_model_dir, tmp_path):
    path, model, with_bos = untied_model_dir
    output, report = export(path, tmp_path, "f32")
    metadata, tensors = read(output)
    assert np.array_equal(tensors["output.weight"][2], model.lm_head.weight.detach().numpy())
    assert report.tensors == 2 * 9 + 3
    tokens, types, size = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"], len(with_bos)
    assert len(tokens) == model.config.vocab_size == size + 10
    assert tokens[size:] == [f"[PAD{i}]" for i in range(size, size + 10)] and set(types[size:]) == {5}
    assert metadata["tokenizer.ggml.bos_token_id"] == with_bos.bos_token_id == 1
    assert metadata["tokenizer.ggml.add_bos_token"] is False  # it has a BOS, but does not add it


def test_q8_0_is_within_its_error_bound_and_smaller_than_f16(model_dir, random_model, tmp_path):
    """Q8_0 stores blocks of 32 values as int8 times one f16 scale ``d = max|x| / 127``: each value is off
    by at most half a step, ``d / 2``, plus the scale's own f16 rounding (2^-11 relative) times 127 steps."""
    q8, report = export(model_dir, tmp_path, "q8_0")
    f16, _ = export(model_dir, tmp_path, "f16")
    _, tensors = read(q8)
    for name, want in expected_tensors(random_model).items():
        kind, shape, data = tensors[name]
        assert shape == want.shape, name
        if want.ndim == 1:
            assert kind == "F32" and np.array_equal(data, want), name
            continue
        assert kind == "Q8_0", name
        blocks, got = want.reshape(-1, 32), data.reshape(-1, 32)
        bound = np.abs(blocks).max(axis=1, keepdims=True) / 127 * (0.5 + 127 * 2.0 ** -11) + 1e-12
        assert (np.abs(got - blocks) <= bound).all(), name
        assert not np.array_equal(got, blocks), name  # it was quantized
    assert report.kept_f16 == ()
    assert q8.stat().st_size < 0.65 * f16.stat().st_size
    assert gguf.GGUFReader(q8).fields["general.file_type"].contents() == 7


def test_the_permuted_rows_give_llama_cpps_rope_transformers_attention_scores():
    """transformers rotates dimension i of a head with i + d/2 (rotate_half); llama.cpp's llama rope rotates 2i
    with 2i + 1. With permute_for_rope's rows, llama.cpp's q.k at every pair of positions is transformers'."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    heads, kv_heads, head_dim, hidden, positions = 4, 2, 8, 16, 6
    wq, wk, x = torch.randn(heads * head_dim, hidden), torch.randn(kv_heads * head_dim, hidden), torch.randn(positions, hidden)
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(positions).float()[:, None] * inv_freq  # (positions, head_dim / 2)

    def split(w, n):  # (positions, n, head_dim)
        return (x @ w.T).reshape(positions, n, head_dim)

    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (positions, head_dim)
    q_hf, k_hf = apply_rotary_pos_emb(split(wq, heads), split(wk, kv_heads), cos, sin, unsqueeze_dim=1)

    def ggml_rope(v):  # adjacent pairs (2i, 2i + 1) by angle i, as ggml's normal rope mode
        even, odd = v[..., 0::2], v[..., 1::2]
        c, s = angles.cos()[:, None], angles.sin()[:, None]
        return torch.stack([even * c - odd * s, even * s + odd * c], -1).flatten(-2)

    permuted_q = torch.from_numpy(permute_for_rope(wq.numpy(), heads))
    permuted_k = torch.from_numpy(permute_for_rope(wk.numpy(), kv_heads))
    q_cpp, k_cpp = ggml_rope(split(permuted_q, heads)), ggml_rope(split(permuted_k, kv_heads))
    group = heads // kv_heads  # grouped-query attention: q head h reads kv head h // group
    for h in range(heads):
        hf = q_hf[:, h] @ k_hf[:, h // group].T
        cpp = q_cpp[:, h] @ k_cpp[:, h // group].T
        torch.testing.assert_close(cpp, hf, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ggml_rope(split(wq, heads))[:, 0] @ ggml_rope(split(wk, kv_heads))[:, 0].T,
                              q_hf[:, 0] @ k_hf[:, 0].T, atol=1e-3)  # without the permutation they differ
    assert np.array_equal(unpermute_for_rope(permute_for_rope(wq.numpy(), heads), heads), wq.numpy())


def test_llama3_rope_factors_are_transformers_frequency_divisors(random_model):
    """Llama 3.1's rope as llama.cpp reads it: a rope_freqs tensor of divisors, transformers' default inverse
    frequencies over its llama3 ones; written first."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters=dict(rope))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64)
    factors = llama3_rope_factors(rope, head_dim=64)
    np.testing.assert_allclose(factors, (default / scaled).numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 32.0
    config = {**random_model.config.to_dict(), "rope_parameters": rope}
    tensors = gguf_tensors({k: v.numpy() for k, v in random_model.state_dict().items()}, llama_hyperparameters(config))
    assert next(iter(tensors)) == "rope_freqs.weight" and tensors["rope_freqs.weight"].shape == (4,)


def test_llama_cpp_computes_the_checkpoints_logits(model_dir, random_model, tokenizer, tmp_path):
    """llama.cpp itself loads the f32 file, splits a chat turn into the tokenizer's ids and computes
    transformers' logits at every position (its KV cache kept at f32, ggml type 0). Runs where
    llama-cpp-python is installed; it is no extra of polm, as pip builds llama.cpp from source for it."""
    llama_cpp = pytest.importorskip("llama_cpp")
    output, _ = export(model_dir, tmp_path, "f32")
    text = "<|user|>\nWhat is 12 + 7?<|end|>\n<|assistant|>\nThe sum of 12 and 7 is 19.<|end|>\n"
    ids = tokenizer(text)["input_ids"]
    llm = llama_cpp.Llama(str(output), n_ctx=64, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0)
    try:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        want = random_model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


@pytest.mark.parametrize("pre, clean, name", [
    (BYTE_LEVEL, True, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}, False,
     "smollm"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}, True,
     "starcoder"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                                               r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
         "behavior": "Isolated", "invert": False},
        {**BYTE_LEVEL, "use_regex": False}]}, False, "llama-bpe"),
    ({"type": "Metaspace", "replacement": "▁"}, False, None),
    ({**BYTE_LEVEL, "add_prefix_space": True}, False, None),
])
def test_pre_tokenizers_map_to_llama_cpps_names_or_are_refused(pre, clean, name):
    tokenizer_json = {"model": {"type": "BPE", "byte_fallback": False}, "normalizer": None, "pre_tokenizer": pre}
    if name is None:
        with pytest.raises(PolmError, match="has no llama.cpp counterpart"):
            pre_tokenizer_name(tokenizer_json, clean)
    else:
        assert pre_tokenizer_name(tokenizer_json, clean) == name


def test_a_sentencepiece_style_tokenizer_is_refused():
    tokenizer_json = {"model": {"type": "BPE", "byte_fallback": True}, "normalizer": None, "pre_tokenizer": None}
    with pytest.raises(PolmError, match="byte fallback"):
        pre_tokenizer_name(tokenizer_json)


def test_the_command_writes_the_file(model_dir, tmp_path, capsys):
    output = tmp_path / "exports" / "tiny.gguf"
    assert main(["export", str(model_dir), "--format", "gguf", "--output", str(output), "--type", "q8_0"]) == 0
    assert f"wrote {output} (q8_0, 20 tensors" in capsys.readouterr().out
    assert gguf.GGUFReader(output).fields["general.file_type"].contents() == 7
    assert sorted(p.name for p in output.parent.iterdir()) == ["tiny.gguf"]  # no temporary file left


def _refused(capsys, argv: list[str], message: str) -> None:
    capsys.readouterr()  # what the test's own saving printed
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("polm: error: ") and error.count("\n") == 1 and message in error, error


def test_a_gpt2_model_is_refused_naming_its_type_and_nothing_is_written(tokenizer, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "out"
    _refused(capsys, ["export", str(tmp_path / "gpt2"), "--output", str(out / "m.gguf")],
             "model_type 'gpt2' cannot be exported to GGUF: Llama-architecture models")
    assert not out.exists()


def test_an_existing_output_is_kept_unless_overwrite(model_dir, tmp_path, capsys):
    output = tmp_path / "m.gguf"
    output.write_text("the user's file")
    _refused(capsys, ["export", str(model_dir), "--output", str(output)], "exists; pass --overwrite")
    assert output.read_text() == "the user's file"
    assert main(["export", str(model_dir), "--output", str(output), "--overwrite"]) == 0
    assert gguf.GGUFReader(output).fields["general.file_type"].contents() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model"]


@pytest.mark.parametrize("argv, message", [
    (["--type", "q4_0"], "unknown --type 'q4_0'; choose f32, f16, q8_0"),
    (["--format", "onnx"], "unknown --format 'onnx'; choose gguf"),
])
def test_an_unknown_type_or_format_is_refused(model_dir, tmp_path, capsys, argv, message):
    _refused(capsys, ["export", str(model_dir), "--output", str(tmp_path / "m.gguf"), *argv], message)
    assert not (tmp_path / "m.gguf").exists()


def test_a_folder_without_model_or_tokenizer_or_with_an_unknown_tensor_is_refused(model_dir, random_model,
                                                                                   tmp_path, capsys):
    output = tmp_path / "out" / "m.gguf"
    (tmp_path / "empty").mkdir()
    _refused(capsys, ["export", str(tmp_path / "empty"), "--output", str(output)], "is not a model folder")
    random_model.save_pretrained(tmp_path / "no-tokenizer")
    _refused(capsys, ["export", str(tmp_path / "no-tokenizer"), "--output", str(output)], "has no tokenizer.json")
    weights = load_file(model_dir / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    _refused(capsys, ["export", str(model_dir), "--output", str(output)],
             "unsupported tensor 'model.layers.0.self_attn.q_proj.bias'")
    assert not output.parent.exists()


def test_without_the_gguf_package_the_error_says_what_to_install(model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(PolmError, match=r"pip install 'polm\[export\]'"):
        export_gguf(model_dir, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


def test_q8_0_keeps_matrices_with_partial_blocks_at_f16(tokenizer, tmp_path):
    """A hidden size of 48 is one and a half Q8_0 blocks a row: such matrices are written as f16, and named."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=True)
    path, model = tmp_path / "odd", LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    output, report = export(path, tmp_path, "q8_0")
    _, tensors = read(output)
    assert report.kept_f16 == ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
                               "blk.0.attn_v.weight", "blk.0.attn_output.weight", "blk.0.ffn_gate.weight",
                               "blk.0.ffn_up.weight")
    assert {tensors[name][0] for name in report.kept_f16} == {"F16"}
    assert tensors["blk.0.ffn_down.weight"][0] == "Q8_0"  # rows of 64
    assert report.parameters == sum(p.numel() for p in model.parameters())  # the tied embedding once
