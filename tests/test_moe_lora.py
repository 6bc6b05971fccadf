"""LoRA on the mixture-of-experts families transformers ships, one rule for all of them.

transformers keeps a block's routed experts as one ``experts`` module with fused 3-d weights
(``gate_up_proj``: (E, 2I, H), ``down_proj``: (E, H, I)); its router is a custom module or, for
Qwen2-MoE's shared-expert gate, a Linear. polm's default adapts attention and the routed experts, never
a router, and leaves the shared experts out (see ``default_lora_targets``).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

import polm
from polm.engine.plugins import registry

#: Tiny configs: hidden 32, one layer, 4 experts of which 2 per token.
MOE_FAMILIES = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 16},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                    "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1, "kv_lora_rank": 8,
                    "q_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8},
}
ATTENTION = {"mixtral": {"q_proj", "k_proj", "v_proj", "o_proj"},
             "deepseek_v3": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}}


def moe_model(family: str) -> torch.nn.Module:
    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                                  pad_token_id=2, **MOE_FAMILIES[family])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def lora(model: torch.nn.Module, **options) -> torch.nn.Module:
    tuning = registry("tuning_methods").get("lora")
    return tuning.prepare(model, tuning.Options(r=2, **options))


def adapted(model: torch.nn.Module) -> set[str]:
    """What carries a LoRA update: module paths below the layer, ``mlp.experts.<weight>`` for fused weights."""
    names = set()
    for name, module in model.named_modules():
        if type(module).__name__ == "ParamWrapper":
            names.add(f"mlp.experts.{module.parameter_name}")
        elif hasattr(module, "lora_A") and type(module).__name__ == "Linear":
            names.add(re.sub(r".*layers\.\d+\.", "", name))
    return names


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lora_adapts_attention_and_routed_experts_not_routers(family):
    """Every family: the attention projections and both fused expert weights; no router, no shared expert."""
    wrapped = lora(moe_model(family))
    attention = {f"self_attn.{name}" for name in ATTENTION.get(family, ATTENTION["mixtral"])}
    assert adapted(wrapped) == attention | {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_experts_freeze_leaves_the_experts_out(family):
    """``experts: freeze`` adapts attention only; so does dora, which peft cannot apply to fused weights."""
    assert not any(name.startswith("mlp.") for name in adapted(lora(moe_model(family), experts="freeze")))
    dora = registry("tuning_methods").get("dora")
    wrapped = dora.prepare(moe_model(family), dora.Options(r=2))
    assert not any(name.startswith("mlp.") for name in adapted(wrapped))
    with pytest.raises(ValueError, match="'experts' must be freeze for dora"):
        dora.Options(experts="adapt")


def test_adapting_experts_with_dropout_says_what_to_change():
    """peft adapts fused weights only without dropout: the error names both ways out."""
    with pytest.raises(polm.PolmError, match="set dropout: 0, or experts: freeze"):
        lora(moe_model("mixtral"), dropout=0.1)


def test_moe_lora_trains_and_loads_with_plain_peft(tmp_path, tokenizer):
    """Two sft steps on a tiny Qwen2-MoE with the default LoRA: the experts' update is trained, and the saved
    adapter loads with ``PeftModel.from_pretrained`` to the same logits."""
    model = moe_model("qwen2_moe")
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    base = copy.deepcopy(model)
    rows = [{"prompt": f"What is {a} + 1?", "completion": str(a + 1)} for a in range(8)]
    result = polm.Pipeline(str(tmp_path / "base"), seed=0).add(
        "sft", data=rows, max_steps=2, batch_size=4, lr=1e-2, eval_size=0, tuning="lora").run(tmp_path / "run")
    loaded = PeftModel.from_pretrained(base, result.checkpoint).eval()
    experts_b = [value for name, value in loaded.named_parameters() if "experts" in name and "lora_B" in name]
    assert experts_b and all(value.abs().sum() > 0 for value in experts_b), "the experts' update was trained"
    ids = torch.tensor([[5, 6, 7, 8]])
    trained, _ = polm.load_model(result.checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)
