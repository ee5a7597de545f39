"""Read a plan (the planner's JSON answer) into typed specs, and say what the executor refuses.

A plan has top-level `model` (full ModelSpec dict), `cluster`, `training` and `candidates`, each
candidate with a complete `mapping`. Refusals are data: `unsupported_reasons` returns messages
naming the offending value; `load_run` raises `UnsupportedPlan` carrying them.
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec

from .pipeline import stage_layer_ranges


class UnsupportedPlan(ValueError):
    """A plan or mapping this executor cannot run (yet)."""

    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = reasons


@dataclass(frozen=True)
class RunSpec:
    """Everything one training run needs from the plan."""

    model: ModelSpec
    cluster: ClusterSpec
    training: TrainingSpec
    mapping: Mapping

    @property
    def world_size(self) -> int:
        return self.cluster.world_size


def unsupported_reasons(model: ModelSpec, training: TrainingSpec, mapping: Mapping, world_size: int) -> list[str]:
    """Why this executor cannot run the combination (empty list = it can)."""
    m, r = mapping, []
    if model.multi_latent_attention:
        r.append("multi_latent_attention=true: MLA is not supported by the executor yet")
    if m.tp > 1:
        if not m.sp:
            r.append(f"sequence_parallel=false with tp={m.tp}: the executor always runs TP with "
                     "sequence parallelism")
        if model.query_groups % m.tp:
            r.append(f"tp={m.tp} does not divide num_query_groups={model.query_groups}")
        for name, size in (("ffn_hidden_size", model.ffn_hidden_size), ("vocab_size", model.vocab_size),
                           ("moe_shared_expert_intermediate_size", model.shared_ffn)):
            if size and size % m.tp:
                r.append(f"tp={m.tp} does not divide {name}={size}")
    S = training.seq_length
    if m.cp > 1 and S % (2 * m.cp):
        r.append(f"seq_length={S} is not divisible by 2*cp={2 * m.cp} (load-balanced CP chunks)")
    elif S % (m.cp * m.tp):
        r.append(f"seq_length={S} is not divisible by cp*tp={m.cp * m.tp} (sequence shards)")
    if m.vpp > 1 and m.pp == 1:
        r.append(f"vpp={m.vpp} needs pp > 1")
    try:
        stage_layer_ranges(model.num_layers, m)
    except ValueError as e:
        r.append(str(e))
    if m.recompute_num_layers is not None and m.recompute != "full":
        r.append(f"recompute_num_layers={m.recompute_num_layers} needs recompute='full' "
                 f"(got recompute={m.recompute!r})")
    dp = m.dp or world_size // (m.tp * m.cp * m.pp)
    edp = m.edp or world_size // (m.etp * m.ep * m.pp)
    if m.tp * m.cp * dp * m.pp != world_size or m.etp * m.ep * edp * m.pp != world_size:
        r.append(f"mapping sizes do not multiply to world_size={world_size} "
                 f"(tp*cp*dp*pp={m.tp * m.cp * dp * m.pp}, etp*ep*edp*pp={m.etp * m.ep * edp * m.pp})")
    if model.is_moe:
        if model.num_experts % m.ep:
            r.append(f"ep={m.ep} does not divide num_experts={model.num_experts}")
        if model.expert_ffn % m.etp:
            r.append(f"etp={m.etp} does not divide moe_ffn_hidden_size={model.expert_ffn}")
    elif m.ep > 1 or m.etp > 1:
        r.append(f"ep={m.ep}, etp={m.etp} need a MoE model (num_experts is 0)")
    per_step = m.micro_batch_size * dp
    if training.global_batch_size % per_step:
        r.append(f"global_batch_size={training.global_batch_size} is not divisible by "
                 f"micro_batch_size*dp = {m.micro_batch_size}*{dp}")
    elif m.vpp > 1 and (training.global_batch_size // per_step) % m.pp:
        r.append(f"vpp={m.vpp}: the number of micro-batches {training.global_batch_size // per_step} "
                 f"must be a multiple of pp={m.pp} (interleaved schedule)")
    if model.vocab_size < 256:
        r.append(f"vocab_size={model.vocab_size} < 256: the byte-level corpus needs 256 ids")
    return r


def load_run(plan: dict, candidate: int = 0) -> RunSpec:
    """Typed specs of candidate `candidate` of `plan`; raises UnsupportedPlan when refused."""
    for key in ("model", "cluster", "training", "candidates"):
        if key not in plan:
            raise UnsupportedPlan([f"plan has no {key!r} field"])
    cands = plan["candidates"]
    if not 0 <= candidate < len(cands):
        raise UnsupportedPlan([f"candidate={candidate} out of range: the plan has {len(cands)} candidates"])
    model = plan["model"]
    if isinstance(model, dict) and ("preset" in model or "hf_config" in model):
        from cost_model.presets import resolve_model
        from cost_model.specs import HFConfigRef, PresetRef

        model = resolve_model(PresetRef(**model) if "preset" in model else HFConfigRef(**model))
    else:
        model = ModelSpec.model_validate(model)
    spec = RunSpec(
        model=model,
        cluster=ClusterSpec.model_validate(plan["cluster"]),
        training=TrainingSpec.model_validate(plan["training"]),
        mapping=Mapping.model_validate(cands[candidate]["mapping"]),
    )
    reasons = unsupported_reasons(spec.model, spec.training, spec.mapping, spec.world_size)
    if reasons:
        raise UnsupportedPlan(reasons)
    return spec
