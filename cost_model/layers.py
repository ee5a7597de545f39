"""Per-micro-batch cost of each layer type on one rank: compute and communication.

Shapes after sharding (b micro-batch, s sequence, h hidden, tp/cp/ep/etp as in the mapping):
- attention and dense MLP GEMMs see T_a = b*s/cp tokens with weights split by tp (sequence
  parallel gathers the tokens before, and scatters after, each block);
- the MoE layer sees T_e = b*s/(cp*tp) tokens per rank (the sequence-parallel shard; folding
  reshapes the same ranks into etp x ep x edp), routes each to top-k experts, and after the
  dispatcher each rank runs its E/ep local experts (split by etp) over the tokens routed to
  them, gathered over etp.

Communication assumed exposed or hidden as Megatron-Core runs it without TP-comm overlap
(early 2025 defaults the paper used): sequence-parallel all-gather/reduce-scatter in the
forward and the all-gather before the row-parallel dgrad in the backward are exposed; the
backward reduce-scatter of a column-parallel layer runs under its wgrad GEMM. Expert all-to-all
and ETP gathers are exposed. Context-parallel K/V ring exchange overlaps the attention of the
previous chunk. All costs are per micro-batch, forward + backward (+ recompute).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .flops import padded_vocab
from .hardware import Hardware, fp8_cast_bytes
from .dispatch import dispatch_bytes, dispatch_time, overlapped_comm, routed_traffic
from .kernels import collective_bytes_and_steps, collective_time, linear_time, memory_time
from .kernels import ring_time
from .layout import GroupPlacement
from .specs import Mapping, ModelSpec, TrainingSpec

COMPONENTS = ("compute", "recompute", "tp_comm", "cp_comm", "ep_comm", "pp_comm", "offload")


@dataclass
class Cost:
    """Seconds per component (see COMPONENTS), and forward/backward compute for overlap."""

    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0.0))
    fwd_compute: float = 0.0
    bwd_compute: float = 0.0
    launches: float = 0.0  # kernels launched from the host, forward + backward
    # Bytes this rank sends by group kind (tp, cp, ep, etp, tp_ep, pp), exposed or hidden:
    # the traffic its groups put on their links, whatever the time it costs.
    sent: dict[str, float] = field(default_factory=dict)

    def add(self, other: Cost, times: float = 1.0) -> None:
        parts, sent = self.parts, self.sent
        for k, v in other.parts.items():
            if v:  # most parts of most blocks are zero
                parts[k] += v * times
        self.fwd_compute += other.fwd_compute * times
        self.bwd_compute += other.bwd_compute * times
        self.launches += other.launches * times
        for k, v in other.sent.items():
            sent[k] = sent.get(k, 0.0) + v * times

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass(frozen=True)
class Context:
    """Everything one estimate derives once and every layer reuses."""

    model: ModelSpec
    training: TrainingSpec
    mapping: Mapping
    hw: Hardware
    prec: str  # GEMM precision: a `Hardware.peak_flops` key (fp8 ones per recipe)
    act_bytes: float  # bytes per activation element
    tokens_attn: float  # T_a
    tokens_moe: float  # T_e
    expert_load: float  # busiest rank's routed assignments over the mean
    capacity_scale: float  # fraction of routed assignments kept (<= 1 with token dropping)
    place: dict[str, GroupPlacement]

    @property
    def fp8(self) -> bool:
        return self.training.precision == "fp8"


def _cast_overhead(ctx: Context, elements: float) -> float:
    """fp8: every GEMM input is quantized with a transposed copy for the other GEMM of the
    pair (Transformer Engine cast-transpose), fwd and bwd; bytes per element by recipe."""
    if not ctx.fp8:
        return 0.0
    return memory_time(ctx.hw, elements * fp8_cast_bytes(ctx.training.fp8_recipe))


def _tp_comm(ctx: Context, c: Cost, tokens: float, n_fwd: int, n_bwd: int,
             times: float = 1.0) -> None:
    """Sequence-parallel all-gathers/reduce-scatters (or all-reduces without SP) of T x h,
    `n_fwd` + `n_bwd` of them, `times` over (recompute gathers again): into `c`."""
    m = ctx.mapping
    if m.tp == 1:
        return
    full = tokens * ctx.model.hidden_size * ctx.act_bytes
    # An all-gather to T x h sends what a reduce-scatter from T x h sends.
    op = "reduce_scatter" if m.sp else "all_reduce"
    n = (n_fwd + n_bwd) * times
    c.parts["tp_comm"] = n * collective_time(ctx.hw, ctx.place["tp"], op, full)
    c.sent["tp"] = n * collective_bytes_and_steps(op, m.tp, full)[0]


def attention_cost(ctx: Context) -> Cost:
    md, m, hw, p = ctx.model, ctx.mapping, ctx.hw, ctx.prec
    T, h, tp = ctx.tokens_attn, md.hidden_size, m.tp
    n = md.num_attention_heads
    fwd = bwd = 0.0
    if md.multi_latent_attention:
        dq, dr, dv = md.qk_head_dim, md.qk_pos_emb_head_dim, md.v_head_dim
        kv_l, q_l = md.kv_lora_rank, md.q_lora_rank
        shapes = [(h, kv_l + dr, 1)]  # kv down-projection (replicated over tp)
        if q_l:
            shapes += [(h, q_l, 1), (q_l, n * (dq + dr) / tp, 1)]
        else:
            shapes += [(h, n * (dq + dr) / tp, 1)]
        shapes += [(kv_l, n * (dq + dv) / tp, 1), (n * dv / tp, h, 1)]
        qk_dim, v_dim = dq + dr, dv
        qkv_elems = n * (dq + dr + dq + dr + dv) / tp
    else:
        d, g = md.head_dim, md.query_groups
        shapes = [(h, (n + 2 * g) * d / tp, 1), (n * d / tp, h, 1)]
        qk_dim = v_dim = d
        qkv_elems = (n + 2 * g) * d / tp
    for n_in, n_out, groups in shapes:
        f, b = linear_time(hw, p, T, n_in, n_out, groups)
        fwd, bwd = fwd + f, bwd + b
        fwd += _cast_overhead(ctx, T * n_in)
        bwd += _cast_overhead(ctx, 2 * T * n_out + n_in * n_out)
    # Core attention: causal, so half of the s x s scores; CP splits the work evenly
    # (load-balanced chunks), heads split by tp.
    b_s, s = m.micro_batch_size, ctx.training.seq_length
    attn_prec = "fp32" if p == "fp32" else "bf16"
    # Fused attention runs closer to its peak on long key blocks: each kernel call sees s keys,
    # or with load-balanced CP a half-chunk of s/(2cp) per ring step (2cp - 1 calls).
    kv_block = s if m.cp == 1 else s / (2 * m.cp)
    calls = 1 if m.cp == 1 else 2 * m.cp - 1

    def core_times(pairs: float, keys: float) -> tuple[float, float]:
        """Forward and backward of `pairs` (query, key) pairs per sequence, each query
        block seeing `keys` keys."""
        core = 2.0 * b_s * pairs * (n / tp) * (qk_dim + v_dim) / m.cp
        rate = hw.peak_flops[attn_prec] * keys / (keys + hw.attention_kv_half)
        return (core / (rate * hw.attention_fwd_efficiency),
                2.5 * core / (rate * hw.attention_bwd_efficiency))

    # Causal: half of the s x s scores; CP splits the work evenly (load-balanced chunks).
    core_fwd, core_bwd = core_times(s * s * 0.5, kv_block)
    windowed = md.windowed_layer_fraction()
    if windowed:
        # Sliding window: a query sees itself and the w tokens before it, (w+1)s - w(w+1)/2
        # pairs, in blocks of at most w+1 keys. Layers alternate, so a layer is priced at
        # the mean of its windowed and full-attention shares.
        w = min(md.window_size, s - 1)
        win_fwd, win_bwd = core_times((w + 1) * s - w * (w + 1) / 2, min(kv_block, w + 1))
        core_fwd = windowed * win_fwd + (1 - windowed) * core_fwd
        core_bwd = windowed * win_bwd + (1 - windowed) * core_bwd
    core_fwd += calls * hw.kernel_overhead_s
    core_bwd += 2 * calls * hw.kernel_overhead_s
    fwd, bwd = fwd + core_fwd, bwd + core_bwd
    # Memory-bound work: norm, residual, RoPE and layout copies; backward about twice.
    elem = T * (6 * h + 3 * qkv_elems) / tp * ctx.act_bytes
    fwd += memory_time(hw, elem)
    bwd += memory_time(hw, 2 * elem)
    fwd += 12 * hw.kernel_overhead_s
    bwd += 20 * hw.kernel_overhead_s
    # Selective recompute (`recompute_modules`): core attention forward again; the input
    # norm again (read and write a row); MLA's q/k/v up-projections again from the latents.
    redo = core_fwd if recomputes(m, "core_attn") else 0.0
    if recomputes(m, "layernorm"):
        redo += _norm_time(ctx, T)
    if recomputes(m, "mla_up_proj") and md.multi_latent_attention:
        up = [(md.kv_lora_rank, n * (md.qk_head_dim + md.v_head_dim) / tp)]
        if md.q_lora_rank:
            up.append((md.q_lora_rank, n * (md.qk_head_dim + md.qk_pos_emb_head_dim) / tp))
        redo += sum(linear_time(hw, p, T, n_in, n_out)[0] for n_in, n_out in up)
    c = _block_cost(m, fwd, bwd, redo)
    c.launches = 32 + 3 * calls + 3 * len(shapes) * (2 if ctx.fp8 else 1)
    _tp_comm(ctx, c, T, 2, 1, 1.5 if m.recompute == "full" else 1.0)
    if m.cp > 1:
        # Ring exchange of K and V: cp-1 steps, each passes this rank's K/V chunk on; the
        # backward also passes dK/dV. Overlaps the attention of the chunk in hand.
        kv_elems = (
            (md.kv_lora_rank + md.qk_pos_emb_head_dim) * tp  # latent K/V (MLA), not split by tp
            if md.multi_latent_attention
            else 2 * md.query_groups * md.head_dim
        )
        chunk = b_s * s / m.cp * kv_elems / tp * ctx.act_bytes
        step_comm = ring_time(hw, ctx.place["cp"], chunk)
        steps = m.cp - 1
        fwd_exposed = max(0.0, steps * step_comm - core_fwd * steps / m.cp) + step_comm / steps
        bwd_exposed = max(0.0, 2 * steps * step_comm - core_bwd * steps / m.cp) + step_comm / steps
        c.parts["cp_comm"] = fwd_exposed + bwd_exposed
        c.sent["cp"] = 3 * steps * chunk  # K/V forward; K/V and dK/dV backward
    return c


def _mlp_gemms(ctx: Context, tokens: float, ffn_per_rank: float, groups: int = 1) -> tuple[float, float]:
    md, hw, p = ctx.model, ctx.hw, ctx.prec
    h = md.hidden_size
    up = ffn_per_rank * (2 if md.swiglu else 1)
    f1, b1 = linear_time(hw, p, tokens, h, up, groups)
    f2, b2 = linear_time(hw, p, tokens, ffn_per_rank, h, groups)
    fwd = f1 + f2 + _cast_overhead(ctx, tokens * (h + ffn_per_rank) * groups)
    bwd = b1 + b2 + _cast_overhead(ctx, 2 * tokens * (up + h) * groups)
    # SwiGLU (or GeLU) activation: read 2f, write f forward; about twice that backward.
    act = tokens * groups * ffn_per_rank * 3 * ctx.act_bytes
    return fwd + memory_time(hw, act), bwd + memory_time(hw, 2 * act)


def _block_cost(m: Mapping, fwd: float, bwd: float, selective_s: float) -> Cost:
    """A block's compute; recompute adds `selective_s` (selective) or its forward (full)."""
    c = Cost()
    c.parts["compute"] = fwd + bwd
    c.fwd_compute, c.bwd_compute = fwd, bwd
    if m.recompute == "selective":
        c.parts["recompute"] = selective_s
    elif m.recompute == "full":
        c.parts["recompute"] = fwd
    return c


