"""Expert dispatch and combine: how many bytes each dispatcher moves, over which links, and
what `moe_a2a_overlap` hides.

Legend: T tokens of one rank (the sequence-parallel shard), k experts per token, E experts,
n ranks in the expert-parallel group, spread over N nodes with q ranks per node, h hidden.

- alltoall (NCCL all-to-all, Megatron's `alltoall` dispatcher): every (token, expert) copy
  travels, T*k*h elements per rank; (n - q)/n of them cross the network.
- allgather: the tp x ep group all-gathers every token (T*h per rank, tp*ep times received).
- flex (DeepEP / HybridEP, Megatron's `flex` dispatcher): a token goes over the network once
  per destination node, to the GPU with the same local index there, which forwards it over
  NVLink to each GPU of that node holding one of its experts; inside a node it goes once per
  destination GPU (DeepEP, "DeepEP: an efficient expert-parallel communication library",
  DeepSeek 2025; Liu et al., DeepSeek-V3 technical report, section 3.2.2). The expected
  number of distinct destination GPUs and nodes per token follows from the routing:
  `routing_fanout`. Network and NVLink parts run at the same time (different SMs and links).

Group-limited routing (`moe_router_num_groups` G, `moe_router_group_topk` M): a token picks M
of the G expert groups, then its k experts inside them, so with groups aligned to nodes it
reaches at most M nodes (DeepSeek-V3's node-limited routing, M = 4 of 8 nodes).
"""

from __future__ import annotations

from functools import lru_cache
from math import comb

from .hardware import Hardware
from .kernels import collective_bytes_and_steps, collective_time
from .layout import GroupPlacement
from .specs import ModelSpec


def expected_distinct_bins(num_items: int, bin_size: int, draws: int) -> float:
    """Expected number of distinct bins hit when `draws` distinct items are picked uniformly
    from `num_items` items split into bins of `bin_size`: B * (1 - C(I - b, d) / C(I, d)).

    Worked example: 128 experts on 16 GPUs (bins of 8), top-8: 16 * (1 - C(120,8)/C(128,8))
    = 6.60 distinct GPUs per token; on 2 nodes (bins of 64): 2 * (1 - C(64,8)/C(128,8))
    = 1.99 nodes."""
    if bin_size >= num_items:
        return 1.0
    draws = min(draws, num_items)
    bins = num_items / bin_size
    return bins * (1.0 - comb(num_items - bin_size, draws) / comb(num_items, draws))


def routing_fanout(model: ModelSpec, ep: int, ranks_per_node: int) -> tuple[float, float]:
    """(distinct destination GPUs, distinct destination nodes) of one token, expected, for an
    expert-parallel group of `ep` ranks with `ranks_per_node` of them per node (experts
    spread evenly, router balanced as `moe_expert_load_imbalance` 1 assumes). "Node" is the
    unit the network part deduplicates for: the NVLink domain (a node, or a rack of an
    NVL72 system, where the hierarchical dispatch forwards over NVLink)."""
    return _routing_fanout(model.num_experts, model.topk, model.moe_router_num_groups,
                           model.moe_router_group_topk, ep, ranks_per_node)


