"""Where each executor tensor lives in a Hugging Face checkpoint, and the layout transforms.

One table per architecture family maps an executor parameter name ("layers.<i>. ...", the
single-rank model's names, the same on every mapping) to a `Source`: the checkpoint tensors
it is made of and how. Both directions (load: hf_checkpoint.read_shard; export:
hf_checkpoint.to_hf_tensors) and the shape check read this one table.

Layouts (executor <- Hugging Face, `nn.Linear` weights are [out, in] on both sides):
- `plain`: the executor tensor is the HF tensors concatenated along `dim` (the tensor-parallel
  split dimension; e.g. a dense MLP's w_in = [gate_proj; up_proj] along rows). A tp rank reads
  its slice of EACH piece, exactly the rows `tensor_parallel.shard` gives it.
- `expert_in`: GroupedExperts.w1_EDF [E, D, 2F] = for each expert e, [gate_e^T | up_e^T];
  `expert_out`: w2_EFD [E, F, D] = down_e^T. Keys hold "{e}" for the expert id.
- RoPE rows (`RopeRows`): the executor rotates interleaved pairs (x[2i], x[2i+1]); transformers'
  Llama-family attention rotates halves (x[i], x[i + d/2]). Rows [offset, offset + dim) of
  every block of `block` rows (one head) are permuted: executor row j = HF row
  j // 2 + (j % 2) * dim / 2, so q.k is unchanged (q and k get the same permutation). DeepSeek
  checkpoints with `rope_interleave` (their default) are already interleaved: no permutation.

Example (Mixtral, layer 0, tp 2 rank 1): `layers.0.ffn.w_in_DF.weight` is not MoE; for the MoE
layer `layers.0.ffn.experts.w1_EDF` reads `model.layers.0.block_sparse_moe.experts.<e>.w1.weight`
(gate) and `.w3.weight` (up) for the local experts e only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from cost_model.specs import ModelSpec

SUPPORTED_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3",
                           "llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class RopeRows:
    """In each block of `block` rows, rows [offset, offset + dim) are RoPE features."""

    block: int
    offset: int
    dim: int

    def perm(self) -> torch.Tensor:
        """perm[j] = the rotate-half row that becomes interleaved row j (within the block)."""
        half = self.dim // 2
        rope = torch.arange(self.dim).view(2, half).t().reshape(-1)
        return torch.cat([torch.arange(self.offset), self.offset + rope,
                          torch.arange(self.offset + self.dim, self.block)])

    def to_interleaved(self, t: torch.Tensor) -> torch.Tensor:
        """Rotate-half rows -> interleaved rows along dim 0 (whole blocks)."""
        return t.view(-1, self.block, *t.shape[1:])[:, self.perm()].reshape(t.shape)

    def to_rotate_half(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_interleaved`."""
        return t.view(-1, self.block, *t.shape[1:])[:, torch.argsort(self.perm())].reshape(t.shape)


@dataclass(frozen=True)
class Source:
    """The checkpoint tensors of one executor tensor (module docstring)."""

    keys: tuple[str, ...]
    kind: Literal["plain", "expert_in", "expert_out"] = "plain"
    rope: RopeRows | None = None


# Per architecture: the MoE block's module name, the expert weight names (gate, up, down),
# the shared-expert module name.
_MOE_NAMES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"), None),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_expert"),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), None),
    "deepseek_v2": ("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    "deepseek_v3": ("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
}


