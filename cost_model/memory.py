"""Parameters and memory per GPU, for every pipeline rank.

Per rank: weights, gradients (fp32 main-gradient buffer, Megatron's
--accumulate-allreduce-grads-in-fp32), optimizer state (Adam moments, plus an fp32 master copy
when training in bf16/fp8; the distributed optimizer shards dense state over dp*cp and expert
state over edp), activations of the micro-batches in flight, and an allowance for buffers.

Activations per layer per micro-batch follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models") with fused (flash) attention, so no s^2 terms:
the tensors kept for the backward of each GEMM, norm and activation, counted per token.
In-flight micro-batches: 1F1B keeps pp - i on rank i; interleaved 1F1B keeps
(pp - i - 1) * 2 + (vpp - 1) * pp + 1 model chunks of L/(pp*vpp) layers (Megatron's warm-up
count plus the one in progress).
"""

from __future__ import annotations

from dataclasses import dataclass

from .flops import padded_vocab
from .specs import Mapping, ModelSpec, TrainingSpec

GIB = 2**30
# Allowance for communication buffers, workspaces and allocator fragmentation: a fixed part
# per GPU kind (`memory_reserve_gib`, 2 GiB on GPUs) plus this share of everything else.
FRAGMENTATION = 0.05


def layer_params(model: ModelSpec, moe: bool, m: Mapping) -> tuple[float, float]:
    """(dense params, expert params) of one layer held by one rank."""
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


