"""The folded mapping space: every mapping the planner considers, and why others are out.

Axes: attention tp, cp, dp; MoE etp, ep, edp; shared pp, vpp, uneven first/last pipeline
stage, micro-batch size, recompute, distributed optimizer, dispatcher and rank order. Both
folded mappings (etp and ep chosen freely over the same ranks) and the classic Megatron
mapping (etp = tp, ep carved out of dp) are members. Validity is the cost model's
`validate.mapping_errors`, so the planner never proposes what `estimate` would refuse.
"""

from __future__ import annotations

from cost_model.runtimes import runtime_supports
from cost_model.specs import ClusterSpec, ModelSpec, TrainingSpec

RECOMPUTE = ("none", "selective", "full")
DISPATCHERS = ("alltoall", "allgather", "flex")
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
    # Tensor parallelism stays on NVLink: up to the NVLink domain (a node, or a rack).
    world, g = cluster.world_size, cluster.domain_size
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
        overlap = [False, True]
    else:
        ep_vals, etp_vals, dispatchers, overlap = [1], [1], ["alltoall"], [False]
    vals = {
        "tp": tp_vals,
        "cp": cp_vals,
        "pp": pp_vals,
        "vpp": list(range(1, MAX_VPP + 1)),
        "ep": ep_vals,
        "etp": etp_vals,
        "micro_batch_size": list(MICRO_BATCH_SIZES),
        "recompute": list(RECOMPUTE),
        "recompute_modules": module_sets(model),
        "distributed_optimizer": [True, False],
        "dispatcher": dispatchers,
        "flex_backend": ["deepep"],  # HybridEP costs the same under the model: one is enough
        "moe_a2a_overlap": overlap,
        "order": list(ORDERS),
        "pipeline_layout": [None],  # a custom layout is only used where pinned
        "offload_modules": [()],  # so is activation offloading
        "decoder_first_pipeline_num_layers": [None],  # pinned, or the planner's (vpp == 1)
        "decoder_last_pipeline_num_layers": [None],
    }
    for key, value in fixed.items():
        if key in vals:
            vals[key] = [value]
    # The cpu preset and runtime 'foldplan' plan for foldplan's executor: only what it runs.
    runtime = "foldplan" if (training.runtime == "foldplan" or cluster.gpu == "cpu") else "megatron"
    for key in ("dispatcher", "flex_backend", "moe_a2a_overlap", "recompute_modules"):
        vals[key] = [v for v in vals[key] if runtime_supports(runtime, key, v)]
        if not vals[key]:  # only a pinned value can leave nothing
            raise ValueError(f"fixed.{key}={fixed[key]!r}: foldplan's executor does not run it, "
                             f"and plans for the cpu preset or runtime 'foldplan' are for it")
    return vals


def module_sets(model: ModelSpec) -> list[tuple[str, ...]]:
    """Selective recompute choices (`recompute_modules`): Megatron's default (core attention),
    the cheap recompute of norms and activation functions that public MoE recipes use, and
    whole MLP / MoE blocks (their inputs kept)."""
    cheap = ["layernorm"] + (["moe_act"] if model.is_moe else [])
    if model.multi_latent_attention:
        cheap.append("mla_up_proj")
    blocks = ["layernorm", "moe" if model.is_moe else "mlp"]
    if model.is_moe and model.shared_ffn:
        blocks.append("shared_experts")
    if model.is_moe and model.num_moe_layers < model.num_layers:
        blocks.append("mlp")
    return [("core_attn",), tuple(sorted(cheap)), tuple(sorted(blocks))]


# Pinning all of these pins the whole mapping: the stage split then stays even unless pinned.
CONTRACT_FIELDS = ("tp", "cp", "pp", "vpp", "ep", "etp", "micro_batch_size", "recompute",
                   "distributed_optimizer", "dispatcher", "order")
# Searched beside them; left free, the planner chooses them.
OPTION_FIELDS = ("recompute_modules", "flex_backend", "moe_a2a_overlap")


def pinned_split(fixed: dict) -> list[tuple[int | None, int | None]]:
    """The stage split of pass 1: the pinned one, else the even split."""
    return [(fixed.get("decoder_first_pipeline_num_layers"),
             fixed.get("decoder_last_pipeline_num_layers"))]