def _norm_time(ctx: Context, tokens: float) -> float:
    """One RMSNorm/LayerNorm forward over a sequence-parallel shard: read and write a row."""
    return memory_time(ctx.hw, tokens * 2 * ctx.model.hidden_size / ctx.mapping.tp * ctx.act_bytes)


def dense_mlp_cost(ctx: Context, ffn: int, module: str = "mlp") -> Cost:
    """A tp-split MLP: a dense layer's (`module` "mlp", with its input norm) or the shared
    experts of a MoE layer ("shared_experts", the norm being the MoE block's)."""
    m, hw = ctx.mapping, ctx.hw
    T, h = ctx.tokens_attn, ctx.model.hidden_size
    fwd, bwd = _mlp_gemms(ctx, T, ffn / m.tp)
    elem = T * 4 * h / m.tp * ctx.act_bytes  # norm + residual
    fwd += memory_time(hw, elem) + 6 * hw.kernel_overhead_s
    bwd += memory_time(hw, 2 * elem) + 12 * hw.kernel_overhead_s
    whole = recomputes(m, module)
    redo = fwd if whole else 0.0
    if module == "mlp" and recomputes(m, "layernorm") and not whole:
        redo += _norm_time(ctx, T)
    c = _block_cost(m, fwd, bwd, redo)
    c.launches = 18 + 3 + 6 * (2 if ctx.fp8 else 1)
    # Full recompute, or recomputing the whole MLP, gathers its sequence-parallel input again.
    again = m.recompute == "full" or whole
    _tp_comm(ctx, c, T, 2, 1, 1.5 if again else 1.0)
    return c


