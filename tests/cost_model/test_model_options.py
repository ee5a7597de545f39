"""The round-2 model fields on the presets and from Hugging Face configs (cost_model/presets.py,
cost_model/hf_import.py): routing, MTP and exact-architecture flags as the real models have them."""

from __future__ import annotations

import pytest

from cost_model.presets import UnsupportedConfig, import_hf_config, preset_model
from test_specs import HF_QWEN2  # the published Qwen2-57B-A14B config.json

EXACT = ("moe_router_num_groups", "moe_router_group_topk", "mtp_num_layers", "qk_layernorm",
         "add_qkv_bias", "moe_router_score_function", "moe_router_enable_expert_bias",
         "moe_router_topk_scaling_factor", "moe_shared_expert_gate", "rotary_interleaved")
DEFAULTS = {"moe_router_num_groups": None, "moe_router_group_topk": None, "mtp_num_layers": None,
            "qk_layernorm": False, "add_qkv_bias": False, "moe_router_score_function": "softmax",
            "moe_router_enable_expert_bias": False, "moe_router_topk_scaling_factor": None,
            "moe_shared_expert_gate": False, "rotary_interleaved": False}

# The keys of the published config.json files (deepseek-ai/DeepSeek-V3, DeepSeek-V2-Lite,
# DeepSeek-V2, Qwen/Qwen2-57B-A14B, Qwen/Qwen3-30B-A3B; Qwen3-MoE as transformers 5 writes it).
HF_DSV3 = {
    "model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_attention_heads": 128,
    "num_key_value_heads": 128, "vocab_size": 129280, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "hidden_act": "silu",
    "tie_word_embeddings": False, "num_nextn_predict_layers": 1, "n_group": 8, "topk_group": 4,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "routed_scaling_factor": 2.5,
    "norm_topk_prob": True, "rope_interleave": True,
}
HF_V2LITE = {
    "model_type": "deepseek_v2", "num_hidden_layers": 27, "hidden_size": 2048,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_attention_heads": 16,
    "num_key_value_heads": 16, "vocab_size": 102400, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "hidden_act": "silu", "tie_word_embeddings": False,
    "n_group": 1, "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax",
    "routed_scaling_factor": 1.0, "norm_topk_prob": False,
}
HF_QWEN3_TF5 = {
    "model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "num_local_experts": 128,
    "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
}


def _exact(spec) -> dict:
    return {f: getattr(spec, f) for f in EXACT}


def test_presets_carry_the_real_architectures():
    assert _exact(preset_model("deepseek-v3")) == DEFAULTS | {
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
        "moe_router_topk_scaling_factor": 2.5, "moe_router_num_groups": 8,
        "moe_router_group_topk": 4, "mtp_num_layers": 1}
    assert _exact(preset_model("qwen2-57b-a14b")) == DEFAULTS | {
        "add_qkv_bias": True, "moe_shared_expert_gate": True}
    for qwen3 in ("qwen3-30b-a3b", "qwen3-235b-a22b"):
        assert _exact(preset_model(qwen3)) == DEFAULTS | {"qk_layernorm": True}
    for plain in ("mixtral-8x7b", "mixtral-8x22b", "deepseek-v2-lite", "llama3-70b", "tiny-moe"):
        assert _exact(preset_model(plain)) == DEFAULTS, plain


@pytest.mark.parametrize("config, preset", [
    (HF_DSV3, "deepseek-v3"), (HF_V2LITE, "deepseek-v2-lite"), (HF_QWEN2, "qwen2-57b-a14b"),
    (HF_QWEN3_TF5, "qwen3-30b-a3b"),
])
def test_hf_import_matches_preset_architecture(config, preset):
    spec, _ = import_hf_config(config)
    want = preset_model(preset)
    assert _exact(spec) == _exact(want)
    assert spec.num_experts == want.num_experts and spec.moe_layer_pattern() == want.moe_layer_pattern()


def test_hf_import_notes_name_the_mapped_keys():
    _, notes = import_hf_config(HF_DSV3)
    text = " | ".join(notes)
    for key in ("num_nextn_predict_layers->mtp_num_layers", "n_group/topk_group",
                "routed_scaling_factor", "topk_method='noaux_tc'", "scoring_func",
                "rope_interleave"):
        assert key in text, key
    _, notes = import_hf_config(HF_QWEN3_TF5)
    assert any("num_local_experts" in n for n in notes) and any("qk_layernorm" in n for n in notes)


def test_hf_import_group_limited_only_with_a_grouped_topk_method():
    """DeepSeek-V2 (236B) routes device-limited: group_limited_greedy, 8 groups, top 3."""
    v2 = HF_V2LITE | {"n_group": 8, "topk_group": 3, "topk_method": "group_limited_greedy",
                      "routed_scaling_factor": 16.0}
    spec, _ = import_hf_config(v2)
    assert (spec.moe_router_num_groups, spec.moe_router_group_topk) == (8, 3)
    assert spec.moe_router_topk_scaling_factor == 16.0
    assert spec.moe_router_score_function == "softmax" and not spec.moe_router_enable_expert_bias
    greedy, _ = import_hf_config(HF_V2LITE | {"n_group": 8, "topk_group": 3})
    assert greedy.moe_router_num_groups is None


def test_hf_import_attention_biases():
    spec, _ = import_hf_config(HF_QWEN2 | {"shared_expert_intermediate_size": 0})
    assert spec.add_qkv_bias and not spec.moe_shared_expert_gate and not spec.shared_ffn
    llama = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 256,
             "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 4,
             "vocab_size": 1000, "hidden_act": "silu"}
    assert not import_hf_config(llama)[0].add_qkv_bias
    spec, notes = import_hf_config(llama | {"attention_bias": True})
    assert spec.add_qkv_bias and any("output projection" in n for n in notes)
    qwen3 = llama | {"model_type": "qwen3", "head_dim": 64}
    assert import_hf_config(qwen3)[0].qk_layernorm


def test_hf_import_names_missing_experts_in_both_spellings():
    cfg = {k: v for k, v in HF_QWEN3_TF5.items() if k != "num_local_experts"}
    with pytest.raises(UnsupportedConfig, match="hf_config.num_experts is required"):
        import_hf_config(cfg)
