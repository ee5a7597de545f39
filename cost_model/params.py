"""Parameter counts: one layer's on one rank, the embedding/output ranks' extra, the model's.

Megatron-Core's layout: attention (GQA or multi-latent) and norms in every layer; a dense MLP
or a router + routed experts (+ shared experts) per layer; the embedding on the first
pipeline rank, the final norm and the output layer on the last. With tied embeddings and
pp > 1 the last rank keeps its own copy of the embedding for the output layer (kept in sync
by an all-reduce), so only pp == 1 saves the second copy.
"""

from __future__ import annotations

from .flops import padded_vocab
from .specs import Mapping, ModelSpec


def layer_params(model: ModelSpec, moe: bool, m: Mapping) -> tuple[float, float]:
    """(dense params, expert params) of one layer held by one rank (tp, ep and etp shards)."""
    h, n = model.hidden_size, model.num_attention_heads
    tp = m.tp
    if model.multi_latent_attention:
        dq, dr, dv = model.qk_head_dim, model.qk_pos_emb_head_dim, model.v_head_dim
        q = (model.q_lora_rank * (h + n * (dq + dr) / tp)) if model.q_lora_rank else h * n * (dq + dr) / tp
        attn = q + h * (model.kv_lora_rank + dr) + model.kv_lora_rank * n * (dq + dv) / tp
        attn += n * dv * h / tp
    else:
        d, g = model.head_dim, model.query_groups
        attn = h * (n + 2 * g) * d / tp + n * d * h / tp
    norms = 2 * h
    mats = 3 if model.swiglu else 2
    if not moe:
        return attn + norms + mats * h * model.ffn_hidden_size / tp, 0.0
    dense = attn + norms + h * model.num_experts + mats * h * model.shared_ffn / tp
    expert = (model.num_experts // m.ep) * mats * h * model.expert_ffn / m.etp
    return dense, expert


def stacked_layer_params(model: ModelSpec, m: Mapping) -> tuple[float, float]:
    """(dense, expert) parameters of every layer of the model together, one tp / ep x etp
    shard (no embedding or output layer)."""
    num_moe = model.num_moe_layers
    dense = expert = 0.0
    for is_moe, count in ((False, model.num_layers - num_moe), (True, num_moe)):
        if count:
            d, e = layer_params(model, is_moe, m)
            dense, expert = dense + d * count, expert + e * count
    return dense, expert


def embedding_params(model: ModelSpec, tp: int) -> float:
    """One tp shard of the (padded) word embedding; the output layer has the same size."""
    return padded_vocab(model.vocab_size, tp) / tp * model.hidden_size


def edge_params(model: ModelSpec, m: Mapping, first: bool, last: bool,
                mtp: bool | None = None) -> tuple[float, float]:
    """(dense, expert) parameters a pipeline rank holds besides its decoder layers: the
    embedding on the first rank; the final norm and the output layer (module docstring for
    tied embeddings) on the last; the multi-token-prediction layers where `mtp` (default: on
    the last rank; a custom pipeline layout may place them elsewhere), with a copy of the
    word embedding unless that rank is the first (Megatron-Core models/gpt/gpt_model.py: the
    MTP stage builds an embedding, tied to the first stage's)."""
    v = embedding_params(model, m.tp)
    dense = v if first else 0.0
    expert = 0.0
    if last:
        dense += model.hidden_size + (v if model.untie_embeddings_and_output_weights or not first
                                      else 0.0)
    if (last if mtp is None else mtp) and model.mtp_num_layers:
        d, e = mtp_params(model, m)
        dense, expert = dense + d + (0.0 if first else v), expert + e
    return dense, expert


def mtp_last_kind(model: ModelSpec) -> bool:
    """The kind of layer each MTP module repeats: the decoder's last layer's (True: MoE)."""
    return bool(model.moe_layer_pattern()[-1])


def mtp_params(model: ModelSpec, m: Mapping) -> tuple[float, float]:
    """(dense, expert) parameters of the multi-token-prediction modules, one shard: each has
    two norms (hidden state, embedding), a projection 2h -> h (split by tp) and one
    transformer layer like the decoder's last; embedding and output layer are shared with
    the main model (Megatron-Core transformer/multi_token_prediction.py)."""
    num = model.mtp_num_layers or 0
    if not num:
        return 0.0, 0.0
    h = model.hidden_size
    d, e = layer_params(model, mtp_last_kind(model), m)
    return num * (d + 2 * h + 2 * h * h / m.tp), num * e


def pipeline_params(model: ModelSpec, m: Mapping, pp: int,
                    layers: tuple[float, float] | None = None) -> tuple[float, float]:
    """(dense, expert) parameters summed over the pp pipeline ranks of one model replica
    (one tp / ep x etp shard each): every layer once, the embedding/output per `edge_params`.
    `layers` = `stacked_layer_params(model, m)` when the caller has it."""
    dense, expert = layers or stacked_layer_params(model, m)
    for first, last in ((True, pp == 1),) + (((False, True),) if pp > 1 else ()):
        d, e = edge_params(model, m, first, last)
        dense, expert = dense + d, expert + e
    return dense, expert


def total_params(model: ModelSpec) -> float:
    """All parameters of the model (no sharding)."""
    dense, expert = pipeline_params(model, Mapping(), 1)
    return dense + expert
