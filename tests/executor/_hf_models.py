"""Tiny random Hugging Face models of the four MoE architectures, for the checkpoint tests.

Each is built with transformers (a few layers, small width, a few experts), saved with
save_pretrained (safetensors) and scored with transformers' own causal-LM loss. The shapes
divide by 2 so tp 2, ep 2 and pp 2 mappings run them. initializer_range 0.1 (not 0.02) keeps
the router scores apart, so fp32 rounding between implementations cannot flip a top-k choice.
Imported by test modules only; needs transformers (the `test` extra).
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_attention_heads=4,
              initializer_range=0.1, tie_word_embeddings=False)


def hf_config(arch: str, **overrides):
    """The transformers config of one tiny test model."""
    from transformers import (
        DeepseekV3Config,
        MixtralConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    if arch == "mixtral":
        cfg = MixtralConfig(**COMMON, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=4,
                            num_experts_per_tok=2, rope_theta=5e4)
    elif arch == "qwen2_moe":
        cfg = Qwen2MoeConfig(**COMMON, num_hidden_layers=3, num_key_value_heads=2, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=24,
                             shared_expert_intermediate_size=40, mlp_only_layers=[1])
    elif arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(**COMMON, num_hidden_layers=2, num_key_value_heads=2, head_dim=8,
                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                             norm_topk_prob=True)
    elif arch == "deepseek_v3":
        cfg = DeepseekV3Config(**COMMON, num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8,
                               num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
                               moe_intermediate_size=16, first_k_dense_replace=1, q_lora_rank=16,
                               kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                               routed_scaling_factor=2.5, rope_scaling=None)
    elif arch == "deepseek_v2":  # softmax groups (group_limited_greedy), no q LoRA: q_proj
        from transformers import DeepseekV2Config

        cfg = DeepseekV2Config(**COMMON, num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8,
                               num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
                               moe_intermediate_size=16, first_k_dense_replace=1, q_lora_rank=None,
                               kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                               topk_method="group_limited_greedy", rope_scaling=None)
    elif arch == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(**COMMON, num_hidden_layers=2, num_key_value_heads=2, rope_theta=5e5)
    elif arch == "qwen3":
        from transformers import Qwen3Config

        cfg = Qwen3Config(**COMMON, num_hidden_layers=2, num_key_value_heads=2, head_dim=8)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def save_model(arch: str, out: Path, seed: int = 0, **overrides):
    """Build, save (safetensors) and return the transformers model (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, **overrides))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # HF inits it to zero: make it matter
                buf.copy_(torch.randn(buf.shape) * 0.05)
    model.eval()
    model.save_pretrained(out)
    return model


def hf_loss(model, windows_BS1: torch.Tensor) -> float:
    """transformers' causal-LM loss on windows of S+1 tokens: mean CE of predicting tokens
    1..S from 0..S-1 (exactly the executor's inputs/targets of those windows)."""
    with torch.no_grad():
        return float(model(input_ids=windows_BS1, labels=windows_BS1).loss)
