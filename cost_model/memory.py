"""Memory per GPU, for every pipeline rank, and the byte arithmetic every memory figure of
foldplan uses (the planner's bounds and stage solver call these same functions).

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
from functools import lru_cache

from .flops import padded_vocab
from .params import edge_params, layer_params, mtp_last_kind, pipeline_params
from .specs import Mapping, ModelSpec, TrainingSpec
from .stage_split import layout_mtp_rank, stage_chunks

GIB = 2**30
# Allowance for communication buffers, workspaces and allocator fragmentation: a fixed part
# per GPU kind (`memory_reserve_gib`, 2 GiB on GPUs) plus this share of everything else.
FRAGMENTATION = 0.05
GRAD_BYTES = 4.0  # fp32 main gradients (--accumulate-allreduce-grads-in-fp32)
# Memory traffic of one Adam step per parameter: read the gradient, the fp32 master weight and
# both moments; write the master weight, both moments and the bf16 weight.
ADAM_STEP_BYTES = 4 + 4 + 8 + 4 + 8 + 2


def activation_element_bytes(precision: str) -> float:
    """Bytes of one activation element (bf16 also under fp8: fp8 GEMMs keep bf16 activations)."""
    return 4.0 if precision == "fp32" else 2.0


def state_bytes_per_param(precision: str) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes per parameter before sharding: bf16 weights
    (fp8 adds a transposed fp8 copy: 3), fp32 gradients, Adam moments (8) plus an fp32 master
    copy when not training in fp32 (12)."""
    weights = {"bf16": 2.0, "fp8": 3.0, "fp32": 4.0}[precision]
    return weights, GRAD_BYTES, 8.0 if precision == "fp32" else 12.0


def optimizer_shards(m: Mapping) -> tuple[int, int]:
    """(dense, expert) ranks the optimizer state is sharded over: dp*cp and edp with the
    distributed optimizer, none without."""
    return optimizer_shards_of(m.dp or 1, m.cp, m.edp or 1, m.distributed_optimizer)


def optimizer_shards_of(dp: int, cp: int, edp: int, distributed: bool) -> tuple[int, int]:
    """`optimizer_shards` from the sizes alone."""
    return (dp * cp, edp) if distributed else (1, 1)


def static_bytes(dense: float, expert: float, precision: str,
                 shards: tuple[int, int]) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes of `dense` + `expert` parameters on one rank."""
    w, g, o = state_bytes_per_param(precision)
    return (dense + expert) * w, (dense + expert) * g, o * (dense / shards[0] + expert / shards[1])


def buffer_bytes(base_bytes: float, reserve: float) -> float:
    """The allowance of a rank whose tensors take `base_bytes`: the fixed reserve plus the
    fragmentation share (`FRAGMENTATION`)."""
    return reserve + FRAGMENTATION * base_bytes


def with_buffers(base_bytes: float, reserve: float) -> float:
    """Total memory of a rank whose tensors take `base_bytes`."""
    return base_bytes + buffer_bytes(base_bytes, reserve)


def memory_budget(capacity: float, reserve: float) -> float:
    """The most tensor bytes that fit: `with_buffers(x, reserve) <= capacity` iff x <= this."""
    return (capacity - reserve) / (1 + FRAGMENTATION)


def pipeline_send_bytes(model: ModelSpec, training: TrainingSpec, m: Mapping) -> float:
    """One pipeline send: a micro-batch's activations at a stage boundary (SP shard)."""
    tokens = m.micro_batch_size * training.seq_length / m.cp
    return (tokens / (m.tp if m.sp else 1) * model.hidden_size
            * activation_element_bytes(training.precision))


def edge_activation_bytes(model: ModelSpec, training: TrainingSpec, m: Mapping, first: bool,
                          last: bool, act_bytes: float, expert_factor: float = 1.0,
                          mtp: bool | None = None) -> float:
    """Activations of one micro-batch besides the decoder layers: the embedding output on the
    first rank; fp32 logits and their gradient on the last, its own logits for each MTP
    module included (Megatron computes the MTP loss in the last stage); per MTP module its
    layer and its projection input (2h) where `mtp` (default: the last rank)."""
    T = m.micro_batch_size * training.seq_length / m.cp
    sp = m.tp if m.sp else 1
    out = T * model.hidden_size / sp * act_bytes if first else 0.0
    if last:
        logits = T * padded_vocab(model.vocab_size, m.tp) / m.tp * 4 * 2
        out += logits * (1 + (model.mtp_num_layers or 0))
    if (last if mtp is None else mtp) and model.mtp_num_layers:
        layer = activation_bytes_per_layer(model, training, m, mtp_last_kind(model),
                                           act_bytes, expert_factor)
        out += model.mtp_num_layers * (layer + T * 2 * model.hidden_size / sp * act_bytes)
    return out


def static_memory_lower_bound(model: ModelSpec, precision: str, probe: Mapping, pp: int,
                              shards: tuple[int, int], reserve: float,
                              layers: tuple[float, float] | None = None) -> float:
    """A floor on the peak memory of every mapping with `probe`'s tp/ep/etp and `pp` stages
    whose optimizer shards are at most `shards`: no pipeline rank holds less than the mean
    of the ranks' weights, gradients and optimizer state, and activations are >= 0.
    `layers` = `params.stacked_layer_params(model, probe)` when the caller has it."""
    dense, expert = pipeline_params(model, probe, pp, layers)
    return with_buffers(sum(static_bytes(dense, expert, precision, shards)) / pp, reserve)


def rank_chunks(model: ModelSpec, m: Mapping, rank: int) -> list[range]:
    """The layer ranges (one per model chunk) pipeline rank `rank` holds."""
    return list(_chunks(model.num_layers, m.pp, m.vpp, m.decoder_first_pipeline_num_layers,
                        m.decoder_last_pipeline_num_layers,
                        m.account_for_embedding_in_pipeline_split,
                        m.account_for_loss_in_pipeline_split, m.pipeline_layout)[rank])


@lru_cache(maxsize=65_536)
def _chunks(num_layers: int, pp: int, vpp: int, first: int | None, last: int | None,
            embedding: bool, loss: bool,
            layout: str | None = None) -> tuple[tuple[range, ...], ...]:
    """`stage_chunks`, kept: the planner asks for the same splits thousands of times."""
    return tuple(tuple(c) for c in stage_chunks(num_layers, pp, vpp, first, last,
                                                embedding=embedding, loss=loss, layout=layout))


def mtp_rank(model: ModelSpec, m: Mapping) -> int:
    """The pipeline rank running the multi-token-prediction layers: the last one, unless a
    custom pipeline layout places them elsewhere (`stage_split.layout_mtp_rank`)."""
    if m.pipeline_layout is None or not model.mtp_num_layers:
        return m.pp - 1
    return _mtp_rank(m.pipeline_layout, model.num_layers, m.pp, m.vpp, model.mtp_num_layers)


_mtp_rank = lru_cache(maxsize=4096)(layout_mtp_rank)


def rank_layer_counts(model: ModelSpec, m: Mapping, rank: int) -> tuple[int, int, int, int]:
    """(dense, MoE) layers run in the mapping's recompute mode, then (dense, MoE) layers fully
    recomputed under partial recompute (the first `recompute_num_layers` of each chunk)."""
    r = m.recompute_num_layers if m.partial_recompute else 0
    return _layer_counts(model.moe_layer_pattern(), m.pp, m.vpp,
                         m.decoder_first_pipeline_num_layers, m.decoder_last_pipeline_num_layers,
                         m.account_for_embedding_in_pipeline_split,
                         m.account_for_loss_in_pipeline_split, r, rank, m.pipeline_layout)


