"""GGUF export: a Llama-architecture checkpoint as one file that llama.cpp loads.

A GGUF file is key-value metadata followed by named tensors. What llama.cpp expects of a ``llama`` model:

- tensor names: ``token_embd``, ``blk.N.attn_norm`` / ``attn_q`` / ``attn_k`` / ``attn_v`` / ``attn_output`` /
  ``ffn_norm`` / ``ffn_gate`` / ``ffn_up`` / ``ffn_down``, ``output_norm`` and ``output`` (each ``.weight``),
  mapped one to one from transformers' names (:func:`gguf_tensor_name`); ``output`` is left out when the
  embeddings are tied, and llama.cpp then reuses ``token_embd``.
- a transformers ``(out, in)`` weight is written as it is: GGUF lists dimensions innermost first, so the same
  bytes read there as ``ne = [in, out]``, one row per output feature, which is the layout llama.cpp multiplies.
- the rows of ``attn_q`` and ``attn_k`` reordered for llama.cpp's rotary embedding (:func:`permute_for_rope`).
- the hyperparameters as ``llama.*`` keys (:func:`llama_hyperparameters`) and a byte-level BPE tokenizer as
  ``tokenizer.ggml.*`` keys with the chat template (:func:`gguf_vocab`).

Types: ``f32``, ``f16`` and ``q8_0`` (blocks of 32 values sharing one f16 scale, 8.5 bits a value) apply to the
matrices; norms and other 1-D tensors stay f32 at every type, as llama.cpp's own converter keeps them (they
are small, and llama.cpp reads them as f32). A matrix whose rows are not a multiple of 32 values cannot be
Q8_0 and is written as f16 instead (the report names them).

The ``gguf`` package (extra ``export``) is imported only when a file is written; the functions that map names,
permute rows and read the config and the tokenizer need neither it nor llama.cpp.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polm.engine.errors import PolmError, did_you_mean
from polm.engine.models import stage_model_folder

FORMATS = ("gguf",)
TYPES = ("f32", "f16", "q8_0")
#: transformers' ``model_type`` values converted as llama.cpp's ``llama`` architecture.
MODEL_TYPES = ("llama",)
ARCHITECTURE = "llama"
INSTALL_HINT = "pip install 'polm[export]'"
#: Values per Q8_0 block: a row must hold a whole number of them.
Q8_0_BLOCK = 32
#: The rope types written as llama.cpp reads them; others (yarn, dynamic, longrope) are refused.
ROPE_TYPES = ("default", "linear", "llama3")

_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_BLOCK_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
#: A buffer older transformers saved; llama.cpp computes the rotary frequencies itself.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

#: Llama 3's pre-tokenizer regex, as its tokenizer.json holds it (llama.cpp's ``llama-bpe``).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# GGUF token types (gguf.TokenType), here so that reading a tokenizer needs no gguf.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def gguf_tensor_name(name: str) -> str | None:
    """The GGUF name of a transformers Llama tensor, or None for one llama.cpp does without.

    >>> gguf_tensor_name("model.layers.3.self_attn.q_proj.weight"), gguf_tensor_name("lm_head.weight")
    ('blk.3.attn_q.weight', 'output.weight')

    Raises:
        PolmError: a tensor with no GGUF counterpart (a bias, an adapter's weight), named.
    """
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    if _IGNORED.fullmatch(name):
        return None
    block = _BLOCK_NAME.fullmatch(name)
    if block and block.group(2) in _BLOCK_TENSORS:
        return f"blk.{block.group(1)}.{_BLOCK_TENSORS[block.group(2)]}"
    raise PolmError(f"unsupported tensor '{name}': it has no counterpart in llama.cpp's llama architecture "
                    "(a Llama-architecture checkpoint holds embeddings, attention and MLP weights and RMS norms, "
                    "without biases)")


def permute_for_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection for llama.cpp's rotary embedding.

    transformers rotates the two halves of each head against each other (``rotate_half``: dimension ``i``
    pairs with ``i + head_dim / 2``); llama.cpp's ``llama`` rope rotates adjacent dimensions (``2i`` with
    ``2i + 1``) by the same angle. Interleaving each head's halves, rows ``[0, d/2, 1, d/2 + 1, ...]`` of the
    head, makes the two compute the same attention scores.

    Args:
        weight: (heads * head_dim, hidden) q_proj weight (``heads`` = attention heads) or k_proj weight
            (``heads`` = key-value heads); a (heads * head_dim,) bias works too.
        heads: the number of heads stacked in ``weight``'s rows.

    Returns:
        An array of the same shape with each head's rows interleaved.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_for_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`permute_for_rope`: llama.cpp's row order back to transformers'."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class LlamaHyperparameters:
    """What llama.cpp needs of a Llama config, read by :func:`llama_hyperparameters`."""

    vocab_size: int
    context_length: int
    embedding_length: int
    block_count: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope: Mapping[str, Any]
    tied_embeddings: bool

    @property
    def rope_type(self) -> str:
        return self.rope.get("rope_type", "default")


def llama_hyperparameters(config: Mapping[str, Any]) -> LlamaHyperparameters:
    """The hyperparameters of a transformers Llama ``config.json`` (as a dict).

    Both config layouts are read: transformers 5's ``rope_parameters`` and the older ``rope_theta`` with
    ``rope_scaling``.

    Raises:
        PolmError: a model type other than Llama, or a Llama variant llama.cpp's ``llama`` architecture
            does not compute (another activation, biases, partial or yarn/dynamic rope), named.
    """
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise PolmError(f"model_type '{model_type}' cannot be exported to GGUF: Llama-architecture models "
                        f"(model_type {', '.join(repr(t) for t in MODEL_TYPES)}) are supported")
    for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, expected) != expected:
            raise PolmError(f"this Llama config has {key}={config[key]!r}; llama.cpp's llama architecture "
                            f"computes {key}={expected!r}")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise PolmError(f"rope_type '{rope['rope_type']}' cannot be exported; supported: {', '.join(ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise PolmError(f"partial_rotary_factor {rope['partial_rotary_factor']} cannot be exported: llama.cpp's "
                        "llama architecture rotates whole heads")
    missing = [key for key in ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers",
                               "intermediate_size", "num_attention_heads") if key not in config]
    if missing:
        raise PolmError(f"config.json lacks {', '.join(repr(key) for key in missing)}, which a Llama config holds")
    heads = config["num_attention_heads"]
    return LlamaHyperparameters(
        vocab_size=config["vocab_size"],
        context_length=config["max_position_embeddings"],
        embedding_length=config["hidden_size"],
        block_count=config["num_hidden_layers"],
        feed_forward_length=config["intermediate_size"],
        head_count=heads,
        head_count_kv=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", 10000.0),
        rope=rope,
        # LlamaConfig's default: a config that does not say unties them.
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config.get("rope_parameters"), Mapping):
        rope = dict(config["rope_parameters"])
    else:
        rope = dict(config.get("rope_scaling") or {})
        if "type" in rope:  # the oldest spelling of rope_type
            rope.setdefault("rope_type", rope.pop("type"))
        if "rope_theta" in config:
            rope["rope_theta"] = config["rope_theta"]
    rope.setdefault("rope_type", "default")
    return rope


def llama3_rope_factors(rope: Mapping[str, Any], head_dim: int) -> np.ndarray:
    """The per-frequency divisors of Llama 3.1's rope scaling, as llama.cpp's ``rope_freqs`` tensor.

    Llama 3.1 keeps the high frequencies, divides the low ones (wavelengths beyond
    ``original_max_position_embeddings / low_freq_factor``) by ``factor`` and blends in between; llama.cpp
    divides each of the ``head_dim / 2`` rotary frequencies by the value here.

    Returns:
        (head_dim / 2,) float32 divisors, 1 for the kept frequencies and ``factor`` for the scaled ones.
    """
    factor, low, high = (rope.get(key, default) for key, default in
                         (("factor", 8.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0)))
    original = rope.get("original_max_position_embeddings", 8192)
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    frequencies = 1.0 / rope.get("rope_theta", 10000.0) ** exponents
    divisors = []
    for frequency in frequencies:
        wavelength = 2 * math.pi / frequency
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors, dtype=np.float32)


def expected_shapes(hp: LlamaHyperparameters) -> dict[str, tuple[int, ...]]:
    """The shape (in transformers' order) of every GGUF tensor of a model with these hyperparameters, in the
    order llama.cpp's converter writes them: ``token_embd``, the blocks, ``output_norm``, ``output``."""
    hidden, ff = hp.embedding_length, hp.feed_forward_length
    q, kv = hp.head_count * hp.head_dim, hp.head_count_kv * hp.head_dim
    block = {"attn_norm.weight": (hidden,), "attn_q.weight": (q, hidden), "attn_k.weight": (kv, hidden),
             "attn_v.weight": (kv, hidden), "attn_output.weight": (hidden, q), "ffn_norm.weight": (hidden,),
             "ffn_gate.weight": (ff, hidden), "ffn_up.weight": (ff, hidden), "ffn_down.weight": (hidden, ff)}
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (hp.vocab_size, hidden)}
    for index in range(hp.block_count):
        shapes.update({f"blk.{index}.{name}": shape for name, shape in block.items()})
    shapes["output_norm.weight"] = (hidden,)
    if not hp.tied_embeddings:
        shapes["output.weight"] = (hp.vocab_size, hidden)
    return shapes


def gguf_tensors(tensors: Mapping[str, np.ndarray], hp: LlamaHyperparameters) -> dict[str, np.ndarray]:
    """The checkpoint's tensors under their GGUF names, q and k permuted, in llama.cpp's order.

    Args:
        tensors: transformers name -> array, as the checkpoint holds them.
        hp: the config's hyperparameters.

    Returns:
        GGUF name -> float32 array: ``rope_freqs`` first for Llama 3.1 rope, then ``token_embd``, the blocks in
        order, ``output_norm`` and ``output`` (absent with tied embeddings: an ``lm_head.weight`` a tied
        checkpoint holds anyway is the embedding again and is dropped).

    Raises:
        PolmError: an unsupported tensor, a missing one, or one whose shape disagrees with the config.
    """
    mapped: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        target = gguf_tensor_name(name)
        if target is None or (target == "output.weight" and hp.tied_embeddings):
            continue
        array = np.asarray(array, dtype=np.float32)
        if target.endswith(".attn_q.weight"):
            array = permute_for_rope(array, hp.head_count)
        elif target.endswith(".attn_k.weight"):
            array = permute_for_rope(array, hp.head_count_kv)
        mapped[target] = array
    shapes = expected_shapes(hp)
    missing = [name for name in shapes if name not in mapped]
    if missing:
        raise PolmError(f"the checkpoint lacks {len(missing)} tensor(s) the config implies, first '{missing[0]}' "
                        "(GGUF name); is it a complete model, and does config.json belong to it?")
    for name, shape in shapes.items():
        if mapped[name].shape != shape:
            raise PolmError(f"tensor '{name}' has shape {tuple(mapped[name].shape)}, but config.json implies "
                            f"{shape}")
    extra = sorted(set(mapped) - set(shapes))
    if extra:  # a layer beyond num_hidden_layers
        raise PolmError(f"tensor '{extra[0]}' (GGUF name) is beyond the config's {hp.block_count} layers")
    ordered = {"rope_freqs.weight": llama3_rope_factors(hp.rope, hp.head_dim)} if hp.rope_type == "llama3" else {}
    ordered.update((name, mapped[name]) for name in shapes)
    return ordered


@dataclass(frozen=True)
class GgufVocab:
    """A byte-level BPE tokenizer as llama.cpp's ``tokenizer.ggml.*`` keys (model ``gpt2``).

    Attributes:
        pre: llama.cpp's name for the pre-tokenizer (how text is split before the merges).
        tokens: every token's string, in id order, one per embedding row.
        token_types: GGUF token types: 1 normal, 3 control (special added tokens), 4 user-defined (other added
            tokens), 5 unused (rows of the embedding beyond the tokenizer's vocabulary).
        merges: the BPE merges in rank order, as ``"left right"``.
        bos_id, eos_id, pad_id, unk_id: special token ids, None where the tokenizer has none.
        add_bos, add_eos: whether encoding a text adds them, as the tokenizer does.
        chat_template: the Jinja chat template, or None.
    """

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | list[dict[str, str]] | None


def pre_tokenizer_name(tokenizer_json: Mapping[str, Any], clean_up_spaces: bool = False) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizer.json whose splitting it reproduces.

    Known: byte-level BPE with GPT-2's regex (``gpt-2``); digits split one by one before it, as polm-tiny,
    SmolLM and StarCoder do (``smollm``, which llama.cpp detokenizes without cleaning spaces, or ``starcoder``,
    which cleans them, after the tokenizer's ``clean_up_tokenization_spaces``); Llama 3's regex
    (``llama-bpe``).

    Raises:
        PolmError: a tokenizer llama.cpp would split differently (a normalizer, another regex, SentencePiece).
    """
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        fallback = " with byte fallback (SentencePiece style)" if model.get("byte_fallback") else ""
        raise PolmError(f"the tokenizer is a {model.get('type')} model{fallback}; GGUF export supports "
                        "byte-level BPE tokenizers (GPT-2 style)")
    if tokenizer_json.get("normalizer") is not None:
        raise PolmError(f"the tokenizer normalizes text ({_describe(tokenizer_json['normalizer'])}), which "
                        "llama.cpp's BPE tokenizer does not; GGUF export supports byte-level BPE without a "
                        "normalizer")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(parts) == 1 and _gpt2_byte_level(parts[0]):
        return "gpt-2"
    if len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") \
            and _gpt2_byte_level(parts[1]):
        return "starcoder" if clean_up_spaces else "smollm"
    if len(parts) == 2 and parts[0].get("type") == "Split" and (parts[0].get("pattern") or {}).get("Regex") \
            == LLAMA3_PATTERN and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert") \
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True) \
            and not parts[1].get("add_prefix_space"):
        return "llama-bpe"
    raise PolmError(f"the tokenizer's pre-tokenizer ({_describe(pre)}) has no llama.cpp counterpart polm knows; "
                    "supported: byte-level BPE with GPT-2's regex, with digits split first (polm-tiny, SmolLM), "
                    "or with Llama 3's regex")


def _gpt2_byte_level(pre: Mapping[str, Any]) -> bool:
    # llama.cpp never adds a prefix space to a BPE text, so a tokenizer that does would not match.
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")


def _describe(node: Mapping[str, Any] | None) -> str:
    if not node:
        return "none"
    inner = node.get("pretokenizers") or node.get("normalizers")
    if not inner:
        return str(node.get("type"))
    return f"{node.get('type')}[{', '.join(_describe(part) for part in inner)}]"


def gguf_vocab(tokenizer: Any, tokenizer_json: Mapping[str, Any], vocab_size: int) -> GgufVocab:
    """The tokenizer as GGUF keys, padded to the model's ``vocab_size`` embedding rows.

    Args:
        tokenizer: the checkpoint's transformers tokenizer (ids, special tokens, chat template).
        tokenizer_json: its tokenizer.json (merges and pre-tokenizer).
        vocab_size: the embedding's rows; llama.cpp wants exactly one token per row, so rows beyond the
            tokenizer (vocabularies padded to a multiple of 64, say) get ``[PADn]`` tokens of type unused.

    Raises:
        PolmError: a tokenizer llama.cpp would split differently (:func:`pre_tokenizer_name`), or one with more
            tokens than the model has embedding rows.
    """
    pre = pre_tokenizer_name(tokenizer_json, bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)))
    if len(tokenizer) > vocab_size:
        raise PolmError(f"the tokenizer has {len(tokenizer)} tokens and the model {vocab_size} embedding rows; "
                        "a token without a row cannot be exported (is it the model's tokenizer?)")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = tokenizer.convert_ids_to_tokens(index) if index < len(tokenizer) else None
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        else:
            tokens.append(token)
            types.append((CONTROL if added[index].special else USER_DEFINED) if index in added else NORMAL)
    # tokenizers writes a merge as a pair (since 0.20) or as "left right" (before); GGUF as the latter.
    merges = [merge if isinstance(merge, str) else " ".join(merge)
              for merge in tokenizer_json["model"].get("merges", [])]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    # What encoding adds is the post-processor's business; ask it rather than read its configuration.
    plain, special = (tokenizer("a", add_special_tokens=flag)["input_ids"] for flag in (False, True))
    grew = len(special) > len(plain)
    template = tokenizer.chat_template
    if isinstance(template, Mapping):  # several named templates, as GGUF lists them
        template = [{"name": name, "template": text} for name, text in template.items()]
    return GgufVocab(pre=pre, tokens=tokens, token_types=types, merges=merges, bos_id=bos, eos_id=eos,
                     pad_id=tokenizer.pad_token_id, unk_id=tokenizer.unk_token_id,
                     add_bos=grew and bos is not None and special[0] == bos,
                     add_eos=grew and eos is not None and special[-1] == eos, chat_template=template or None)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_gguf` wrote.

    Attributes:
        output: the GGUF file.
        type: the matrices' type (f32, f16, q8_0).
        tensors: how many tensors the file holds.
        parameters: their values in all.
        bytes: the file's size.
        kept_f16: with q8_0, the matrices written as f16 because their rows are not whole Q8_0 blocks.
    """

    output: Path
    type: str
    tensors: int
    parameters: int
    bytes: int
    kept_f16: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for the command line."""
        kept = f"; {len(self.kept_f16)} kept at f16 (rows not whole Q8_0 blocks)" if self.kept_f16 else ""
        return (f"wrote {self.output} ({self.type}, {self.tensors} tensors, {self.parameters:,} parameters, "
                f"{self.bytes / 1e6:.2f} MB){kept}")


def export_gguf(checkpoint: Path, output: Path, type: str = "f16", overwrite: bool = False) -> ExportReport:
    """Write a Llama-architecture checkpoint and its tokenizer as a GGUF file for llama.cpp.

    Everything is read and checked before anything is written; the file is written to a temporary file beside
    ``output`` and renamed into place at the end, so a failed export leaves nothing behind.

    Args:
        checkpoint: a model folder (``save_pretrained`` of a Llama causal LM, safetensors, and its tokenizer),
            or a run's stage folder, whose ``final/`` is used.
        output: the file to write.
        type: the matrices' type: ``f32``, ``f16`` or ``q8_0``; 1-D tensors stay f32.
        overwrite: replace an existing ``output`` (otherwise refused).

    Returns:
        What was written.

    Raises:
        PolmError: the gguf package missing, an unknown type, an existing output, a folder that is not a
            model, a model that is not Llama-architecture, an unsupported tensor, a missing or unsupported
            tokenizer.
    """
    gguf = _import_gguf()
    if type not in TYPES:
        raise PolmError(f"unknown --type '{type}'; choose {', '.join(TYPES)}.{did_you_mean(type, TYPES)}")
    output = Path(output)
    if output.is_dir():
        raise PolmError(f"--output {output} is a folder; name the .gguf file to write")
    if output.exists() and not overwrite:
        raise PolmError(f"{output} exists; pass --overwrite to replace it")
    folder = _model_folder(Path(checkpoint))
    hp = llama_hyperparameters(json.loads((folder / "config.json").read_text()))
    tensors = gguf_tensors(_read_safetensors(folder), hp)
    vocab = gguf_vocab(*_read_tokenizer(folder), vocab_size=tensors["token_embd.weight"].shape[0])
    name = folder.parent.name if folder.name == "final" else folder.name

    kept_f16: list[str] = []

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(path, ARCHITECTURE)
        try:
            _add_metadata(writer, gguf, hp, vocab, name, type)
            for tensor_name, array in tensors.items():
                data, raw_type = _encode(gguf, array, type)
                if type == "q8_0" and array.ndim > 1 and raw_type != gguf.GGMLQuantizationType.Q8_0:
                    kept_f16.append(tensor_name)
                writer.add_tensor(tensor_name, data, raw_dtype=raw_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    _write_atomically(output, overwrite, write)
    return ExportReport(output=output, type=type, tensors=len(tensors),
                        parameters=sum(array.size for array in tensors.values()), bytes=output.stat().st_size,
                        kept_f16=tuple(kept_f16))


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise PolmError(f"GGUF export needs the gguf package: {INSTALL_HINT}") from None
    return gguf


def _model_folder(checkpoint: Path) -> Path:
    if not checkpoint.is_dir():
        raise PolmError(f"{checkpoint} is not a folder; give a model folder (save_pretrained) or a run's stage "
                        "folder")
    checkpoint = stage_model_folder(checkpoint)
    if not (checkpoint / "config.json").is_file():
        if (checkpoint / "adapter_config.json").is_file():
            raise PolmError(f"{checkpoint} holds a peft adapter, not a whole model; export the merged model "
                            "(a stage's final/merged, or merge_and_unload and save_pretrained)")
        raise PolmError(f"{checkpoint} is not a model folder: it has no config.json")
    return checkpoint


def _read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors file(s) (sharded ones through their index) as float32."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise PolmError(f"{folder} has no model.safetensors; save the model with save_pretrained (safetensors)")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        # torch reads bf16, which numpy cannot; every type converts exactly to float32.
        with safe_open(folder / file, framework="pt") as shard:
            names = shard.keys()
            for key in names:
                tensors[key] = shard.get_tensor(key).float().numpy()
    return tensors


def _read_tokenizer(folder: Path) -> tuple[Any, dict[str, Any]]:
    if not (folder / "tokenizer.json").is_file():
        sentencepiece = (folder / "tokenizer.model").is_file()
        found = " (a SentencePiece tokenizer.model, which is not supported)" if sentencepiece else ""
        raise PolmError(f"{folder} has no tokenizer.json{found}; GGUF files carry the tokenizer, so save it with "
                        "the model (tokenizer.save_pretrained)")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise PolmError(f"could not load the tokenizer of {folder}: {str(error).splitlines()[0]}") from None
    return tokenizer, json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))


def _add_metadata(writer: Any, gguf: Any, hp: LlamaHyperparameters, vocab: GgufVocab, name: str,
                  type: str) -> None:
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    writer.add_file_type(file_types[type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.embedding_length)
    writer.add_block_count(hp.block_count)
    writer.add_feed_forward_length(hp.feed_forward_length)
    writer.add_head_count(hp.head_count)
    writer.add_head_count_kv(hp.head_count_kv)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.embedding_length // hp.head_count:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_norm_eps)
    if hp.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp.rope["factor"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for add, value in ((writer.add_bos_token_id, vocab.bos_id), (writer.add_eos_token_id, vocab.eos_id),
                       (writer.add_pad_token_id, vocab.pad_id), (writer.add_unk_token_id, vocab.unk_id)):
        if value is not None:
            add(value)
    # Written even when false: llama.cpp's defaults for some pre-tokenizers add a BOS the tokenizer never did.
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _encode(gguf: Any, array: np.ndarray, type: str) -> tuple[np.ndarray, Any]:
    """``array`` as the bytes of its GGUF type, and that type."""
    kinds = gguf.GGMLQuantizationType
    if array.ndim == 1 or type == "f32":
        return array.astype(np.float32), kinds.F32
    if type == "q8_0" and array.shape[-1] % Q8_0_BLOCK == 0:
        return gguf.quants.quantize(array, kinds.Q8_0), kinds.Q8_0
    return array.astype(np.float16), kinds.F16


def _write_atomically(output: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``output``, flush it to disk, and move it into place; on any failure
    the temporary file is removed (and a folder made for it, if empty)."""
    made = [parent for parent in (output.parent, *output.parent.parents) if not parent.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    # Created exclusively, and under the umask (a tempfile.mkstemp file would stay readable by its owner only).
    temporary = output.with_name(f".{output.name}.{uuid.uuid4().hex[:12]}.tmp")
    temporary.touch(exist_ok=False)
    try:
        write(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        if overwrite:
            os.replace(temporary, output)
        else:
            # A hard link fails if a file of that name appeared meanwhile, where a rename would replace it.
            try:
                os.link(temporary, output)
            except FileExistsError:
                raise PolmError(f"{output} exists; pass --overwrite to replace it") from None
            except OSError:  # a file system without hard links: check again, then rename
                if output.exists():
                    raise PolmError(f"{output} exists; pass --overwrite to replace it") from None
                os.replace(temporary, output)
            temporary.unlink(missing_ok=True)
    except BaseException:
        temporary.unlink(missing_ok=True)
        for parent in made:  # innermost first
            _remove_if_empty(parent)
        raise


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass

