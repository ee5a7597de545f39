"""Built-in models, GPU presets and the Hugging Face config.json importer.

Model dimensions come from each model's published Hugging Face config.json (source named per
preset). GPU constants live in data/gpus.json, each with its source.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from .specs import ClusterSpec, GPUSpec, HFConfigRef, ModelInput, ModelSpec, PresetRef

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
        _source="Qwen/Qwen2-57B-A14B config.json",
    ),
    "qwen3-30b-a3b": dict(
        num_layers=48, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
        kv_channels=128, ffn_hidden_size=6144, vocab_size=151936, num_experts=128,
        moe_ffn_hidden_size=768, moe_router_topk=8,
        _source="Qwen/Qwen3-30B-A3B config.json",
    ),
    "qwen3-235b-a22b": dict(
        num_layers=94, hidden_size=4096, num_attention_heads=64, num_query_groups=4,
        kv_channels=128, ffn_hidden_size=12288, vocab_size=151936, num_experts=128,
        moe_ffn_hidden_size=1536, moe_router_topk=8,
        _source="Qwen/Qwen3-235B-A22B config.json",
    ),
    "deepseek-v2-lite": dict(
        num_layers=27, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=10944,
        vocab_size=102400, num_experts=64, moe_ffn_hidden_size=1408, moe_router_topk=6,
        moe_shared_expert_intermediate_size=2816, moe_layer_freq=[0] + [1] * 26,
        multi_latent_attention=True, q_lora_rank=None, kv_lora_rank=512, qk_head_dim=128,
        qk_pos_emb_head_dim=64, v_head_dim=128,
        _source="deepseek-ai/DeepSeek-V2-Lite config.json (first_k_dense_replace=1)",
    ),
    "deepseek-v3": dict(
        num_layers=61, hidden_size=7168, num_attention_heads=128, ffn_hidden_size=18432,
        vocab_size=129280, num_experts=256, moe_ffn_hidden_size=2048, moe_router_topk=8,
        moe_shared_expert_intermediate_size=2048, moe_layer_freq=[0] * 3 + [1] * 58,
        multi_latent_attention=True, q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128,
        qk_pos_emb_head_dim=64, v_head_dim=128,
        _source="deepseek-ai/DeepSeek-V3 config.json (first_k_dense_replace=3; MTP not modelled)",
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


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json import


class UnsupportedConfig(ValueError):
    """A config.json foldplan cannot represent; the message names the field."""


_HF_DENSE = {"llama", "mistral", "qwen2", "qwen3"}
_HF_MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"}


def _req(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise UnsupportedConfig(f"hf_config.{key} is required for model_type {cfg.get('model_type')!r}")
    return cfg[key]


def import_hf_config(cfg: dict[str, Any]) -> tuple[ModelSpec, list[str]]:
    """Map a Hugging Face config.json to a ModelSpec; also return notes on what was mapped.

    Supported `model_type`s: llama, mistral, qwen2, qwen3 (dense); mixtral, qwen2_moe, qwen3_moe,
    deepseek_v2, deepseek_v3 (MoE). Anything else, or features the cost model cannot represent
    (sliding-window attention in use, non-SiLU activations), is refused with the field named.
    """
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
    else:
        spec["num_query_groups"] = cfg.get("num_key_value_heads")
        if cfg.get("head_dim"):
            spec["kv_channels"] = cfg["head_dim"]
            notes.append("head_dim->kv_channels")
        notes.append("num_key_value_heads->num_query_groups")

    if mt == "mixtral":
        spec.update(
            num_experts=_req(cfg, "num_local_experts"),
            moe_ffn_hidden_size=cfg["intermediate_size"],
            moe_router_topk=_req(cfg, "num_experts_per_tok"),
        )
        notes.append("num_local_experts->num_experts, num_experts_per_tok->moe_router_topk")
    elif mt in ("qwen2_moe", "qwen3_moe"):
        step = cfg.get("decoder_sparse_step", 1) or 1
        dense_layers = set(cfg.get("mlp_only_layers") or [])
        pattern = [
            0 if (i in dense_layers or (i + 1) % step) else 1 for i in range(layers)
        ]
        spec.update(
            num_experts=_req(cfg, "num_experts"),
            moe_ffn_hidden_size=_req(cfg, "moe_intermediate_size"),
            moe_router_topk=_req(cfg, "num_experts_per_tok"),
            moe_shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size") or None,
            moe_layer_freq=pattern if 0 in pattern else 1,
        )
        notes.append(
            "num_experts, moe_intermediate_size->moe_ffn_hidden_size, num_experts_per_tok->"
            "moe_router_topk, shared_expert_intermediate_size, decoder_sparse_step/"
            "mlp_only_layers->moe_layer_freq"
        )
    elif mt.startswith("deepseek"):
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
        if cfg.get("num_nextn_predict_layers"):
            notes.append("num_nextn_predict_layers (multi-token prediction) is not modelled")
    try:
        model = ModelSpec(**spec)
    except ValueError as exc:
        raise UnsupportedConfig(f"hf_config does not describe a valid model: {exc}") from exc
    return model, notes


def resolve_model(model: ModelInput) -> ModelSpec:
    """Turn any model input (spec, preset reference, HF config) into a full ModelSpec."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, PresetRef):
        return preset_model(model.preset)
    if isinstance(model, HFConfigRef):
        return import_hf_config(model.hf_config)[0]
    raise TypeError(f"not a model input: {type(model).__name__}")