@lru_cache(maxsize=65_536)
def _layer_counts(pattern: tuple[int, ...], pp: int, vpp: int, first: int | None,
                  last: int | None, embedding: bool, loss: bool, r: int,
                  rank: int, layout: str | None = None) -> tuple[int, int, int, int]:
    """`rank_layer_counts`, kept (a pure function of its arguments; the planner asks for the
    same ranks thousands of times)."""
    num_layers, num_moe = len(pattern), sum(pattern)
    chunks = _chunks(num_layers, pp, vpp, first, last, embedding, loss, layout)[rank]
    if num_moe in (0, num_layers):  # all layers alike: only the counts matter
        n = sum(len(c) for c in chunks)
        n_rc = sum(min(r, len(c)) for c in chunks)
        return (0, n - n_rc, 0, n_rc) if num_moe else (n - n_rc, 0, n_rc, 0)
    plain_d = plain_m = rc_d = rc_m = 0
    for chunk in chunks:
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
    """Bytes one layer keeps for its backward, one micro-batch, on one rank.

    Per token (elements): norm input and output (the output is the next GEMM's input; the
    `layernorm` recompute module keeps only the input), q/k/v and the attention output
    (fused attention keeps nothing else, so `core_attn` saves no memory here; `mla_up_proj`
    keeps MLA's latents instead of the up-projected q/k/v), the MLP's fc1 output (2f with
    SwiGLU) and activation output (f; `mlp` / `shared_experts` keep neither); per routed
    (token, expert) row: the expert input (gathered over etp), fc1 and activation outputs
    (`moe_act` drops the activation output) and the expert output; the router's fp32
    scores (`moe` keeps none of the MoE block's rows)."""
    h, n = model.hidden_size, model.num_attention_heads
    tp, cp = m.tp, m.cp
    T = m.micro_batch_size * training.seq_length / cp
    sp = tp if m.sp else 1
    if m.recompute == "full":
        return T * h / sp * act_bytes  # only the layer input

    def redo(module: str) -> bool:
        return m.recompute == "selective" and module in m.recompute_modules

    norms = (1 if redo("layernorm") else 2) * h / sp  # norm input (+ output)
    if model.multi_latent_attention:
        latents = model.kv_lora_rank + (model.q_lora_rank or 0)
        qkv = latents if redo("mla_up_proj") else latents + n * (
            2 * (model.qk_head_dim + model.qk_pos_emb_head_dim) + model.v_head_dim) / tp
        out = n * model.v_head_dim / tp
    else:
        d, g = model.head_dim, model.query_groups
        qkv = (n + 2 * g) * d / tp
        out = n * d / tp
    attn = norms + qkv + out  # softmax statistics are negligible
    if not moe:
        mlp = norms + (0 if redo("mlp") else 3) * model.ffn_hidden_size / tp
        return T * (attn + mlp) * act_bytes
    Te = T / tp
    routed = router = 0.0
    if not redo("moe"):
        act_keep = 2 if redo("moe_act") else 3
        per_row = m.etp * h + act_keep * model.expert_ffn + h
        routed = Te * model.topk * expert_factor * per_row
        router = Te * model.num_experts * 4 / act_bytes  # fp32 scores
    shared = 0.0
    if model.shared_ffn:
        shared = (2 * h / sp + (0 if redo("shared_experts") else 3) * model.shared_ffn / tp) * T
    return (T * attn + Te * norms * sp + routed + router + shared) * act_bytes


def offloaded_bytes_per_layer(model: ModelSpec, training: TrainingSpec, m: Mapping,
                              moe: bool, act_bytes: float, expert_factor: float) -> float:
    """Of `activation_bytes_per_layer`, the bytes `offload_modules` send to host memory: each
    module's input, where the layer keeps it (Megatron-Core
    pipeline_parallel/fine_grained_activation_offload.py; module inputs as
    transformer_config.py `offload_modules` names them). Per token: attn_norm the layer input
    (h, sequence-parallel shard), qkv_linear the norm output (dropped by `layernorm`
    recompute), core_attn q/k/v (MLA: the up-projected ones, dropped by `mla_up_proj`
    recompute), attn_proj the attention output, mlp_norm the MLP block's input; per routed
    row: expert_fc1 the expert input (gathered over etp), moe_act the fc1 output (2f with
    SwiGLU). With full recompute a layer keeps only its input (attn_norm's); with `moe`
    recompute no routed rows."""
    mods = m.offload_modules
    if not mods:
        return 0.0
    h, n = model.hidden_size, model.num_attention_heads
    tp = m.tp
    T = m.micro_batch_size * training.seq_length / m.cp
    sp = tp if m.sp else 1
    if m.recompute == "full":
        return T * h / sp * act_bytes if "attn_norm" in mods else 0.0

    def redo(module: str) -> bool:
        return m.recompute == "selective" and module in m.recompute_modules

    per_token = 0.0
    if "attn_norm" in mods:
        per_token += h / sp
    if "qkv_linear" in mods and not redo("layernorm"):
        per_token += h / sp
    if "mlp_norm" in mods:
        per_token += h / sp
    if "core_attn" in mods:
        if model.multi_latent_attention:
            if not redo("mla_up_proj"):
                per_token += n * (2 * (model.qk_head_dim + model.qk_pos_emb_head_dim)
                                  + model.v_head_dim) / tp
        else:
            per_token += (n + 2 * model.query_groups) * model.head_dim / tp
    if "attn_proj" in mods:
        per_token += n * (model.v_head_dim if model.multi_latent_attention
                          else model.head_dim) / tp
    routed = 0.0
    if moe and not redo("moe"):
        per_row = (m.etp * h if "expert_fc1" in mods else 0.0) + (
            (2 if model.swiglu else 1) * model.expert_ffn if "moe_act" in mods else 0.0)
        routed = T / tp * model.topk * expert_factor * per_row
    return (T * per_token + routed) * act_bytes


