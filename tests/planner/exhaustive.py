"""The test oracle: every mapping of the planner's space, stage splits and recompute depths
included, enumerated without any bound. Small spaces only (tests and benchmarks)."""

from __future__ import annotations

from collections.abc import Iterator

from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from cost_model.stage_split import parse_layout
from cost_model.validate import mapping_errors
from planner.space import CONTRACT_FIELDS, candidate_values, pinned_split


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
    return not ({"decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                 "pipeline_layout"} & set(fixed)) and not all(f in fixed for f in CONTRACT_FIELDS)


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
        layout = fixed.get("pipeline_layout")
        vpps = v["vpp"] if pp > 1 else [1]
        if layout is not None:  # a pinned layout fixes the split and, with pp, vpp
            n = len(parse_layout(layout))
            vpps = [] if n % pp else [n // pp]
        for vpp in vpps:
            if layout is None and vpp > 1 and _split_free(fixed) and all(
                    (model.num_layers + x) % (pp * vpp) for x in (0, 1, 2)):
                continue
            splits = all_splits(model, pp, fixed) if vpp == 1 and pp > 1 and layout is None \
                else pinned_split(fixed)
            for first, last in splits:
                for order in v["order"] if (pp > 1 and edp == dp) else ["tp-cp-ep-dp-pp"]:
                    if "order" in fixed and fixed["order"] != order:
                        continue
                    for opts in _options(v, pp, vpp, fixed):
                        for dist in v["distributed_optimizer"]:
                            for depth in recompute_depths(model, opts["recompute"], pp, vpp,
                                                          first, last, fixed):
                                m = Mapping(
                                    tp=tp, cp=cp, pp=pp, vpp=vpp, ep=ep, etp=etp, dp=dp,
                                    edp=edp, micro_batch_size=mbs, recompute_num_layers=depth,
                                    distributed_optimizer=dist, order=order,
                                    decoder_first_pipeline_num_layers=first,
                                    decoder_last_pipeline_num_layers=last,
                                    sequence_parallel=fixed.get("sequence_parallel"),
                                    pipeline_layout=layout, **opts,
                                )
                                errors, resolved = mapping_errors(model, cluster, training, m)
                                if not errors:
                                    yield resolved


_ACCOUNT = ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split")


def _options(v, pp, vpp, fixed) -> Iterator[dict]:
    """Recompute mode and modules, dispatcher and its backend, the all-to-all overlap, and
    (with interleaving) whether the embedding / loss count as layers in the split."""
    accounts = [(False, False)]
    if any(f in fixed for f in _ACCOUNT) or fixed.get("pipeline_layout") is not None:
        accounts = [tuple(fixed.get(f, False) for f in _ACCOUNT)]
    elif pp > 1 and vpp > 1:
        accounts = [(a, b) for a in (False, True) for b in (False, True)]
    for rc in v["recompute"]:
        for modules in v["recompute_modules"] if rc == "selective" else [("core_attn",)]:
            for disp in v["dispatcher"]:
                for backend in v["flex_backend"] if disp == "flex" else ["deepep"]:
                    for overlap in v["moe_a2a_overlap"]:
                        for emb, loss in accounts:
                            yield dict(recompute=rc, recompute_modules=modules, dispatcher=disp,
                                       flex_backend=backend, moe_a2a_overlap=overlap,
                                       account_for_embedding_in_pipeline_split=emb,
                                       account_for_loss_in_pipeline_split=loss)
