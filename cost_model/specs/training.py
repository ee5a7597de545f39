"""The training setup: what one optimizer step processes, and in which precision."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import _Spec


class TrainingSpec(_Spec):
    """What one optimizer step processes."""

    seq_length: int = Field(..., ge=1, le=16_777_216, description="Tokens per sequence.")
    global_batch_size: int = Field(..., ge=1, le=1 << 30, description="Sequences per step.")
    precision: Literal["bf16", "fp8", "fp32"] = Field("bf16", description="GEMM precision.")
    moe_expert_capacity_factor: float | None = Field(
        None, ge=0.01, le=1000, description="Token-drop capacity factor; null = dropless."
    )
    moe_expert_load_imbalance: float = Field(
        1.25,
        ge=1,
        le=1000,
        description=(
            "Dropless mode: tokens of the busiest expert over the mean. Default 1.25, an assumed "
            "steady state of an auxiliary-loss-balanced router; measure your own."
        ),
    )
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = Field(
        "delayed", description="FP8 scaling recipe when precision is fp8 (Megatron's "
        "--fp8-recipe): delayed and tensorwise scale per tensor, blockwise per 128-element block "
        "(DeepSeek-V3 style), mxfp8 per 32 elements (Blackwell only).")
    runtime: Literal["megatron", "foldplan"] = Field(
        "megatron", description="What the estimate predicts: Megatron-Core, or foldplan's own "
        "executor.")

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on: global batch x sequence length."""
        return self.global_batch_size * self.seq_length
