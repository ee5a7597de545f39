"""Megatron-LM FLOPs formula."""

from __future__ import annotations

import pytest

from cost_model.flops import megatron_flops_per_sequence, model_flops_per_step, padded_vocab
from cost_model.presets import preset_model
from cost_model.specs import ModelSpec, TrainingSpec


def test_reference_flops_reproduced_exactly(reference):
    """The reference's paper_flops_per_step uses the early-2025 formula (full s x s attention);
    ours with causal_half=False is the same formula and must match to rounding."""
    for row in reference["rows"]:
        spec = {k: v for k, v in reference["models"][row["model"]].items() if k != "note"}
        model = ModelSpec(**spec)
        full = megatron_flops_per_sequence(model, row["seq_length"], causal_half=False)
        assert full * row["global_batch_size"] == pytest.approx(row["paper_flops_per_step"], rel=1e-9)


def test_causal_counts_half_of_the_scores():
    m = preset_model("mixtral-8x22b")
    full = megatron_flops_per_sequence(m, 4096, causal_half=False)
    half = megatron_flops_per_sequence(m, 4096)
    n, d, L, s = m.num_attention_heads, m.head_dim, m.num_layers, 4096
    # 12 * L * s^2 * n * d / 2 is the difference per sequence (attention scores and values).
    assert full - half == pytest.approx(12 * L * s * s * n * d / 2, rel=1e-9)
    assert model_flops_per_step(m, TrainingSpec(seq_length=s, global_batch_size=3)) == pytest.approx(3 * half)


def test_mla_and_dense_layers_counted():
    v3 = preset_model("deepseek-v3")
    # DeepSeek-V3 reports ~37B activated parameters: 6 * N_active per token is the GEMM part.
    per_token = megatron_flops_per_sequence(v3, 4096) / 4096
    assert 6 * 30e9 < per_token < 6 * 50e9
    assert padded_vocab(151936, 2) == 151936 + 256 - (151936 % 256 or 256) or padded_vocab(151936, 2) % 256 == 0