@lru_cache(maxsize=4096)
def _routing_fanout(E: int, k: int, G: int | None, M: int | None, ep: int,
                    ranks_per_node: int) -> tuple[float, float]:
    """`routing_fanout` of the routing's numbers, kept (the planner asks thousands of times)."""
    per_gpu = E // ep
    nodes = max(1, -(-ep // ranks_per_node))
    per_node = E // nodes
    if not G or not M or M >= G:
        return (expected_distinct_bins(E, per_gpu, k), expected_distinct_bins(E, per_node, k))
    group = E // G
    # The M chosen groups hold the token's k experts; count the GPUs / nodes they cover.
    # A bin (GPU or node) holding whole groups is hit when one of its groups is chosen; a
    # group spread over several bins has its k/M experts drawn among them.
    def fanout(bin_size: int) -> float:
        if bin_size >= group:
            return expected_distinct_bins(G, bin_size // group, M)
        return M * expected_distinct_bins(group, bin_size, max(1, k // M))

    return fanout(per_gpu), fanout(per_node)


def dispatch_time(hw: Hardware, model: ModelSpec, dispatcher: str, place: dict[str, GroupPlacement],
                  tokens: float, tok_bytes: float, kept: float, load: float,
                  ep: int) -> float:
    """Seconds of one dispatch (or combine: the same volume back) on the busiest rank.

    `tokens` per rank, `tok_bytes` per token, `kept` the fraction of (token, expert) copies
    kept under a capacity factor, `load` the busiest receiver's bytes over the mean."""
    if dispatcher == "allgather":
        return collective_time(hw, place["tp_ep"], "all_gather", tokens * tok_bytes)
    copies = tokens * model.topk * kept * tok_bytes
    etp = collective_time(hw, place["etp"], "all_gather", copies * load)
    if dispatcher == "alltoall":
        return collective_time(hw, place["ep"], "all_to_all", copies, load) + etp
    p = place["ep"]
    if p.size <= 1:
        return etp
    gpus, nodes = routing_fanout(model, ep, p.per_domain)
    num_nodes = -(-p.size // p.per_domain)
    # Each (token, destination GPU) pair crosses NVLink once, but those on the sending GPU
    # itself (1 in q of a domain's GPUs); each (token, remote domain) pair crosses the network.
    nvl = tokens * tok_bytes * gpus * (1 - 1 / p.per_domain) * kept * load
    t = nvl / (hw.intra_bps * hw.flex_intra_eff)
    if p.crosses_domain:
        rdma = tokens * tok_bytes * nodes * (1 - 1 / num_nodes) * kept * load
        t = max(t, rdma / (min(hw.link_bps[1:p.tier + 1]) * hw.flex_rdma_eff))
    return t + 2 * hw.link_latency_s[p.tier] + etp


def dispatch_bytes(model: ModelSpec, dispatcher: str, place: dict[str, GroupPlacement],
                   tokens: float, tok_bytes: float, kept: float, ep: int) -> dict[str, float]:
    """Bytes one rank sends in one dispatch (or combine), by group kind, as `dispatch_time`
    moves them (the mean rank: traffic, not the busiest receiver's time)."""
    if dispatcher == "allgather":
        return {"tp_ep": collective_bytes_and_steps("all_gather", place["tp_ep"].size,
                                                    tokens * tok_bytes)[0]}
    copies = tokens * model.topk * kept * tok_bytes
    out = {"etp": collective_bytes_and_steps("all_gather", place["etp"].size, copies)[0]}
    p = place["ep"]
    if dispatcher == "alltoall" or p.size <= 1:
        out["ep"] = collective_bytes_and_steps("all_to_all", p.size, copies)[0]
        return out
    gpus, nodes = routing_fanout(model, ep, p.per_domain)
    num_nodes = -(-p.size // p.per_domain)
    out["ep"] = tokens * tok_bytes * kept * (gpus * (1 - 1 / p.per_domain)
                                             + nodes * (1 - 1 / num_nodes))
    return out


def overlapped_layer(comm_s: float, attn: tuple[float, float], experts: tuple[float, float],
                     layers: int = 8) -> float:
    """Steady-state seconds per layer of `moe_a2a_overlap`: one micro-batch's forward beside
    another's backward, on a compute and a communication stream.

    Megatron-Core's EP overlap (--overlap-moe-expert-parallel-comm with
    --delay-wgrad-compute) issues, per layer (models/common/model_chunk_schedule_plan.py,
    `TransformerLayerSchedulePlan.run`):

        communication: combine bwd | dispatch fwd -> dispatch bwd        | combine fwd
        compute:       attn fwd    | experts dgrad -> wgrad -> experts fwd | attn bwd

    each stream in order, each module waiting for its inputs: the experts' dgrad for the
    combine's backward and the attention's forward, the dispatch's forward for the attention's
    forward, the dispatch's backward for the dgrad (the delayed wgrad is what it hides
    under), the experts' forward for the dispatch's forward, the combine's forward for the
    experts' forward, the attention's backward for the dispatch's backward; the next layer's
    combine backward for this attention backward, its attention forward for this combine
    forward. `comm_s` is one all-to-all (dispatch or combine, either direction), `attn` and
    `experts` are (forward, backward) compute; the experts' backward splits evenly into
    dgrad and wgrad (two GEMMs of the same size each). The answer is the per-layer period of
    `layers` consecutive layers after the first (the pipeline's start and end are not
    paired)."""
    a_f, a_b = attn
    m_f, m_b = experts
    ab = cf = 0.0  # the previous layer's attention backward and combine forward ends
    ends: list[float] = []
    state = None
    for i in range(layers + 1):
        cb = max(cf, ab) + comm_s                  # combine backward
        af = max(ab, cf) + a_f                     # attention forward
        mbd = max(af, cb) + m_b / 2                # experts dgrad
        df = max(cb, af) + comm_s                  # dispatch forward
        mbw = mbd + m_b / 2                        # experts wgrad (delayed)
        db = max(df, mbd) + comm_s                 # dispatch backward
        mf = max(mbw, df) + m_f                    # experts forward
        cf = max(db, mf) + comm_s                  # combine forward
        ab = max(mf, db) + a_b                     # attention backward
        end = max(ab, cf)
        ends.append(end)
        # The next layer depends on (ab, cf) relative to the end only: once that repeats,
        # every later layer takes the last one's time.
        now = (ab - end, cf - end)
        if now == state and i < layers:
            return (end + (layers - i) * (end - ends[-2]) - ends[0]) / layers
        state = now
    return (ends[-1] - ends[0]) / layers


def overlapped_comm(comm_s: float, attn: tuple[float, float], experts: tuple[float, float],
                    sm_share: float) -> tuple[float, float]:
    """(exposed communication, compute slowdown) of one layer under `moe_a2a_overlap`: of
    its four all-to-alls (`comm_s` each), what `overlapped_layer`'s schedule does not hide;
    while they run beside compute, the communication kernels hold `sm_share` of the SMs
    (DeepEP 24 of 132 on H100), so the compute under them slows by that share."""
    compute = sum(attn) + sum(experts)
    exposed = max(0.0, overlapped_layer(comm_s, attn, experts) - compute)
    hidden = 4 * comm_s - exposed
    return exposed, hidden * sm_share


def routed_traffic(model: ModelSpec, dispatcher: str, ep: int, ranks_per_node: int,
                   tokens: float, copies: float) -> float:
    """HBM traffic, in token rows of h elements, of one forward pass of the MoE layer's data
    movement on one rank (the backward moves the same rows the other way: the gradient of a
    permutation is the inverse permutation). `tokens` rows come in, `copies` (token, expert)
    rows reach this rank's experts. Itemized after Megatron-Core 0.16
    (transformer/moe/token_dispatcher.py); every step reads and writes its rows:

    - alltoall: permute to expert order (T in, C out), all-to-all send and receive buffers
      (2C), sort the received chunks by local expert when a rank has several (2C), and the
      mirror image for the combine (2C + 2C + C in, T out): 2T + 10C (8C with one local
      expert).
    - flex: the dispatch reads each token once and lands one row per destination GPU
      (R = T * distinct GPUs per token arrive on a balanced rank), the rank expands them to
      expert order (R in, C out), and the combine mirrors it: 2T + 4R + 2C.
    - allgather: gather all tp*ep ranks' tokens (T*tp*ep rows written), pick this rank's
      copies (C), scatter-add them back (C in, T*tp*ep out, reduce-scatter): 2C + 4*T*tp*ep
      - the caller passes T*tp*ep as `tokens` there.
    """
    if dispatcher == "allgather":
        return 2 * copies + 4 * tokens
    if dispatcher == "flex" and ep > 1:
        rows = tokens * routing_fanout(model, ep, ranks_per_node)[0]
        return 2 * tokens + 4 * rows + 2 * copies
    local = model.num_experts // ep
    return 2 * tokens + (10 if local > 1 and ep > 1 else 8) * copies
