"""The folded mapping space: every mapping the planner considers, and why others are out.

Axes: attention tp, cp, dp; MoE etp, ep, edp; shared pp, vpp, uneven first/last pipeline
stage, micro-batch size, recompute, distributed optimizer, dispatcher and rank order. Both
folded mappings (etp and ep chosen freely over the same ranks) and the classic Megatron
mapping (etp = tp, ep carved out of dp) are members. Validity is the cost model's
`validate.mapping_errors`, so the planner never proposes what `estimate` would refuse.
"""

from __future__ import annotations

from cost_model.specs import ClusterSpec, ModelSpec, TrainingSpec

RECOMPUTE = ("none", "selective", "full")
DISPATCHERS = ("alltoall", "allgather")
ORDERS = ("tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp")
MICRO_BATCH_SIZES = (1, 2, 4, 8)
MAX_VPP = 8
MAX_CP = 32
# Context parallelism is for long sequences: each rank keeps at least this many tokens.
MIN_CP_CHUNK = 2048


def _divisors(n: int, limit: int | None = None) -> list[int]:
    return [d for d in range(1, (limit or n) + 1) if n % d == 0]


def _pow2_upto(n: int) -> list[int]:
    out, v = [], 1
    while v <= n:
        out.append(v)
        v *= 2
    return out


def candidate_values(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
                     fixed: dict) -> dict[str, list]:
    """Values per axis before joint validity checks."""
    world, g = cluster.world_size, cluster.gpus_per_node
    heads = model.num_attention_heads
    tp_vals = [t for t in _pow2_upto(min(g, heads)) if heads % t == 0]
    cp_vals = [c for c in _pow2_upto(MAX_CP)
               if c == 1 or (training.seq_length % (2 * c) == 0
                             and training.seq_length // c >= MIN_CP_CHUNK)]
    pp_vals = [p for p in _divisors(world) if p <= model.num_layers]
    if model.is_moe:
        ep_vals = [e for e in _divisors(model.num_experts) if world % e == 0]
        etp_vals = [t for t in _pow2_upto(g) if model.expert_ffn % t == 0]
        dispatchers = list(DISPATCHERS)
    else:
        ep_vals, etp_vals, dispatchers = [1], [1], ["alltoall"]
    vals = {
        "tp": tp_vals,
        "cp": cp_vals,
        "pp": pp_vals,
        "vpp": list(range(1, MAX_VPP + 1)),
        "ep": ep_vals,
        "etp": etp_vals,
        "micro_batch_size": list(MICRO_BATCH_SIZES),
        "recompute": list(RECOMPUTE),
        "distributed_optimizer": [True, False],
        "dispatcher": dispatchers,
        "order": list(ORDERS),
    }
    for key, value in fixed.items():
        if key in vals:
            vals[key] = [value]
    return vals


# Pinning all of these pins the whole mapping: the stage split then stays even unless pinned.
CONTRACT_FIELDS = ("tp", "cp", "pp", "vpp", "ep", "etp", "micro_batch_size", "recompute",
                   "distributed_optimizer", "dispatcher", "order")


def pinned_split(fixed: dict) -> list[tuple[int | None, int | None]]:
    """The stage split of pass 1: the pinned one, else the even split."""
    return [(fixed.get("decoder_first_pipeline_num_layers"),
             fixed.get("decoder_last_pipeline_num_layers"))]
