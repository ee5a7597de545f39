"""Built-in models, GPU presets, and any model input resolved to a ModelSpec.

Model dimensions come from each model's published Hugging Face config.json (source named per
preset), imported by the rules of `hf_import.py` (re-exported here). GPU constants live in
data/gpus.json, each with its source.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from .hf_import import UnsupportedConfig, import_hf_config
from .specs import ClusterSpec, GPUSpec, HFConfigRef, ModelInput, ModelSpec, PresetRef

__all__ = ["UnsupportedConfig", "check_cluster", "gpu_presets", "import_hf_config",
           "model_presets", "preset_model", "preset_source", "resolve_gpu", "resolve_model"]

_MODELS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": dict(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, vocab_size=32000, num_experts=8, moe_ffn_hidden_size=14336,
        moe_router_topk=2,
        _source="mistralai/Mixtral-8x7B-v0.1 config.json",
    ),
    "mixtral-8x22b": dict(
        num_layers=56, hidden_size=6144, num_attention_heads=48, num_query_groups=8,
        ffn_hidden_size=16384, vocab_size=32000, num_experts=8, moe_ffn_hidden_size=16384,
        moe_router_topk=2,
        _source="mistralai/Mixtral-8x22B-v0.1 config.json (vocab 32000 as in the paper's runs)",
    ),
    "qwen2-57b-a14b": dict(
        num_layers=28, hidden_size=3584, num_attention_heads=28, num_query_groups=4,
        ffn_hidden_size=18944, vocab_size=151936, num_experts=64, moe_ffn_hidden_size=2560,
        moe_router_topk=8, moe_shared_expert_intermediate_size=20480,
        add_qkv_bias=True, moe_shared_expert_gate=True,
        _source="Qwen/Qwen2-57B-A14B config.json (q/k/v biases and the shared expert gate of "
                "transformers' Qwen2-MoE code)",
    ),
    "qwen3-30b-a3b": dict(
        num_layers=48, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
        kv_channels=128, ffn_hidden_size=6144, vocab_size=151936, num_experts=128,
        moe_ffn_hidden_size=768, moe_router_topk=8, qk_layernorm=True,
        _source="Qwen/Qwen3-30B-A3B config.json (q_norm/k_norm of transformers' Qwen3-MoE code)",
    ),
    "qwen3-235b-a22b": dict(
        num_layers=94, hidden_size=4096, num_attention_heads=64, num_query_groups=4,
        kv_channels=128, ffn_hidden_size=12288, vocab_size=151936, num_experts=128,
        moe_ffn_hidden_size=1536, moe_router_topk=8, qk_layernorm=True,
        _source="Qwen/Qwen3-235B-A22B config.json (q_norm/k_norm of transformers' Qwen3-MoE "
                "code)",
    ),
    "deepseek-v2-lite": dict(
        num_layers=27, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=10944,
        vocab_size=102400, num_experts=64, moe_ffn_hidden_size=1408, moe_router_topk=6,
        moe_shared_expert_intermediate_size=2816, moe_layer_freq=[0] + [1] * 26,
        multi_latent_attention=True, q_lora_rank=None, kv_lora_rank=512, qk_head_dim=128,
        qk_pos_emb_head_dim=64, v_head_dim=128,
        _source="deepseek-ai/DeepSeek-V2-Lite config.json (first_k_dense_replace=1; softmax "
                "greedy top-k: n_group=1, routed_scaling_factor=1, no MTP)",
    ),
    "deepseek-v3": dict(
        num_layers=61, hidden_size=7168, num_attention_heads=128, ffn_hidden_size=18432,
        vocab_size=129280, num_experts=256, moe_ffn_hidden_size=2048, moe_router_topk=8,
        moe_shared_expert_intermediate_size=2048, moe_layer_freq=[0] * 3 + [1] * 58,
        multi_latent_attention=True, q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128,
        qk_pos_emb_head_dim=64, v_head_dim=128,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5, moe_router_num_groups=8, moe_router_group_topk=4,
        mtp_num_layers=1,
        _source="deepseek-ai/DeepSeek-V3 config.json (first_k_dense_replace=3; scoring_func "
                "sigmoid, topk_method noaux_tc, routed_scaling_factor 2.5, n_group 8, "
                "topk_group 4, num_nextn_predict_layers 1)",
    ),
    "gpt-oss-120b": dict(
        num_layers=36, hidden_size=2880, num_attention_heads=64, num_query_groups=8,
        kv_channels=64, ffn_hidden_size=2880, vocab_size=201088, num_experts=128,
        moe_ffn_hidden_size=2880, moe_router_topk=4, add_qkv_bias=True, window_size=128,
        window_attn_skip_freq=2,
        _source="openai/gpt-oss-120b config.json (36 layers, all MoE; 128 experts of width "
                "2,880, top-4; 64 query heads of 64 over 8 key/value groups; attention biases; "
                "layer_types alternate sliding (window 128) and full attention, the first "
                "sliding: window_size 128, every 2nd layer full). Its attention sinks (one "
                "learned logit per head) are not priced",
    ),
    "llama3-70b": dict(
        num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
        ffn_hidden_size=28672, vocab_size=128256,
        _source="meta-llama/Meta-Llama-3-70B config.json",
    ),
    "tiny-moe": dict(
        num_layers=4, hidden_size=128, num_attention_heads=8, num_query_groups=4,
        kv_channels=16, ffn_hidden_size=256, vocab_size=256, num_experts=8,
        moe_ffn_hidden_size=256, moe_router_topk=2,
        _source="foldplan's own CPU test model: ~3.4M parameters, byte-level vocabulary",
    ),
}


def model_presets() -> dict[str, ModelSpec]:
    """All built-in models by id."""
    return {k: preset_model(k) for k in _MODELS}


def preset_source(preset_id: str) -> str:
    return _MODELS[preset_id]["_source"]


@lru_cache(maxsize=None)
def preset_model(preset_id: str) -> ModelSpec:
    if preset_id not in _MODELS:
        raise ValueError(
            f"unknown model preset {preset_id!r}; known: {', '.join(sorted(_MODELS))}"
        )
    fields = {k: v for k, v in _MODELS[preset_id].items() if not k.startswith("_")}
    return ModelSpec(name=preset_id, **fields)


@lru_cache(maxsize=1)
def _gpu_table() -> dict[str, dict[str, Any]]:
    text = resources.files("cost_model").joinpath("data/gpus.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def gpu_presets() -> dict[str, GPUSpec]:
    return {k: GPUSpec(**v) for k, v in _gpu_table().items()}


def resolve_gpu(gpu: str | GPUSpec) -> GPUSpec:
    if isinstance(gpu, GPUSpec):
        return gpu
    table = _gpu_table()
    if gpu not in table:
        raise ValueError(f"unknown gpu preset {gpu!r}; known: {', '.join(sorted(table))}")
    return GPUSpec(**table[gpu])


def check_cluster(cluster: ClusterSpec) -> None:
    """Raise ValueError naming the field if the cluster refers to something unknown."""
    resolve_gpu(cluster.gpu)


def resolve_model(model: ModelInput) -> ModelSpec:
    """Turn any model input (spec, preset reference, HF config) into a full ModelSpec."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, PresetRef):
        return preset_model(model.preset)
    if isinstance(model, HFConfigRef):
        return import_hf_config(model.hf_config)[0]
    raise TypeError(f"not a model input: {type(model).__name__}")
