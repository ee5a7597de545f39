"""Checks that need a mapping together with a model, a cluster and a training setup.

Infeasibility is data: `mapping_errors` returns typed `MappingError`s (a kind, the field it
concerns, a message naming the offending values); the planner branches on kinds, the API
shows fields and messages, the executor adds refusals of its own kind. `resolve_mapping`
fills in the derived fields (dp, edp, sequence_parallel) or raises `InvalidMapping`.

Sizes, the batch and the stage split are checked here (the split's arithmetic and its rules in
`stage_split.py`); Megatron-Core's rules for its newer options (a2a overlap, flex dispatcher,
recompute modules, fp8 recipes) in `option_rules.py`; with `training.runtime='foldplan'` what
foldplan's executor cannot run (`runtimes.py`, kind "executor").
"""

from __future__ import annotations

from .errors import ErrorKind, InvalidMapping, MappingError, field_section
from .option_rules import option_errors
from .runtimes import executor_errors
from .specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from .stage_split import StageSplitError, layout_mtp_rank, stage_layer_counts

__all__ = ["ErrorKind", "InvalidMapping", "MappingError", "data_parallel_sizes",
           "field_section", "mapping_data_parallel", "mapping_errors", "resolve_mapping"]


def data_parallel_sizes(world_size: int, tp: int, cp: int, ep: int, etp: int,
                        pp: int) -> tuple[int, int]:
    """(dp, edp): what tp*cp*pp (attention) and etp*ep*pp (experts) leave of the world. Exact
    only where they divide it (`mapping_errors` checks)."""
    return world_size // (tp * cp * pp), world_size // (etp * ep * pp)


def mapping_data_parallel(world_size: int, m: Mapping) -> tuple[int, int]:
    """(dp, edp) of `m`: its own when given, else `data_parallel_sizes`."""
    dp, edp = data_parallel_sizes(world_size, m.tp, m.cp, m.ep, m.etp, m.pp)
    return m.dp or dp, m.edp or edp


def _derive(world: int, divisor: int, given: int | None, what: str, field: str,
            errors: list[MappingError]) -> int:
    if world % divisor:
        errors.append(MappingError("world", field, f"{what} = {divisor} does not divide the "
                                                   f"{world} GPUs"))
        return given or 1
    derived = world // divisor
    if given is not None and given != derived:
        errors.append(MappingError("world", field, f"{what} x {given} = {divisor * given} but "
                                                   f"the cluster has {world} GPUs"))
    return derived


def _layer_errors(model: ModelSpec, training: TrainingSpec, m: Mapping, sp: bool,
                  errors: list[MappingError]) -> None:
    def err(field: str, message: str) -> None:
        errors.append(MappingError("layer", field, message))

    heads, groups = model.num_attention_heads, model.query_groups
    if heads % m.tp:
        err("tp", f"tp={m.tp} does not divide num_attention_heads={heads}")
    elif not model.multi_latent_attention and groups % m.tp:
        err("tp", f"tp={m.tp} does not divide num_query_groups={groups}")
    if model.ffn_hidden_size % m.tp and (model.num_moe_layers < model.num_layers):
        err("tp", f"tp={m.tp} does not divide ffn_hidden_size={model.ffn_hidden_size}")
    if model.is_moe:
        if model.num_experts % m.ep:
            err("ep", f"ep={m.ep} does not divide num_experts={model.num_experts}")
        if model.expert_ffn % m.etp:
            err("etp", f"etp={m.etp} does not divide moe_ffn_hidden_size={model.expert_ffn}")
        if model.shared_ffn % m.tp:
            err("tp", f"tp={m.tp} does not divide moe_shared_expert_intermediate_size="
                      f"{model.shared_ffn}")
    else:
        if m.ep > 1:
            err("ep", f"ep={m.ep} needs a MoE model, but num_experts is 0")
        if m.etp not in (1, m.tp):
            err("etp", f"etp={m.etp} needs a MoE model, but num_experts is 0")
    s = training.seq_length
    if m.cp > 1 and s % (2 * m.cp):
        err("cp", f"seq_length={s} is not divisible by 2*cp={2 * m.cp} (load-balanced causal CP)")
    if m.tp > 1 and model.is_moe and not sp:
        err("sequence_parallel", f"tp={m.tp} with a MoE model needs sequence_parallel")
    if sp and (s // m.cp) % m.tp:
        err("tp", f"seq_length/cp = {s // m.cp} is not divisible by tp={m.tp} (sequence parallel)")


def _pipeline_errors(model: ModelSpec, m: Mapping, errors: list[MappingError]) -> None:
    try:
        stage_layer_counts(model.num_layers, m.pp, m.vpp, m.decoder_first_pipeline_num_layers,
                           m.decoder_last_pipeline_num_layers,
                           embedding=m.account_for_embedding_in_pipeline_split,
                           loss=m.account_for_loss_in_pipeline_split,
                           layout=m.pipeline_layout)
        if m.pipeline_layout is not None:
            layout_mtp_rank(m.pipeline_layout, model.num_layers, m.pp, m.vpp,
                            model.mtp_num_layers)
    except StageSplitError as e:
        errors.append(MappingError(e.kind, e.field, str(e)))
    if m.vpp > 1 and m.pp == 1:
        errors.append(MappingError("pipeline", "vpp", f"vpp={m.vpp} needs pp > 1"))
    if m.recompute_num_layers is not None and m.recompute != "full":
        errors.append(MappingError(
            "option", "recompute_num_layers", f"recompute_num_layers={m.recompute_num_layers} "
            f"needs recompute='full' (got {m.recompute!r})"))


def mapping_errors(
    model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, mapping: Mapping
) -> tuple[list[MappingError], Mapping]:
    """Return (reasons the mapping is invalid, the mapping with derived fields filled in)."""
    m = mapping
    errors: list[MappingError] = []
    world = cluster.world_size
    dp = _derive(world, m.tp * m.cp * m.pp, m.dp, f"tp*cp*pp ({m.tp}*{m.cp}*{m.pp})", "dp",
                 errors)
    edp = _derive(world, m.etp * m.ep * m.pp, m.edp, f"etp*ep*pp ({m.etp}*{m.ep}*{m.pp})", "edp",
                  errors)
    sp = m.tp > 1 if m.sequence_parallel is None else (m.sequence_parallel and m.tp > 1)
    _layer_errors(model, training, m, sp, errors)
    _pipeline_errors(model, m, errors)

    gbs, mbs = training.global_batch_size, m.micro_batch_size
    if gbs % (mbs * dp):
        errors.append(MappingError("batch", "micro_batch_size", f"global_batch_size={gbs} is not "
                                   f"divisible by micro_batch_size*dp = {mbs}*{dp}"))
    elif m.vpp > 1 and (gbs // (mbs * dp)) % m.pp:
        errors.append(MappingError("batch", "vpp", f"interleaved schedule: {gbs // (mbs * dp)} "
                                   f"micro-batches is not a multiple of pp={m.pp}"))
    if m.pp > 1 and not m.order.endswith("pp") and edp != dp:
        errors.append(MappingError("option", "order", f"order={m.order!r} with pp={m.pp} needs "
                                   f"edp == dp (got edp={edp}, dp={dp})"))
    errors += option_errors(model, cluster, training, m)
    resolved = m if (m.dp, m.edp, m.sequence_parallel) == (dp, edp, sp) else m.model_copy(
        update={"dp": dp, "edp": edp, "sequence_parallel": sp})  # already resolved: itself
    if training.runtime == "foldplan":  # the estimate predicts foldplan's executor
        errors += executor_errors(model, training, resolved)
    return errors, resolved


def resolve_mapping(
    model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, mapping: Mapping
) -> Mapping:
    """The complete mapping (dp, edp, sequence_parallel set); raises InvalidMapping."""
    errors, resolved = mapping_errors(model, cluster, training, mapping)
    if errors:
        raise InvalidMapping(errors)
    return resolved