def moe_cost(ctx: Context, shared: Cost | None = None,
             gemms: tuple[float, float] | None = None) -> Cost:
    """Router, dispatcher, local experts, combine; plus shared experts if the model has them
    (`shared`: their `dense_mlp_cost`, and `gemms`: `moe_gemms`, when the caller has them)."""
    md, m, hw = ctx.model, ctx.mapping, ctx.hw
    h, E = md.hidden_size, md.num_experts
    Te = ctx.tokens_moe
    local_experts = E // m.ep
    assigned = _assigned(ctx)
    fwd, bwd = gemms if gemms is not None else moe_gemms(ctx)
    # Data movement of dispatch and combine (`dispatch.routed_traffic`), the same rows again
    # backward; fp32 router scores: softmax/sigmoid, top-k, aux loss, about 8 passes of T x E.
    tokens_in = Te * m.tp * m.ep if m.dispatcher == "allgather" else Te
    rows = routed_traffic(md, m.dispatcher, m.ep, ctx.place["ep"].per_domain, tokens_in, assigned)
    elem = rows * h * ctx.act_bytes + Te * E * 4 * 8
    # Launches: router, permutation and dispatcher kernels, plus one GEMM per local expert
    # and GEMM (TE's grouped linear issues per-expert cuBLAS calls; fp8 adds a quantization
    # kernel per expert input).
    expert_kernels = local_experts * (1 + ctx.fp8)
    fwd += memory_time(hw, elem) + (25 + 2 * expert_kernels) * hw.kernel_overhead_s
    bwd += memory_time(hw, elem) + (40 + 4 * expert_kernels) * hw.kernel_overhead_s
    launches = 65 + 6 * expert_kernels + 3 + 3
    # Selective recompute: the whole MoE block forward ("moe"), else the experts' activation
    # function (read 2f, write f per routed row, "moe_act"); the pre-MLP norm ("layernorm").
    if recomputes(m, "moe"):
        redo = fwd
    else:
        act = assigned * md.expert_ffn / m.etp * 3 * ctx.act_bytes
        redo = memory_time(hw, act) if recomputes(m, "moe_act") else 0.0
        redo += _norm_time(ctx, ctx.tokens_attn) if recomputes(m, "layernorm") else 0.0
    c = _block_cost(m, fwd, bwd, redo)
    c.launches = launches

    # Dispatch + combine, forward and backward; a recomputed MoE layer dispatches again.
    passes = 4 + (2 if m.recompute == "full" or recomputes(m, "moe") else 0)
    one = dispatch_time(hw, md, m.dispatcher, ctx.place, Te, h * ctx.act_bytes,
                        ctx.capacity_scale, ctx.expert_load, m.ep)
    c.parts["ep_comm"] = passes * one
    for kind, sent in dispatch_bytes(md, m.dispatcher, ctx.place, Te, h * ctx.act_bytes,
                                     ctx.capacity_scale, m.ep).items():
        c.sent[kind] = passes * sent

    if md.shared_ffn:
        c.add(shared if shared is not None else dense_mlp_cost(ctx, md.shared_ffn,
                                                                "shared_experts"))
    return c


