"""One parallel configuration, Megatron-LM meanings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .common import PositiveInt, _Spec

RecomputeModule = Literal["core_attn", "layernorm", "moe_act", "mla_up_proj", "mlp", "moe",
                          "shared_experts"]
DEFAULT_RECOMPUTE_MODULES: tuple[RecomputeModule, ...] = ("core_attn",)  # Megatron's default
# Megatron-Core's `offload_modules` (transformer_config.py, fine-grained activation offloading).
OffloadModule = Literal["attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm",
                        "expert_fc1", "moe_act"]


class Mapping(_Spec):
    """One parallel configuration, Megatron-LM meanings."""

    tp: PositiveInt = Field(1, description="Tensor parallel size (attention and dense MLP).")
    cp: PositiveInt = Field(1, description="Context parallel size.")
    pp: PositiveInt = Field(1, description="Pipeline parallel size.")
    vpp: PositiveInt = Field(1, description="Virtual pipeline stages per rank (interleaving).")
    ep: PositiveInt = Field(1, description="Expert parallel size.")
    etp: PositiveInt = Field(1, description="Expert tensor parallel size.")
    dp: PositiveInt | None = Field(None, description="Data parallel size; derived when omitted.")
    edp: PositiveInt | None = Field(
        None, description="Expert data parallel size; derived when omitted."
    )
    decoder_first_pipeline_num_layers: PositiveInt | None = Field(
        None, description="Layers on the first pipeline stage (uneven split); null = even."
    )
    decoder_last_pipeline_num_layers: PositiveInt | None = Field(
        None, description="Layers on the last pipeline stage (uneven split); null = even."
    )
    micro_batch_size: PositiveInt = Field(1, description="Sequences per micro-batch.")
    sequence_parallel: bool | None = Field(None, description="Sequence parallel; default tp>1.")
    recompute: Literal["none", "selective", "full"] = Field("none", description="Recompute.")
    recompute_num_layers: PositiveInt | None = Field(
        None,
        description="With recompute='full': recompute only the first N layers of each pipeline "
        "stage (virtual chunk), Megatron's --recompute-method block; null = every layer.",
    )
    distributed_optimizer: bool = Field(True, description="Shard optimizer state over DP.")
    dispatcher: Literal["alltoall", "allgather", "flex"] = Field(
        "alltoall", description="MoE token dispatcher; flex = hierarchical dispatch "
        "deduplicated per node (DeepEP / HybridEP, `flex_backend`).")
    flex_backend: Literal["deepep", "hybridep"] = Field(
        "deepep", description="Backend of the flex dispatcher.")
    moe_a2a_overlap: bool = Field(
        False, description="Overlap the expert all-to-all with another micro-batch's compute "
        "(Megatron's --overlap-moe-expert-parallel-comm with --delay-wgrad-compute).")
    recompute_modules: tuple[RecomputeModule, ...] = Field(
        DEFAULT_RECOMPUTE_MODULES, description="With recompute='selective': the modules "
        "recomputed in the backward (Megatron's --recompute-modules).")
    account_for_embedding_in_pipeline_split: bool = Field(
        False, description="The embedding counts as one layer when splitting the pipeline.")
    account_for_loss_in_pipeline_split: bool = Field(
        False, description="The output layer and loss count as one layer when splitting the "
        "pipeline.")
    offload_modules: tuple[OffloadModule, ...] = Field(
        (), description="Fine-grained activation offloading (Megatron's "
        "--fine-grained-activation-offloading --offload-modules): the modules whose input "
        "activations go to host memory after the forward and come back for the backward, on "
        "their own copy streams; empty = none.")
    pipeline_layout: str | None = Field(
        None, min_length=1, max_length=2000, description="Custom pipeline layout, Megatron's "
        "--pipeline-model-parallel-layout: pp*vpp stages separated by '|' in stage order "
        "(virtual chunk c of rank r is stage c*pp + r), each a string of E (embedding), t "
        "(decoder layer), m (MTP layer), L (loss); (..)*n and x*n repeat, commas are cosmetic; "
        "e.g. 'Et*3|(tt|)*29,m|L' (DeepSeek-V3 on pp 8, vpp 4). null = the split the other "
        "pipeline fields give.")
    order: str = Field("tp-cp-ep-dp-pp", description="Rank order, leftmost fastest.")

    @field_validator("order")
    @classmethod
    def _check_order(cls, v: str) -> str:
        tokens = v.lower().split("-")
        if sorted(tokens) != sorted(["tp", "cp", "ep", "dp", "pp"]):
            raise ValueError(
                f"order={v!r} must be a permutation of tp, cp, ep, dp, pp joined by '-'"
            )
        return "-".join(tokens)

    @field_validator("recompute_modules")
    @classmethod
    def _check_modules(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"recompute_modules={list(v)} names a module twice")
        return tuple(sorted(v))  # one value per set of modules (the order means nothing)

    @property
    def partial_recompute(self) -> bool:
        return self.recompute == "full" and self.recompute_num_layers is not None

    @property
    def sp(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel
