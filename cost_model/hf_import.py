"""The Hugging Face config.json importer: a `config.json` object to a ModelSpec.

Supported `model_type`s: llama, mistral, qwen2, qwen3 (dense); mixtral, qwen2_moe, qwen3_moe,
deepseek_v2, deepseek_v3 (MoE), with the key names of transformers 4 and 5 (transformers 5's
Qwen3-MoE writes `num_local_experts` for `num_experts` and `rope_parameters` for `rope_theta`;
RoPE bases are not part of the spec). Anything else, or features the cost model cannot
represent (sliding-window attention in use, non-SiLU activations), is refused with the field
named. Each import also returns notes: which keys became which fields.

Exact-architecture fields (Megatron-LM names) from the modelling code of each type:
qk_layernorm (Qwen3: q_norm/k_norm in every attention), add_qkv_bias (Qwen2: q/k/v biases
always; `qkv_bias`/`attention_bias` when present), moe_shared_expert_gate (Qwen2-MoE: a sigmoid
gate on the shared expert), and for DeepSeek: `scoring_func` -> moe_router_score_function,
`topk_method` 'noaux_tc' -> moe_router_enable_expert_bias, `routed_scaling_factor` ->
moe_router_topk_scaling_factor (1 = none), `n_group`/`topk_group` -> moe_router_num_groups/
moe_router_group_topk (with a group-limited `topk_method` and more than one group),
`num_nextn_predict_layers` -> mtp_num_layers. transformers 5 writes neither `scoring_func` nor
`topk_method` for DeepSeek-V3 (its code always routes with sigmoid scores, the correction
bias and groups): they default to 'sigmoid' / 'noaux_tc' for deepseek_v3 and to 'softmax' /
'greedy' for deepseek_v2 (the defaults of each model's code). DeepSeek's `rope_interleave` is the layout
Megatron's MLA applies itself (rotary_interleaved stays false: Megatron refuses it with MLA).
"""

from __future__ import annotations

from typing import Any

from .specs import ModelSpec


class UnsupportedConfig(ValueError):
    """A config.json foldplan cannot represent; the message names the field."""


_HF_DENSE = {"llama", "mistral", "qwen2", "qwen3"}
_HF_MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"}
_GROUP_LIMITED = {"group_limited_greedy", "noaux_tc"}  # DeepSeek topk_methods that use groups


def _req(cfg: dict[str, Any], key: str, *aliases: str) -> Any:
    for k in (key, *aliases):
        if cfg.get(k) is not None:
            return cfg[k]
    raise UnsupportedConfig(f"hf_config.{key} is required for model_type {cfg.get('model_type')!r}")


def _check_supported(cfg: dict[str, Any]) -> str:
    mt = cfg.get("model_type")
    if mt not in _HF_DENSE | _HF_MOE:
        raise UnsupportedConfig(
            f"hf_config.model_type={mt!r} is not supported; supported: "
            f"{', '.join(sorted(_HF_DENSE | _HF_MOE))}"
        )
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedConfig(f"hf_config.hidden_act={act!r} is not supported (only silu/SwiGLU)")
    if cfg.get("use_sliding_window") or (mt in ("mistral", "mixtral") and cfg.get("sliding_window")):
        raise UnsupportedConfig(
            f"hf_config.sliding_window={cfg.get('sliding_window')!r}: sliding-window attention "
            "is not modelled"
        )
    return mt


def _attention(cfg: dict[str, Any], mt: str, spec: dict[str, Any], notes: list[str]) -> None:
    if mt.startswith("deepseek"):
        spec.update(
            multi_latent_attention=True,
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=_req(cfg, "kv_lora_rank"),
            qk_head_dim=_req(cfg, "qk_nope_head_dim"),
            qk_pos_emb_head_dim=_req(cfg, "qk_rope_head_dim"),
            v_head_dim=_req(cfg, "v_head_dim"),
        )
        notes.append(
            "MLA: q_lora_rank, kv_lora_rank, qk_nope_head_dim->qk_head_dim, "
            "qk_rope_head_dim->qk_pos_emb_head_dim, v_head_dim"
        )
        if cfg.get("rope_interleave", True):
            notes.append("rope_interleave: Megatron's MLA rotates interleaved pairs itself "
                         "(rotary_interleaved stays false)")
        return
    spec["num_query_groups"] = cfg.get("num_key_value_heads")
    if cfg.get("head_dim"):
        spec["kv_channels"] = cfg["head_dim"]
        notes.append("head_dim->kv_channels")
    notes.append("num_key_value_heads->num_query_groups")
    if mt.startswith("qwen3"):
        spec["qk_layernorm"] = True
        notes.append("qk_layernorm=true (Qwen3 normalises queries and keys per head)")
    bias_key = "qkv_bias" if "qkv_bias" in cfg else "attention_bias"
    # Qwen2's attention has q/k/v biases when the config does not say (transformers' code).
    bias = bool(cfg[bias_key]) if bias_key in cfg else mt.startswith("qwen2")
    if bias:
        spec["add_qkv_bias"] = True
        out_bias = bias_key == "attention_bias" and bias_key in cfg and not mt.startswith("qwen2")
        notes.append(f"{bias_key if bias_key in cfg else 'Qwen2 q/k/v biases'}->add_qkv_bias"
                     + (" (the output projection's bias is not modelled)" if out_bias else ""))