def _assigned(ctx: Context) -> float:
    """Routed assignments per rank after dispatch (and the etp gather), busiest rank."""
    md, m = ctx.model, ctx.mapping
    return md.topk * ctx.tokens_moe * ctx.capacity_scale * m.etp * ctx.expert_load


def moe_gemms(ctx: Context) -> tuple[float, float]:
    """Forward and backward seconds of the local experts' GEMMs (with their activation) and
    the router's: the part of `moe_cost` that no dispatcher changes."""
    md, m, p = ctx.model, ctx.mapping, ctx.prec
    local_experts = md.num_experts // m.ep
    per_expert = _assigned(ctx) / local_experts
    fwd, bwd = _mlp_gemms(ctx, per_expert, md.expert_ffn / m.etp, groups=local_experts)
    # Router GEMM (replicated weights, fp32 logits in Megatron: small) and its softmax/top-k.
    rf, rb = linear_time(ctx.hw, "bf16" if p != "fp32" else "fp32", ctx.tokens_moe,
                         md.hidden_size, md.num_experts)
    return fwd + rf, bwd + rb


def recomputes(m: Mapping, module: str) -> bool:
    """Whether selective recompute covers `module` (Megatron's --recompute-modules)."""
    return m.recompute == "selective" and module in m.recompute_modules


