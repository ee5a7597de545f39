"""Read a plan (the planner's JSON answer) into typed specs, and say what the executor refuses.

A plan has top-level `model` (full ModelSpec dict), `cluster`, `training` and `candidates`, each
candidate with a complete `mapping`. Refusals are data: `unsupported_reasons` returns the cost
model's typed validation errors plus the executor's own (kind "executor"); `load_run` raises
`UnsupportedPlan` carrying their messages. With `init_hf` (a Hugging Face model folder)
`load_run` also checks the checkpoint against the plan's model (hf_checkpoint.check_checkpoint:
config fields, shards, tensor shapes; headers only) so a mismatch is refused before any rank
starts, and takes the architecture's numerical options (arch.py) from its config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cost_model.runtimes import executor_errors
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from cost_model.validate import MappingError, mapping_errors

from .arch import ArchOptions


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
    arch: ArchOptions = field(default_factory=ArchOptions)  # value-only (a checkpoint's config sets them)

    @property
    def world_size(self) -> int:
        return self.cluster.world_size


def unsupported_reasons(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
                        mapping: Mapping) -> list[MappingError]:
    """Why this executor cannot run the combination (empty list = it can): every rule of the
    cost model's validator, then what the executor does not run (kind "executor", the table of
    `cost_model.runtimes`, whatever `training.runtime` the plan predicted), then the byte-level
    corpus's own need."""
    errors, m = mapping_errors(model, cluster, training, mapping)
    errors += [e for e in executor_errors(model, training, m) if e not in errors]
    if model.vocab_size < 256:
        errors.append(MappingError("executor", "vocab_size", f"vocab_size={model.vocab_size} < "
                                   "256: the byte-level corpus needs 256 ids"))
    return errors


def load_run(plan: dict, candidate: int = 0, init_hf: str | None = None) -> RunSpec:
    """Typed specs of candidate `candidate` of `plan`; raises UnsupportedPlan when refused,
    also when `init_hf` does not hold the plan's model (the reason names the field, shard or
    tensor)."""
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
    arch = ArchOptions()
    if init_hf is not None:
        from .hf_checkpoint import CheckpointError, HFCheckpoint, check_checkpoint

        try:
            model, arch = check_checkpoint(HFCheckpoint(init_hf), model)
        except CheckpointError as exc:
            raise UnsupportedPlan([f"--init-hf: {exc}"]) from exc
    spec = RunSpec(
        model=model,
        cluster=ClusterSpec.model_validate(plan["cluster"]),
        training=TrainingSpec.model_validate(plan["training"]),
        mapping=Mapping.model_validate(cands[candidate]["mapping"]),
        arch=arch,
    )
    errors = unsupported_reasons(spec.model, spec.cluster, spec.training, spec.mapping)
    if errors:
        raise UnsupportedPlan([e.message for e in errors])
    return spec