def rank_chunks(model: ModelSpec, m: Mapping, rank: int) -> list[range]:
    """The layer ranges (one per model chunk) pipeline rank `rank` holds."""
    first, last = m.decoder_first_pipeline_num_layers, m.decoder_last_pipeline_num_layers
    if first is not None or last is not None:
        middle = m.pp - (first is not None) - (last is not None)
        rest = model.num_layers - (first or 0) - (last or 0)
        counts = [rest // middle if middle else 0] * m.pp
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
        start = sum(counts[:rank])
        return [range(start, start + counts[rank])]
    per_chunk = model.num_layers // (m.pp * m.vpp)
    return [range((c * m.pp + rank) * per_chunk, (c * m.pp + rank + 1) * per_chunk)
            for c in range(m.vpp)]


def rank_layers(model: ModelSpec, m: Mapping, rank: int) -> tuple[int, ...]:
    """Indices of the layers pipeline rank `rank` holds (vpp chunks; uneven first/last)."""
    return tuple(i for r in rank_chunks(model, m, rank) for i in r)


def rank_layer_counts(model: ModelSpec, m: Mapping, rank: int) -> tuple[int, int, int, int]:
    """(dense, MoE) layers run in the mapping's recompute mode, then (dense, MoE) layers fully
    recomputed under partial recompute (the first `recompute_num_layers` of each chunk)."""
    r = m.recompute_num_layers if m.partial_recompute else 0
    num_moe = model.num_moe_layers
    if num_moe in (0, model.num_layers):  # all layers alike: only the counts matter
        chunks = rank_chunks(model, m, rank)
        n = sum(len(c) for c in chunks)
        n_rc = sum(min(r, len(c)) for c in chunks)
        return (0, n - n_rc, 0, n_rc) if num_moe else (n - n_rc, 0, n_rc, 0)
    pattern = model.moe_layer_pattern()
    plain_d = plain_m = rc_d = rc_m = 0
    for chunk in rank_chunks(model, m, rank):
        n_rc = min(r, len(chunk))
        moe_rc = sum(pattern[i] for i in chunk[:n_rc])
        moe_all = sum(pattern[i] for i in chunk)
        rc_m += moe_rc
        rc_d += n_rc - moe_rc
        plain_m += moe_all - moe_rc
        plain_d += len(chunk) - n_rc - (moe_all - moe_rc)
    return plain_d, plain_m, rc_d, rc_m


def plain_mapping(m: Mapping) -> Mapping:
    """The recompute mode of the layers not recomputed: 'none' under partial recompute."""
    return m.model_copy(update={"recompute": "none", "recompute_num_layers": None}) \
        if m.partial_recompute else m


def activation_bytes_per_layer(model: ModelSpec, training: TrainingSpec, m: Mapping,
                               moe: bool, act_bytes: float, expert_factor: float) -> float:
    """Bytes one layer keeps for its backward, one micro-batch, on one rank."""
    h, n = model.hidden_size, model.num_attention_heads
    tp, cp = m.tp, m.cp
    T = m.micro_batch_size * training.seq_length / cp
    sp = tp if m.sp else 1
    if m.recompute == "full":
        return T * h / sp * act_bytes  # only the layer input
    if model.multi_latent_attention:
        qkv = n * (2 * (model.qk_head_dim + model.qk_pos_emb_head_dim) + model.v_head_dim) / tp
        qkv += (model.kv_lora_rank + (model.q_lora_rank or 0)) / 1  # latent inputs
        out = n * model.v_head_dim / tp
    else:
        d, g = model.head_dim, model.query_groups
        qkv = (n + 2 * g) * d / tp
        out = n * d / tp
    selective = m.recompute == "selective"
    # norm input, QKV GEMM input (SP shard), q/k/v, attention output (= out-proj input).
    attn = 2 * h / sp + qkv + out  # softmax statistics are negligible
    act_keep = 2 if selective else 3  # SwiGLU: fc1 output (2f) + activation output (f)
    if not moe:
        mlp = 2 * h / sp + act_keep * model.ffn_hidden_size / tp
        return T * (attn + mlp) * act_bytes
    k = model.topk
    Te = T / tp
    # Per routed assignment: expert input (gathered over etp), fc1 output, activation output,
    # expert output before combine.
    per_assign = m.etp * h + act_keep * model.expert_ffn + h
    routed = Te * k * expert_factor * per_assign
    router = Te * model.num_experts * 4 / act_bytes  # fp32 probabilities
    shared = (2 * h / sp + act_keep * model.shared_ffn / tp) * T if model.shared_ffn else 0.0
    return (T * attn + 2 * Te * h + routed + router + shared) * act_bytes


def inflight_chunks(m: Mapping, rank: int, num_microbatches: int) -> float:
    """Model chunks whose activations rank `rank` holds at its peak."""
    if m.pp == 1:
        return 1.0
    if m.vpp == 1:
        return float(min(m.pp - rank, num_microbatches))
    warmup = (m.pp - rank - 1) * 2 + (m.vpp - 1) * m.pp
    return float(min(warmup + 1, num_microbatches * m.vpp))


@dataclass(frozen=True)
class RankMemory:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    activation_per_chunk: float = 0.0  # one in-flight model chunk (not added to the total)
    reserve: float = 0.0  # the fixed part of `buffers`

    def with_chunks(self, extra_chunks: float) -> RankMemory:
        """The same rank layout holding `extra_chunks` more (or fewer) chunks in flight."""
        act = self.activations + extra_chunks * self.activation_per_chunk
        base = self.weights + self.gradients + self.optimizer + act
        return RankMemory(self.weights, self.gradients, self.optimizer, act,
                          self.reserve + FRAGMENTATION * base, self.activation_per_chunk,
                          self.reserve)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers


def rank_memory(model: ModelSpec, training: TrainingSpec, m: Mapping, rank: int,
                act_bytes: float, expert_factor: float, num_microbatches: int,
                counts: tuple[int, int, int, int] | None = None,
                reserve: float = 2 * GIB) -> RankMemory:
    """Memory of pipeline rank `rank` (`counts` as `rank_layer_counts`, if known)."""
    prec = training.precision
    counts = counts or rank_layer_counts(model, m, rank)
    dense = expert = 0.0
    act_layers = 0.0
    act_full = 0.0  # one layer's activations without recompute (full recompute's peak)
    plain = plain_mapping(m)
    no_rc = m.model_copy(update={"recompute": "none", "recompute_num_layers": None}) \
        if m.recompute == "full" else m
    full_rc = m.model_copy(update={"recompute_num_layers": None})
    for slot, count in enumerate(counts):
        if not count:
            continue
        is_moe, recomputed = bool(slot % 2), slot >= 2
        d, e = layer_params(model, is_moe, m)
        dense, expert = dense + d * count, expert + e * count
        mode = full_rc if recomputed else plain
        act_layers += count * activation_bytes_per_layer(
            model, training, mode, is_moe, act_bytes, expert_factor
        )
        if mode.recompute == "full" and not act_full:
            # While a recomputed layer runs its backward it holds its full activations: one
            # layer of the model's largest kind is allowed for.
            kinds = [k for k, n in ((False, model.num_layers - model.num_moe_layers),
                                    (True, model.num_moe_layers)) if n]
            act_full = max(activation_bytes_per_layer(model, training, no_rc, k, act_bytes,
                                                      expert_factor) for k in kinds)
    v = padded_vocab(model.vocab_size, m.tp) / m.tp * model.hidden_size
    first, last = rank == 0, rank == m.pp - 1
    if first:
        dense += v
    if last:
        dense += model.hidden_size + (v if model.untie_embeddings_and_output_weights or not first else 0)
    w_bytes = {"bf16": 2.0, "fp8": 3.0, "fp32": 4.0}[prec]  # fp8 keeps a transposed fp8 copy
    opt_bytes = 8.0 if prec == "fp32" else 12.0
    shard_dense = m.dp * m.cp if m.distributed_optimizer else 1
    shard_expert = m.edp if m.distributed_optimizer else 1
    weights = (dense + expert) * w_bytes
    grads = (dense + expert) * 4.0
    optimizer = opt_bytes * (dense / shard_dense + expert / shard_expert)
    chunks = inflight_chunks(m, rank, num_microbatches)
    activations = act_layers / m.vpp * chunks
    # With full recompute, the layer being recomputed holds its full activations.
    activations += act_full
    T = m.micro_batch_size * training.seq_length / m.cp
    if last:
        v_local = padded_vocab(model.vocab_size, m.tp) / m.tp
        activations += T * v_local * 4 * 2  # fp32 logits and their gradient
    if first:
        activations += T * model.hidden_size / (m.tp if m.sp else 1) * act_bytes
    base = weights + grads + optimizer + activations
    buffers = reserve + FRAGMENTATION * base
    return RankMemory(weights, grads, optimizer, activations, buffers, act_layers / m.vpp, reserve)


def total_params(model: ModelSpec) -> float:
    """All parameters of the model (no sharding)."""
    one = Mapping()
    total = 0.0
    # (dense, MoE) layer counts of the whole model
    for is_moe, count in enumerate((model.num_layers - model.num_moe_layers, model.num_moe_layers)):
        if not count:
            continue
        d, e = layer_params(model, bool(is_moe), one)
        total += (d + e) * count
    v = model.vocab_size * model.hidden_size
    return total + v * (2 if model.untie_embeddings_and_output_weights else 1) + model.hidden_size