def moe_layer_cost(ctx: Context, attn: Cost, moe: Cost) -> Cost:
    """Attention + MoE block; with `moe_a2a_overlap` each expert all-to-all runs beside one
    module of another micro-batch (`dispatch.overlapped_comm`)."""
    c = Cost()
    c.add(attn)
    c.add(moe)
    if ctx.mapping.moe_a2a_overlap:
        # The overlap refuses full and 'moe' recompute: four all-to-alls per layer.
        exposed, slowdown = overlapped_comm(
            c.parts["ep_comm"] / 4, (attn.fwd_compute, attn.bwd_compute),
            (moe.fwd_compute, moe.bwd_compute), ctx.hw.flex_sm_share)
        c.parts["ep_comm"] = exposed
        c.parts["compute"] += slowdown
    return c


def with_offload(ctx: Context, c: Cost, nbytes: float) -> Cost:
    """`c` (one layer) with the exposed part of its activation offloading: `nbytes` go to
    host memory during the forward and come back during the backward, each on its own copy
    stream beside the layer's forward or backward (Megatron-Core
    pipeline_parallel/fine_grained_activation_offload.py: d2h and h2d streams): its compute
    and half of its exposed communication each way (copies to host memory do not share the
    NVLink or network links). A copy longer than that is exposed by the difference."""
    if nbytes > 0 and ctx.hw.host_copy_bps > 0:
        t = nbytes / ctx.hw.host_copy_bps
        comm = sum(c.parts[k] for k in ("tp_comm", "cp_comm", "ep_comm")) / 2
        c.parts["offload"] += (max(0.0, t - c.fwd_compute - comm)
                               + max(0.0, t - c.bwd_compute - comm))
    return c


def host_bound(hw: Hardware, c: Cost) -> Cost:
    """`c` taking at least its host time: when the host launches a block's kernels
    (`launches` x `host_launch_s`) slower than the GPU runs them (compute and exposed
    communication), the GPU waits for the difference (counted as compute)."""
    gap = c.launches * hw.host_launch_s - c.total
    if gap > 0:
        c.parts["compute"] += gap
    return c


