"""Read a plan (the planner's JSON answer) into typed specs, and say what the executor refuses.

A plan has top-level `model` (full ModelSpec dict), `cluster`, `training` and `candidates`, each
candidate with a complete `mapping`. Refusals are data: `unsupported_reasons` returns the cost
model's typed validation errors plus the executor's own (kind "executor"); `load_run` raises
`UnsupportedPlan` carrying their messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from cost_model.validate import MappingError, mapping_errors


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


def unsupported_reasons(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
                        mapping: Mapping) -> list[MappingError]:
    """Why this executor cannot run the combination (empty list = it can): every rule of the
    cost model's validator, then the executor's own refusals (kind "executor")."""
    errors, m = mapping_errors(model, cluster, training, mapping)

    def refuse(field: str, message: str) -> None:
        errors.append(MappingError("executor", field, message))

    if model.multi_latent_attention:
        refuse("multi_latent_attention",
               "multi_latent_attention=true: MLA is not supported by the executor yet")
    if m.tp > 1 and not m.sp and not model.is_moe:  # MoE models: the validator's rule
        refuse("sequence_parallel", f"sequence_parallel=false with tp={m.tp}: the executor "
                                    "always runs TP with sequence parallelism")
    if model.vocab_size % m.tp:  # the executor does not pad the vocabulary
        refuse("tp", f"tp={m.tp} does not divide vocab_size={model.vocab_size}")
    if model.vocab_size < 256:
        refuse("vocab_size", f"vocab_size={model.vocab_size} < 256: the byte-level corpus "
                             "needs 256 ids")
    return errors


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
    errors = unsupported_reasons(spec.model, spec.cluster, spec.training, spec.mapping)
    if errors:
        raise UnsupportedPlan([e.message for e in errors])
    return spec
