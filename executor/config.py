"""Read a plan (the planner's JSON answer) into typed specs, and say what the executor refuses.

A plan has top-level `model` (full ModelSpec dict), `cluster`, `training` and `candidates`, each
candidate with a complete `mapping`. Refusals are data: `unsupported_reasons` returns messages
naming the offending value; `load_run` raises `UnsupportedPlan` carrying them.
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec


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
    for name in ("tp", "cp", "pp"):
        if getattr(m, name) > 1:
            r.append(f"{name}={getattr(m, name)}: the executor supports only {name}=1 for now "
                     "(TP/SP, CP and PP come with the next executor issue)")
    if m.vpp > 1:
        r.append(f"vpp={m.vpp} needs pp > 1, which the executor does not support yet")
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