def _mlp(prefix: str) -> dict[str, Source]:
    return {"w_in_DF.weight": Source((f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight")),
            "w_out_FD.weight": Source((f"{prefix}.down_proj.weight",))}


def _attention(spec: ModelSpec, cfg: dict[str, Any], hf: str) -> dict[str, Source]:
    if spec.multi_latent_attention:
        Dq = spec.qk_head_dim + spec.qk_pos_emb_head_dim
        interleaved = cfg.get("rope_interleave", True)
        q_rope = None if interleaved else RopeRows(Dq, spec.qk_head_dim, spec.qk_pos_emb_head_dim)
        kv_rope = None if interleaved else RopeRows(spec.kv_lora_rank + spec.qk_pos_emb_head_dim,
                                                    spec.kv_lora_rank, spec.qk_pos_emb_head_dim)
        out = {"kv_a.weight": Source((f"{hf}.kv_a_proj_with_mqa.weight",), rope=kv_rope),
               "kv_a_norm.weight_D": Source((f"{hf}.kv_a_layernorm.weight",)),
               "kv_b.weight": Source((f"{hf}.kv_b_proj.weight",)),
               "wo.weight": Source((f"{hf}.o_proj.weight",))}
        if spec.q_lora_rank:
            out.update({"q_a.weight": Source((f"{hf}.q_a_proj.weight",)),
                        "q_a_norm.weight_D": Source((f"{hf}.q_a_layernorm.weight",)),
                        "q_b.weight": Source((f"{hf}.q_b_proj.weight",), rope=q_rope)})
        else:
            out["q_proj.weight"] = Source((f"{hf}.q_proj.weight",), rope=q_rope)
        return out
    Dh = spec.head_dim
    rope = RopeRows(Dh, 0, Dh)  # the Llama family rotates halves
    out = {"wo.weight": Source((f"{hf}.o_proj.weight",))}
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
        r = None if ours == "wv" else rope
        out[f"{ours}.weight"] = Source((f"{hf}.{theirs}.weight",), rope=r)
        if spec.add_qkv_bias:
            out[f"{ours}.bias"] = Source((f"{hf}.{theirs}.bias",), rope=r)
    if spec.qk_layernorm:
        out["q_norm.weight_D"] = Source((f"{hf}.q_norm.weight",), rope=rope)
        out["k_norm.weight_D"] = Source((f"{hf}.k_norm.weight",), rope=rope)
    return out


def hf_sources(spec: ModelSpec, cfg: dict[str, Any]) -> dict[str, Source]:
    """executor tensor name -> Source, for every tensor of the single-rank model (parameters
    and the router's expert-bias buffer)."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"config.model_type={mt!r}: the executor reads "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints")
    out = {"embed.weight": Source(("model.embed_tokens.weight",)),
           "norm.weight_D": Source(("model.norm.weight",))}
    if spec.untie_embeddings_and_output_weights:
        out["output.weight"] = Source(("lm_head.weight",))
    block, (gate, up, down), shared = _MOE_NAMES.get(mt, ("mlp", ("", "", ""), None))
    for i, is_moe in enumerate(spec.moe_layer_pattern()):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        out[f"{ours}.attn_norm.weight_D"] = Source((f"{hf}.input_layernorm.weight",))
        out[f"{ours}.ffn_norm.weight_D"] = Source((f"{hf}.post_attention_layernorm.weight",))
        out.update({f"{ours}.attn.{k}": v for k, v in _attention(spec, cfg, f"{hf}.self_attn").items()})
        if not is_moe:
            out.update({f"{ours}.ffn.{k}": v for k, v in _mlp(f"{hf}.mlp").items()})
            continue
        moe, experts = f"{hf}.{block}", f"{hf}.{block}.experts.{{e}}"
        out[f"{ours}.ffn.router.weight_ED"] = Source((f"{moe}.gate.weight",))
        if spec.moe_router_enable_expert_bias:
            out[f"{ours}.ffn.router.expert_bias_E"] = Source((f"{moe}.gate.e_score_correction_bias",))
        out[f"{ours}.ffn.experts.w1_EDF"] = Source((f"{experts}.{gate}.weight", f"{experts}.{up}.weight"),
                                                   "expert_in")
        out[f"{ours}.ffn.experts.w2_EFD"] = Source((f"{experts}.{down}.weight",), "expert_out")
        if spec.shared_ffn:
            if shared is None:
                raise ValueError(f"config.model_type={mt!r} has no shared experts, but the spec "
                                 f"has moe_shared_expert_intermediate_size={spec.shared_ffn}")
            if spec.moe_shared_expert_gate:
                out[f"{ours}.ffn.shared.gate.weight"] = Source((f"{moe}.shared_expert_gate.weight",))
                mlp_prefix = f"{ours}.ffn.shared.mlp"
            else:
                mlp_prefix = f"{ours}.ffn.shared"
            out.update({f"{mlp_prefix}.{k}": v for k, v in _mlp(f"{moe}.{shared}").items()})
    return out