def with_mtp(ctx: Context, output: Cost, layer: Cost) -> Cost:
    """The last stage's output block with `mtp_num_layers` multi-token-prediction modules:
    each runs its own output layer and loss (`mtp_logits`) and its layer (`mtp_block`)."""
    c = mtp_logits(ctx, output)
    c.add(mtp_block(ctx, layer))
    return c


def mtp_logits(ctx: Context, output: Cost) -> Cost:
    """The output block once for the model and once per MTP module: Megatron-Core computes
    every MTP loss in the last stage (models/gpt/gpt_model.py), wherever the MTP layers run."""
    c = Cost()
    c.add(output, 1 + (ctx.model.mtp_num_layers or 0))
    return c


def mtp_block(ctx: Context, layer: Cost) -> Cost:
    """The `mtp_num_layers` multi-token-prediction modules without their logits: each runs
    one layer like the decoder's last (`layer`) and a 2h -> h projection of the normalized
    hidden state and next embedding."""
    num = ctx.model.mtp_num_layers or 0
    c = Cost()
    if num:
        c.add(layer, num)
        f, b = mtp_projection(ctx)
        c.parts["compute"] += num * (f + b)
        c.fwd_compute += num * f
        c.bwd_compute += num * b
    return c


def mtp_projection(ctx: Context) -> tuple[float, float]:
    """Forward and backward seconds of one MTP module's 2h -> h projection (split by tp)."""
    h = ctx.model.hidden_size
    return linear_time(ctx.hw, ctx.prec, ctx.tokens_attn, 2 * h, h / ctx.mapping.tp)


def mtp_compute(ctx: Context, output: Cost, layer: tuple[float, float]) -> tuple[float, float]:
    """The forward and backward compute of `with_mtp(ctx, output, L)` alone, for a layer L of
    forward and backward compute `layer`, without building its costs (the same sums in the
    same order)."""
    num = ctx.model.mtp_num_layers or 0
    f, b = mtp_projection(ctx)
    return (output.fwd_compute * (1 + num) + (layer[0] * num + num * f),
            output.bwd_compute * (1 + num) + (layer[1] * num + num * b))


def logits_cost(ctx: Context) -> Cost:
    """Final norm, output layer (vocab split by tp) and the cross-entropy."""
    md, m, hw = ctx.model, ctx.mapping, ctx.hw
    T = ctx.tokens_attn
    v = padded_vocab(md.vocab_size, m.tp) / m.tp
    # The output layer is Megatron's own ColumnParallelLinear, not a Transformer Engine
    # module: it stays in bf16 under fp8 training.
    fwd, bwd = linear_time(hw, "fp32" if ctx.prec == "fp32" else "bf16", T, md.hidden_size, v)
    # Vocab-parallel cross-entropy in fp32 (Megatron's unfused version): forward casts the
    # logits to fp32, subtracts the max, exponentiates, sums and normalizes (about 38 bytes
    # of traffic per logit); backward subtracts the one-hot, scales and casts back (about 22).
    fwd += memory_time(hw, T * v * 38) + 10 * hw.kernel_overhead_s
    bwd += memory_time(hw, T * v * 22) + 8 * hw.kernel_overhead_s
    c = Cost(launches=21)
    c.parts["compute"] = fwd + bwd
    c.fwd_compute, c.bwd_compute = fwd, bwd
    _tp_comm(ctx, c, T, 1, 1)
    return c


def embedding_cost(ctx: Context) -> Cost:
    """Vocab-parallel lookup; its backward builds a dense fp32 gradient of the local table
    (zero, scatter-add) and accumulates it into the main gradient."""
    T, h, tp = ctx.tokens_attn, ctx.model.hidden_size, ctx.mapping.tp
    table = padded_vocab(ctx.model.vocab_size, tp) / tp * h
    elem = T * h / tp * ctx.act_bytes * 2
    c = Cost()
    fwd = memory_time(ctx.hw, elem)
    bwd = memory_time(ctx.hw, 2 * elem + table * 4 * 3)
    c.parts["compute"] = fwd + bwd
    c.fwd_compute, c.bwd_compute = fwd, bwd
    _tp_comm(ctx, c, T, 1, 0)
    return c