# Offloaded activations a rank still holds on the GPU at its peak, in layers: the last one's
# (Megatron does not offload the last group of each module name, so its reload never blocks
# the backward: `PipelineOffloadManager.post_warmup_callback`) and the one reloaded ahead of
# its backward.
OFFLOAD_RESIDENT_LAYERS = 2


def inflight_chunks(m: Mapping, rank: int, num_microbatches: int) -> float:
    """Model chunks whose activations rank `rank` holds at its peak. With `moe_a2a_overlap`
    the forward of the next micro-batch runs beside the backward of the current one, so one
    more chunk is in flight (Megatron-Core's combined 1F1B schedule)."""
    extra = 1 if m.moe_a2a_overlap else 0
    if m.pp == 1:
        return float(min(1 + extra, num_microbatches))
    if m.vpp == 1:
        return float(min(m.pp - rank + extra, num_microbatches))
    warmup = (m.pp - rank - 1) * 2 + (m.vpp - 1) * m.pp
    return float(min(warmup + 1 + extra, num_microbatches * m.vpp))


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
                          buffer_bytes(base, self.reserve), self.activation_per_chunk,
                          self.reserve)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers


def rank_memory(model: ModelSpec, training: TrainingSpec, m: Mapping, rank: int,
                act_bytes: float, expert_factor: float, num_microbatches: int,
                counts: tuple[int, int, int, int] | None = None,
                reserve: float = 2 * GIB) -> RankMemory:
    """Memory of pipeline rank `rank` (`counts` as `rank_layer_counts`, if known)."""
    counts = counts or rank_layer_counts(model, m, rank)
    dense = expert = 0.0
    act_layers = 0.0
    act_full = 0.0  # one layer's activations without recompute (full recompute's peak)
    plain = plain_mapping(m)
    full_rc = m if m.recompute_num_layers is None else \
        m.model_copy(update={"recompute_num_layers": None})
    off_layers = off_max = 0.0  # of act_layers, what offloading sends to host memory
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
        off = offloaded_bytes_per_layer(model, training, mode, is_moe, act_bytes, expert_factor)
        off_layers, off_max = off_layers + count * off, max(off_max, off)
        if mode.recompute == "full" and not act_full:
            # While a recomputed layer runs its backward it holds its full activations: one
            # layer of the model's largest kind is allowed for.
            kinds = [k for k, n in ((False, model.num_layers - model.num_moe_layers),
                                    (True, model.num_moe_layers)) if n]
            no_rc = m.model_copy(update={"recompute": "none", "recompute_num_layers": None})
            act_full = max(activation_bytes_per_layer(model, training, no_rc, k, act_bytes,
                                                      expert_factor) for k in kinds)
    first, last, mtp = rank == 0, rank == m.pp - 1, rank == mtp_rank(model, m)
    d, e = edge_params(model, m, first, last, mtp)
    dense, expert = dense + d, expert + e
    weights, grads, optimizer = static_bytes(dense, expert, training.precision,
                                             optimizer_shards(m))
    chunks = inflight_chunks(m, rank, num_microbatches)
    activations = (act_layers - off_layers) / m.vpp * chunks
    activations += min(off_layers / m.vpp * chunks, OFFLOAD_RESIDENT_LAYERS * off_max)
    # With full recompute, the layer being recomputed holds its full activations.
    activations += act_full
    activations += edge_activation_bytes(model, training, m, first, last, act_bytes,
                                         expert_factor, mtp)
    buffers = buffer_bytes(weights + grads + optimizer + activations, reserve)
    return RankMemory(weights, grads, optimizer, activations, buffers, act_layers / m.vpp, reserve)
