"""Numerical details of an architecture that the planner's ModelSpec does not carry.

The ModelSpec holds what costs time and memory (shapes, counts, which features exist). A
checkpoint also fixes numbers that change the values but not the cost: the RoPE base and
YaRN scaling, the RMSNorm epsilons, whether a softmax router renormalises its top-k weights, how a group of
experts is scored. `ArchOptions` holds them; the defaults are what the executor has always
run (a randomly initialised model), and `ArchOptions.from_hf_config` reads them from a
Hugging Face config.json, so a model loaded with `--init-hf` computes what transformers
computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


class UnsupportedArchitecture(ValueError):
    """A config.json option the executor cannot run; the message names the field."""


@dataclass(frozen=True)
class YarnRope:
    """YaRN RoPE scaling (arXiv 2309.00071) as transformers computes it
    (`_compute_yarn_parameters`): per frequency, a ramp between the original inverse
    frequency (fast dimensions, extrapolated) and the one divided by `factor` (slow dimensions,
    interpolated) over the correction range of [beta_fast, beta_slow] rotations within
    `original_max_position_embeddings`; cos and sin are multiplied by `attention_factor`."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True

    def inv_freq(self, dim: int, base: float) -> torch.Tensor:
        """Inverse frequencies [dim/2] (fp32)."""
        def correction_dim(rotations: float) -> float:
            return dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        extrapolation = 1 - ramp
        return (1.0 / (self.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class ArchOptions:
    """Value-only options of the model (see the module docstring)."""

    rope_theta: float = 10000.0  # RoPE base
    yarn: YarnRope | None = None  # YaRN RoPE scaling; None = plain RoPE
    softmax_scale_factor: float = 1.0  # attention scale = this / sqrt(q/k head dim) (DeepSeek YaRN)
    norm_eps: float = 1e-5  # epsilon of the layer and final RMSNorms
    qk_norm_eps: float = 1e-5  # epsilon of the per-head query/key RMSNorms (qk_layernorm)
    latent_norm_eps: float = 1e-6  # epsilon of MLA's q/kv latent RMSNorms (DeepSeek's default)
    # softmax routers: True = softmax over all experts, top-k, no renormalisation (HF
    # norm_topk_prob=false); None = the executor's default rule (RouterConfig.for_model)
    router_pre_softmax: bool | None = None
    sigmoid_normalize: bool = True  # sigmoid routers: top-k weights normalised to sum 1
    # group-limited routing: a group's score is the sum of its best `group_score_topk`
    # experts; None = Megatron's rule topk // group_topk
    group_score_topk: int | None = None
    expert_bias_update_rate: float = 1e-3  # aux-loss-free bias step (Megatron's default)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ArchOptions:
        """The options of a transformers config.json (keys of transformers 4 and 5)."""
        rope = dict(cfg.get("rope_parameters") or {})
        rope.update(cfg.get("rope_scaling") or {})  # transformers 4 keeps scaling apart
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise UnsupportedArchitecture(
                f"config.rope_parameters.rope_type={rope_type!r}: the executor runs the default "
                "RoPE and YaRN (linear / dynamic / llama3 / longrope scaling not yet)")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedArchitecture("config.partial_rotary_factor != 1 is not supported "
                                          "by the executor yet")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        mt = cfg.get("model_type", "")
        yarn, softmax_scale = None, 1.0
        if rope_type == "yarn":
            original = rope.get("original_max_position_embeddings")
            factor = rope.get("factor") or cfg["max_position_embeddings"] / original
            mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
            attention = rope.get("attention_factor")
            if attention is None:
                attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                             if mscale and mscale_all else _yarn_mscale(factor))
            yarn = YarnRope(factor=float(factor), original_max_position_embeddings=int(original),
                            beta_fast=float(rope.get("beta_fast") or 32),
                            beta_slow=float(rope.get("beta_slow") or 1),
                            attention_factor=float(attention), truncate=bool(rope.get("truncate", True)))
            if mt.startswith("deepseek") and mscale_all:  # DeepSeek's softmax scale correction
                softmax_scale = _yarn_mscale(factor, mscale_all) ** 2
        eps = float(cfg.get("rms_norm_eps", 1e-6))
        norm_topk = cfg.get("norm_topk_prob")
        if mt == "mixtral":
            norm_topk = True  # Mixtral always renormalises its top-k softmax weights
        if mt in ("qwen2_moe", "qwen3_moe") and norm_topk is None:
            norm_topk = False  # the transformers config default
        group_score_topk = None
        if mt == "deepseek_v3":
            group_score_topk = 2  # transformers: sum of the best two scores of each group
        elif mt == "deepseek_v2":
            group_score_topk = 1  # group_limited_greedy: the group's best score
        sigmoid = cfg.get("scoring_func", "sigmoid" if mt == "deepseek_v3" else "softmax") == "sigmoid"
        return cls(
            rope_theta=float(theta),
            yarn=yarn,
            softmax_scale_factor=softmax_scale,
            norm_eps=eps,
            qk_norm_eps=eps,
            latent_norm_eps=1e-6,
            router_pre_softmax=None if sigmoid or norm_topk is None else not norm_topk,
            sigmoid_normalize=bool(norm_topk) if sigmoid else True,
            group_score_topk=group_score_topk,
        )
