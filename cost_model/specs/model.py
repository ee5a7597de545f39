"""The model: a decoder-only transformer, dense or Mixture-of-Experts, in Megatron-LM's terms."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .common import _Spec


class ModelSpec(_Spec):
    """A decoder-only transformer, dense or Mixture-of-Experts, in Megatron-LM's terms."""

    name: str | None = Field(None, description="Display name, e.g. 'mixtral-8x22b'.")
    num_layers: int = Field(..., ge=1, le=100_000, description="Transformer layers.")
    hidden_size: int = Field(..., ge=1, le=1_000_000, description="Model dimension h.")
    num_attention_heads: int = Field(..., ge=1, le=100_000, description="Query heads n.")
    num_query_groups: int | None = Field(
        None, ge=1, description="Key/value heads g for GQA; null means g = n (no GQA)."
    )
    kv_channels: int | None = Field(
        None, ge=1, le=100_000, description="Head dimension; null means hidden_size / heads."
    )
    ffn_hidden_size: int = Field(
        ..., ge=1, le=10_000_000, description="Intermediate size of the dense MLP layers."
    )
    vocab_size: int = Field(..., ge=1, le=100_000_000, description="Vocabulary size.")
    swiglu: bool = Field(True, description="Gated SwiGLU MLPs (three weight matrices).")
    untie_embeddings_and_output_weights: bool = Field(
        True, description="Separate input embedding and output layer weights."
    )
    num_experts: int | None = Field(
        None, ge=0, le=1_000_000, description="Routed experts per MoE layer; null or 0 = dense."
    )
    moe_ffn_hidden_size: int | None = Field(
        None, ge=1, le=10_000_000, description="Intermediate size of one routed expert."
    )
    moe_router_topk: int | None = Field(None, ge=1, description="Experts each token is routed to.")
    moe_shared_expert_intermediate_size: int | None = Field(
        None, ge=1, le=10_000_000, description="Total intermediate size of the shared experts."
    )
    moe_layer_freq: int | tuple[int, ...] = Field(
        1,
        description="int N: every Nth layer is MoE starting at layer 0; or a 0/1 list per layer.",
    )
    multi_latent_attention: bool = Field(False, description="Multi-latent attention (MLA).")
    q_lora_rank: int | None = Field(None, ge=1, description="MLA query low-rank; null = none.")
    kv_lora_rank: int | None = Field(None, ge=1, description="MLA key/value low-rank.")
    qk_head_dim: int | None = Field(None, ge=1, description="MLA q/k head dim without RoPE.")
    qk_pos_emb_head_dim: int | None = Field(None, ge=0, description="MLA RoPE head dim.")
    v_head_dim: int | None = Field(None, ge=1, description="MLA value head dim.")
    moe_router_num_groups: int | None = Field(
        None, ge=1, description="Group-limited routing: experts form this many equal groups "
        "(devices or nodes); null = no group limit.")
    moe_router_group_topk: int | None = Field(
        None, ge=1, description="Group-limited routing: groups each token may reach.")
    mtp_num_layers: int | None = Field(
        None, ge=1, le=64, description="Multi-token-prediction layers after the decoder (on the "
        "last pipeline stage); null = none.")
    qk_layernorm: bool = Field(False, description="RMSNorm on queries and keys per head.")
    add_qkv_bias: bool = Field(False, description="Biases on the query/key/value projections.")
    moe_router_score_function: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="Router score function.")
    moe_router_enable_expert_bias: bool = Field(
        False, description="Score-correction expert bias for top-k choice (aux-loss-free).")
    moe_router_topk_scaling_factor: float | None = Field(
        None, gt=0, le=1000, description="Routed weights scaled by this factor; null = 1.")
    moe_shared_expert_gate: bool = Field(
        False, description="A sigmoid gate on the shared experts' output.")
    rotary_interleaved: bool = Field(False, description="Interleaved (GPT-J style) RoPE.")
    window_size: int | None = Field(
        None, ge=1, le=100_000_000, description="Sliding-window attention: each query sees "
        "itself and the `window_size` tokens before it (Megatron-LM --window-size "
        "<window_size>,0); null = full causal attention in every layer.")
    window_attn_skip_freq: int | None = Field(
        None, ge=1, le=100_000, description="With window_size: every N-th layer (1-based "
        "layer number divisible by N) keeps full attention (Megatron-LM "
        "--window-attn-skip-freq); null = every layer windowed.")

    @field_validator("moe_layer_freq")
    @classmethod
    def _check_freq(cls, v: int | tuple[int, ...]) -> int | tuple[int, ...]:
        if isinstance(v, int):
            if v < 1:
                raise ValueError(f"moe_layer_freq={v} must be >= 1")
        elif any(x not in (0, 1) for x in v):
            raise ValueError("moe_layer_freq as a list must contain only 0 and 1")
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        heads, groups = self.num_attention_heads, self.query_groups
        if heads % groups:
            raise ValueError(
                f"num_attention_heads={heads} is not divisible by num_query_groups={groups}"
            )
        if self.kv_channels is None and not self.multi_latent_attention:
            if self.hidden_size % heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={heads}; set kv_channels"
                )
        if isinstance(self.moe_layer_freq, tuple) and len(self.moe_layer_freq) != self.num_layers:
            raise ValueError(
                f"moe_layer_freq has {len(self.moe_layer_freq)} entries but "
                f"num_layers={self.num_layers}"
            )
        if self.is_moe:
            if self.moe_router_topk is None:
                raise ValueError("moe_router_topk is required when num_experts > 0")
            if self.moe_router_topk > self.num_experts:
                raise ValueError(
                    f"moe_router_topk={self.moe_router_topk} exceeds num_experts={self.num_experts}"
                )
        if self.window_attn_skip_freq is not None and self.window_size is None:
            raise ValueError("window_attn_skip_freq needs window_size (the sliding window)")
        self._check_group_routing()
        self._check_router_and_rope()
        if self.multi_latent_attention:
            missing = [
                f
                for f in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
                if getattr(self, f) is None
            ]
            if missing:
                raise ValueError(f"multi_latent_attention needs {', '.join(missing)}")
        return self

    def _check_group_routing(self) -> None:
        """Megatron's TransformerConfig rules for group-limited routing."""
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if groups is None and group_topk is None:
            return
        if not self.is_moe:
            raise ValueError("moe_router_num_groups/moe_router_group_topk need num_experts > 0")
        if groups is None or group_topk is None:
            raise ValueError("group-limited routing needs both moe_router_num_groups and "
                             "moe_router_group_topk")
        if self.num_experts % groups:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by "
                             f"moe_router_num_groups={groups}")
        if group_topk > groups:
            raise ValueError(f"moe_router_group_topk={group_topk} exceeds "
                             f"moe_router_num_groups={groups}")
        if self.topk % group_topk or self.topk // group_topk > self.num_experts // groups:
            raise ValueError(f"moe_router_topk={self.topk} must be a multiple of "
                             f"moe_router_group_topk={group_topk} and pick at most the "
                             f"{self.num_experts // groups} experts of each group")

    def _check_router_and_rope(self) -> None:
        """Megatron-Core's TransformerConfig rules on these fields alone (0.16,
        transformer_config.py `__post_init__`), and one of foldplan's (a gate on nothing)."""
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            # 'Expert bias for aux-loss-free routing only supports sigmoid score function.'
            raise ValueError("moe_router_enable_expert_bias=true needs moe_router_score_function="
                             f"'sigmoid' (got {self.moe_router_score_function!r})")
        if self.rotary_interleaved and self.multi_latent_attention:
            # 'rotary_interleaved does not work with multi_latent_attention.' (MLA applies RoPE
            # to interleaved pairs itself, models/common/embeddings/rope_utils.py)
            raise ValueError("rotary_interleaved=true does not work with "
                             "multi_latent_attention=true")
        if self.moe_shared_expert_gate and not self.moe_shared_expert_intermediate_size:
            # Megatron: "Only effective when moe-shared-expert-intermediate-size is set."
            raise ValueError("moe_shared_expert_gate=true needs "
                             "moe_shared_expert_intermediate_size (the model has no shared "
                             "experts)")

    # Derived quantities (pure, no state).
    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def expert_ffn(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def shared_ffn(self) -> int:
        return self.moe_shared_expert_intermediate_size or 0

    @property
    def topk(self) -> int:
        return self.moe_router_topk or 0

    def windowed_layer_fraction(self) -> float:
        """The share of layers with sliding-window attention (0 without a window)."""
        if self.window_size is None:
            return 0.0
        n = self.window_attn_skip_freq
        full = self.num_layers // n if n else 0
        return (self.num_layers - full) / self.num_layers

    def moe_layer_pattern(self) -> tuple[int, ...]:
        """1 for each MoE layer, 0 for each dense layer (Megatron's `moe_layer_freq` rule)."""
        return _layer_pattern(self.num_layers, self.is_moe, self.moe_layer_freq)

    @property
    def num_moe_layers(self) -> int:
        return _num_moe(self.moe_layer_pattern())


@lru_cache(maxsize=4096)
def _num_moe(pattern: tuple[int, ...]) -> int:
    return sum(pattern)


@lru_cache(maxsize=4096)
def _layer_pattern(num_layers: int, is_moe: bool, freq: int | tuple[int, ...]) -> tuple[int, ...]:
    if not is_moe:
        return (0,) * num_layers
    if isinstance(freq, tuple):
        return freq
    return tuple(1 if i % freq == 0 else 0 for i in range(num_layers))


class PresetRef(_Spec):
    """A built-in model, by id (see GET /v1/presets)."""

    preset: str = Field(..., description="Preset id, e.g. 'mixtral-8x22b'.")


class HFConfigRef(_Spec):
    """The contents of a Hugging Face config.json."""

    hf_config: dict[str, Any] = Field(..., description="A Hugging Face config.json object.")


ModelInput = ModelSpec | PresetRef | HFConfigRef