def _qwen_moe(cfg: dict[str, Any], mt: str, layers: int, spec: dict[str, Any],
              notes: list[str]) -> None:
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense_layers = set(cfg.get("mlp_only_layers") or [])
    pattern = [0 if (i in dense_layers or (i + 1) % step) else 1 for i in range(layers)]
    shared = cfg.get("shared_expert_intermediate_size") or None
    spec.update(
        num_experts=_req(cfg, "num_experts", "num_local_experts"),
        moe_ffn_hidden_size=_req(cfg, "moe_intermediate_size"),
        moe_router_topk=_req(cfg, "num_experts_per_tok"),
        moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=bool(shared and mt == "qwen2_moe"),
        moe_layer_freq=pattern if 0 in pattern else 1,
    )
    notes.append(
        "num_experts (or num_local_experts), moe_intermediate_size->moe_ffn_hidden_size, "
        "num_experts_per_tok->moe_router_topk, shared_expert_intermediate_size, "
        "decoder_sparse_step/mlp_only_layers->moe_layer_freq"
    )
    if spec["moe_shared_expert_gate"]:
        notes.append("moe_shared_expert_gate=true (Qwen2-MoE's shared_expert_gate)")


def _deepseek_moe(cfg: dict[str, Any], layers: int, spec: dict[str, Any],
                  notes: list[str]) -> None:
    first_dense = cfg.get("first_k_dense_replace", 0) or 0
    freq = cfg.get("moe_layer_freq", 1) or 1
    pattern = [1 if (i >= first_dense and i % freq == 0) else 0 for i in range(layers)]
    shared = (cfg.get("n_shared_experts") or 0) * _req(cfg, "moe_intermediate_size")
    spec.update(
        num_experts=_req(cfg, "n_routed_experts"),
        moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        moe_router_topk=_req(cfg, "num_experts_per_tok"),
        moe_shared_expert_intermediate_size=shared or None,
        moe_layer_freq=pattern if 0 in pattern else 1,
    )
    notes.append(
        "n_routed_experts->num_experts, moe_intermediate_size->moe_ffn_hidden_size, "
        "n_shared_experts*moe_intermediate_size->moe_shared_expert_intermediate_size, "
        "first_k_dense_replace/moe_layer_freq->moe_layer_freq"
    )
    v3 = cfg.get("model_type") == "deepseek_v3"
    method = cfg.get("topk_method", "noaux_tc" if v3 else "greedy")
    if cfg.get("scoring_func", "sigmoid" if v3 else "softmax") == "sigmoid":
        spec["moe_router_score_function"] = "sigmoid"
        notes.append("scoring_func->moe_router_score_function")
    if method == "noaux_tc":
        spec["moe_router_enable_expert_bias"] = True
        notes.append("topk_method='noaux_tc'->moe_router_enable_expert_bias")
    groups, group_topk = cfg.get("n_group") or 1, cfg.get("topk_group")
    if method in _GROUP_LIMITED and groups > 1 and group_topk:
        spec.update(moe_router_num_groups=groups, moe_router_group_topk=group_topk)
        notes.append("n_group/topk_group->moe_router_num_groups/moe_router_group_topk")
    scale = cfg.get("routed_scaling_factor")
    if scale is not None and scale != 1:
        spec["moe_router_topk_scaling_factor"] = float(scale)
        notes.append("routed_scaling_factor->moe_router_topk_scaling_factor")
    if cfg.get("num_nextn_predict_layers"):
        spec["mtp_num_layers"] = cfg["num_nextn_predict_layers"]
        notes.append("num_nextn_predict_layers->mtp_num_layers (multi-token prediction)")


def import_hf_config(cfg: dict[str, Any]) -> tuple[ModelSpec, list[str]]:
    """Map a Hugging Face config.json to a ModelSpec; also return notes on what was mapped
    (module docstring)."""
    mt = _check_supported(cfg)
    notes: list[str] = []
    layers = _req(cfg, "num_hidden_layers")
    spec: dict[str, Any] = dict(
        name=cfg.get("_name_or_path") or mt,
        num_layers=layers,
        hidden_size=_req(cfg, "hidden_size"),
        num_attention_heads=_req(cfg, "num_attention_heads"),
        vocab_size=_req(cfg, "vocab_size"),
        ffn_hidden_size=_req(cfg, "intermediate_size"),
        swiglu=True,
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
    )
    notes.append(
        "num_hidden_layers->num_layers, hidden_size, num_attention_heads, vocab_size, "
        "intermediate_size->ffn_hidden_size, tie_word_embeddings->untie_embeddings_and_output_weights"
    )
    _attention(cfg, mt, spec, notes)
    if mt == "mixtral":
        spec.update(
            num_experts=_req(cfg, "num_local_experts"),
            moe_ffn_hidden_size=cfg["intermediate_size"],
            moe_router_topk=_req(cfg, "num_experts_per_tok"),
        )
        notes.append("num_local_experts->num_experts, num_experts_per_tok->moe_router_topk")
    elif mt in ("qwen2_moe", "qwen3_moe"):
        _qwen_moe(cfg, mt, layers, spec, notes)
    elif mt.startswith("deepseek"):
        _deepseek_moe(cfg, layers, spec, notes)
    try:
        model = ModelSpec(**spec)
    except ValueError as exc:
        raise UnsupportedConfig(f"hf_config does not describe a valid model: {exc}") from exc
    return model, notes
