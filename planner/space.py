"""The folded mapping space: every mapping the planner considers, and why others are out.

Axes: attention tp, cp, dp; MoE etp, ep, edp; shared pp, vpp, uneven first/last pipeline
stage, micro-batch size, recompute, distributed optimizer, dispatcher and rank order. Both
folded mappings (etp and ep chosen freely over the same ranks) and the classic Megatron
mapping (etp = tp, ep carved out of dp) are members. Validity is the cost model's
`validate.mapping_errors`, so the planner never proposes what `estimate` would refuse.
"""

from __future__ import annotations

from collections.abc import Iterator

from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from cost_model.validate import mapping_errors

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


def all_splits(model: ModelSpec, pp: int, fixed: dict) -> list[tuple[int | None, int | None]]:
    """Every (first, last) stage layer count: the even split (None, None) and every uneven
    one (middle stages even, at least one layer per stage)."""
    if not _split_free(fixed):
        return pinned_split(fixed)
    L = model.num_layers
    out: list[tuple[int | None, int | None]] = [(None, None)]
    for first in range(1, L):
        for last in range(1, L - first + 1):
            rest = L - first - last
            if pp == 2:
                ok = rest == 0
            else:
                ok = rest >= pp - 2 and rest % (pp - 2) == 0
            if ok and not (L % pp == 0 and first == last == L // pp):
                out.append((first, last))
    return out


def recompute_depths(model: ModelSpec, recompute: str, pp: int, vpp: int, first, last,
                     fixed: dict) -> list[int | None]:
    """Recompute depths (Megatron block method): None = every layer, else 1..largest stage-1.
    Partial depths are in the space where the stage solver picks them: pp >= 2, vpp == 1."""
    if "recompute_num_layers" in fixed:
        return [fixed["recompute_num_layers"]]
    if recompute != "full" or not _split_free(fixed) or pp < 2 or vpp != 1:
        return [None]
    L = model.num_layers
    if first is None and last is None:
        largest = L // (pp * vpp)
    else:
        middle = pp - (first is not None) - (last is not None)
        rest = L - (first or 0) - (last or 0)
        largest = max(first or 0, last or 0, rest // middle if middle else 0)
    return [None] + list(range(1, largest))


def _split_free(fixed: dict) -> bool:
    return not ({"decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"}
                & set(fixed)) and not all(f in fixed for f in CONTRACT_FIELDS)


def enumerate_mappings(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
                       fixed: dict) -> Iterator[Mapping]:
    """Every valid (resolved) mapping of the space, memory not yet checked."""
    world = cluster.world_size
    v = candidate_values(model, cluster, training, fixed)
    gbs = training.global_batch_size
    for tp in v["tp"]:
        for cp in v["cp"]:
            for pp in v["pp"]:
                if world % (tp * cp * pp):
                    continue
                dp = world // (tp * cp * pp)
                if "dp" in fixed and fixed["dp"] != dp:
                    continue
                for ep in v["ep"]:
                    for etp in v["etp"]:
                        if world % (etp * ep * pp):
                            continue
                        edp = world // (etp * ep * pp)
                        if "edp" in fixed and fixed["edp"] != edp:
                            continue
                        yield from _inner(model, cluster, training, fixed, v, tp, cp, pp, dp,
                                          ep, etp, edp, gbs)


def _inner(model, cluster, training, fixed, v, tp, cp, pp, dp, ep, etp, edp, gbs):
    for mbs in v["micro_batch_size"]:
        if gbs % (mbs * dp):
            continue
        for vpp in v["vpp"] if pp > 1 else [1]:
            if vpp > 1 and model.num_layers % (pp * vpp):
                continue
            splits = all_splits(model, pp, fixed) if vpp == 1 and pp > 1 else pinned_split(fixed)
            for first, last in splits:
                for order in v["order"] if (pp > 1 and edp == dp) else ["tp-cp-ep-dp-pp"]:
                    if "order" in fixed and fixed["order"] != order:
                        continue
                    for disp in v["dispatcher"]:
                        for dist in v["distributed_optimizer"]:
                            for rc in v["recompute"]:
                                for depth in recompute_depths(model, rc, pp, vpp, first, last, fixed):
                                    m = Mapping(
                                        tp=tp, cp=cp, pp=pp, vpp=vpp, ep=ep, etp=etp, dp=dp,
                                        edp=edp, micro_batch_size=mbs, recompute=rc,
                                        recompute_num_layers=depth,
                                        distributed_optimizer=dist, dispatcher=disp, order=order,
                                        decoder_first_pipeline_num_layers=first,
                                        decoder_last_pipeline_num_layers=last,
                                        sequence_parallel=fixed.get("sequence_parallel"),
                                    )
                                    errors, resolved = mapping_errors(model, cluster, training, m)
                                    if not errors:
                                        yield resolved
