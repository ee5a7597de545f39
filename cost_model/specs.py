"""Typed specs: model, cluster, training setup and parallel mapping.

Field names follow Megatron-LM's arguments and ../shared/CONTRACT.md exactly. These are the
values every other package passes around; they validate what can be checked on their own
(a model's heads divide by its query groups, a mapping's sizes are positive). Checks that need
two specs together (tp divides heads, the world-size products) live in `validate.py`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .profile_model import Profile

MAX_WORLD_SIZE = 131_072

PositiveInt = Annotated[int, Field(ge=1)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
        if self.multi_latent_attention:
            missing = [
                f
                for f in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
                if getattr(self, f) is None
            ]
            if missing:
                raise ValueError(f"multi_latent_attention needs {', '.join(missing)}")
        return self

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

    def moe_layer_pattern(self) -> tuple[int, ...]:
        """1 for each MoE layer, 0 for each dense layer (Megatron's `moe_layer_freq` rule)."""
        return _layer_pattern(self.num_layers, self.is_moe, self.moe_layer_freq)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layer_pattern())


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


class GPUSpec(_Spec):
    """One accelerator. Rates are dense (no sparsity)."""

    name: str = Field(..., min_length=1, max_length=64, description="GPU name.")
    peak_tflops: float = Field(..., ge=1e-3, le=1e6, description="Dense bf16 peak, TFLOP/s.")
    memory_gib: float = Field(..., ge=1e-3, le=1e5, description="Memory usable by one process, GiB.")
    hbm_GBps: float = Field(..., ge=1e-3, le=1e6, description="Memory bandwidth, GB/s.")
    fp8_tflops: float | None = Field(
        None, ge=1e-3, le=1e6, description="Dense fp8 peak; null = bf16 rate (no fp8 tensor cores)."
    )
    fp32_tflops: float | None = Field(
        None, ge=1e-3, le=1e6, description="fp32 (TF32 where the GPU has it) peak; null = bf16/2."
    )
    intra_node_GBps: float | None = Field(None, ge=1e-3, le=1e6, description="Default NVLink GB/s.")
    inter_node_GBps: float | None = Field(None, ge=1e-3, le=1e6, description="Default network GB/s.")
    gemm_efficiency: float | None = Field(
        None, ge=0.01, le=1, description="Sustained fraction of peak in large GEMMs."
    )
    memory_reserve_gib: float = Field(
        2.0, ge=0, le=1e5, description="Fixed allowance for buffers and workspaces, GiB."
    )
    comm_overlap: bool = Field(
        True, description="Collectives can run under compute (false for CPU ranks)."
    )
    intra_node_latency_us: float = Field(5.0, ge=0, le=1e6, description="Per collective step.")
    inter_node_latency_us: float = Field(12.0, ge=0, le=1e6, description="Per collective step.")
    source: str | None = Field(None, description="Where these numbers come from.")


class ClusterSpec(_Spec):
    """Nodes of identical GPUs; bandwidths are per GPU, per direction."""

    num_nodes: int = Field(..., ge=1, le=MAX_WORLD_SIZE, description="Number of nodes.")
    gpus_per_node: int = Field(..., ge=1, le=1024, description="GPUs per node.")
    gpu: str | GPUSpec = Field(
        "h100", description="GPU preset id (h100, h200, a100-80gb, b200, cpu) or a GPU object."
    )
    intra_node_GBps: float | None = Field(
        None, ge=1e-3, le=1e6, description="Inside a node, GB/s per GPU per direction."
    )
    inter_node_GBps: float | None = Field(
        None, ge=1e-3, le=1e6, description="Across nodes, GB/s per GPU per direction."
    )
    intra_node_latency_us: float | None = Field(
        None, ge=0, le=1e6, description="Per collective step inside a node; null = GPU preset's."
    )
    inter_node_latency_us: float | None = Field(
        None, ge=0, le=1e6, description="Per collective step across nodes; null = GPU preset's."
    )
    profile: Profile | None = Field(
        None, description="Output of `foldplan profile`; measured numbers replace datasheet ones."
    )

    @model_validator(mode="after")
    def _check(self) -> ClusterSpec:
        if self.world_size > MAX_WORLD_SIZE:
            raise ValueError(
                f"num_nodes*gpus_per_node = {self.world_size} exceeds the limit of "
                f"{MAX_WORLD_SIZE} GPUs"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node


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
    dispatcher: Literal["alltoall", "allgather"] = Field("alltoall", description="MoE dispatcher.")
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

    @property
    def partial_recompute(self) -> bool:
        return self.recompute == "full" and self.recompute_num_layers is not None

    @property
    def sp(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel
