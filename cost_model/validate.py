"""Checks that need a mapping together with a model, a cluster and a training setup.

Infeasibility is data: `mapping_errors` returns human-readable reasons that name the offending
values; `resolve_mapping` fills in the derived fields (dp, edp, sequence_parallel) or raises
`InvalidMapping` carrying those reasons.
"""

from __future__ import annotations

from .specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec


class InvalidMapping(ValueError):
    """A mapping that cannot run for this model x cluster x training setup."""

    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = reasons


def _derive(world: int, divisor: int, given: int | None, what: str, errors: list[str]) -> int:
    if world % divisor:
        errors.append(f"{what} = {divisor} does not divide the {world} GPUs")
        return given or 1
    derived = world // divisor
    if given is not None and given != derived:
        errors.append(f"{what} x {given} = {divisor * given} but the cluster has {world} GPUs")
    return derived


def mapping_errors(
    model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, mapping: Mapping
) -> tuple[list[str], Mapping]:
    """Return (reasons the mapping is invalid, the mapping with derived fields filled in)."""
    m = mapping
    errors: list[str] = []
    world = cluster.world_size
    dp = _derive(world, m.tp * m.cp * m.pp, m.dp, f"tp*cp*pp ({m.tp}*{m.cp}*{m.pp})", errors)
    edp = _derive(world, m.etp * m.ep * m.pp, m.edp, f"etp*ep*pp ({m.etp}*{m.ep}*{m.pp})", errors)

    heads, groups = model.num_attention_heads, model.query_groups
    if heads % m.tp:
        errors.append(f"tp={m.tp} does not divide num_attention_heads={heads}")
    elif not model.multi_latent_attention and groups % m.tp:
        errors.append(f"tp={m.tp} does not divide num_query_groups={groups}")
    if model.ffn_hidden_size % m.tp and (model.num_moe_layers < model.num_layers):
        errors.append(f"tp={m.tp} does not divide ffn_hidden_size={model.ffn_hidden_size}")
    if model.is_moe:
        if model.num_experts % m.ep:
            errors.append(f"ep={m.ep} does not divide num_experts={model.num_experts}")
        if model.expert_ffn % m.etp:
            errors.append(f"etp={m.etp} does not divide moe_ffn_hidden_size={model.expert_ffn}")
        if model.shared_ffn % m.tp:
            errors.append(
                f"tp={m.tp} does not divide moe_shared_expert_intermediate_size={model.shared_ffn}"
            )
    else:
        if m.ep > 1:
            errors.append(f"ep={m.ep} needs a MoE model, but num_experts is 0")
        if m.etp not in (1, m.tp):
            errors.append(f"etp={m.etp} needs a MoE model, but num_experts is 0")

    stages = m.pp * m.vpp
    first, last = m.decoder_first_pipeline_num_layers, m.decoder_last_pipeline_num_layers
    if first is None and last is None:
        if model.num_layers % stages:
            errors.append(
                f"pp*vpp = {m.pp}*{m.vpp} = {stages} does not divide num_layers="
                f"{model.num_layers}; set decoder_first/last_pipeline_num_layers"
            )
    elif m.pp == 1 or m.vpp > 1:
        errors.append("decoder_first/last_pipeline_num_layers need pp > 1 and vpp == 1")
    else:
        middle_stages = m.pp - (first is not None) - (last is not None)
        middle_layers = model.num_layers - (first or 0) - (last or 0)
        if middle_layers < 0 or (middle_stages == 0 and middle_layers) or (
            middle_stages and (middle_layers <= 0 or middle_layers % middle_stages)
        ):
            errors.append(
                f"num_layers={model.num_layers} minus first={first} and last={last} stage "
                f"layers does not split evenly over the other {middle_stages} stages"
            )
    if m.recompute_num_layers is not None and m.recompute != "full":
        errors.append(
            f"recompute_num_layers={m.recompute_num_layers} needs recompute='full' "
            f"(got {m.recompute!r})"
        )
    if m.vpp > 1 and m.pp == 1:
        errors.append(f"vpp={m.vpp} needs pp > 1")

    s = training.seq_length
    if m.cp > 1 and s % (2 * m.cp):
        errors.append(
            f"seq_length={s} is not divisible by 2*cp={2 * m.cp} (load-balanced causal CP)"
        )
    sp = m.tp > 1 if m.sequence_parallel is None else (m.sequence_parallel and m.tp > 1)
    if m.tp > 1 and model.is_moe and not sp:
        errors.append(f"tp={m.tp} with a MoE model needs sequence_parallel")
    if sp and (s // m.cp) % m.tp:
        errors.append(f"seq_length/cp = {s // m.cp} is not divisible by tp={m.tp} (sequence parallel)")

    gbs, mbs = training.global_batch_size, m.micro_batch_size
    if gbs % (mbs * dp):
        errors.append(
            f"global_batch_size={gbs} is not divisible by micro_batch_size*dp = {mbs}*{dp}"
        )
    elif m.vpp > 1 and (gbs // (mbs * dp)) % m.pp:
        errors.append(
            f"interleaved schedule: {gbs // (mbs * dp)} micro-batches is not a multiple of pp={m.pp}"
        )
    if m.pp > 1 and not m.order.endswith("pp") and edp != dp:
        errors.append(
            f"order={m.order!r} with pp={m.pp} needs edp == dp (got edp={edp}, dp={dp})"
        )
    resolved = m.model_copy(update={"dp": dp, "edp": edp, "sequence_parallel": sp})
    return errors, resolved


def resolve_mapping(
    model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, mapping: Mapping
) -> Mapping:
    """The complete mapping (dp, edp, sequence_parallel set); raises InvalidMapping."""
    errors, resolved = mapping_errors(model, cluster, training, mapping)
    if errors:
        raise InvalidMapping(errors)
    return resolved
