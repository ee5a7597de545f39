"""What each runtime runs: the one table of the option values foldplan's own executor runs.

`training.runtime` says what an estimate predicts: `megatron` (Megatron-Core: every value the
specs accept and `validate` allows) or `foldplan` (foldplan's executor: only what is below).
The table is read by `validate.mapping_errors` (runtime 'foldplan': kind "executor" errors), by
the executor's own refusals (`executor/config.py`, whatever the runtime: a plan it cannot run
is refused) and by the planner (`runtime_supports`, to propose only what the executor runs
for the `cpu` preset / runtime 'foldplan'). Nothing else decides what the executor runs.

Accepted with a note: `precision` 'fp8' (the executor runs fp8 plans in bf16 on GPUs, in fp32
on CPU ranks, so `fp8_recipe` has nothing to act on), `rotary_interleaved` either way (the
executor rotates interleaved pairs; with random initialisation the two layouts are the same
model up to a fixed permutation of the query/key rows of each head, and a Hugging Face
checkpoint in the rotate-half layout is permuted when it is loaded, executor/hf_names.py).
The executor runs MLA, group-limited routing, the expert bias, q/k layernorm, q/k/v biases
and the shared expert gate (executor/mla.py, router.py, attention.py, model.py); multi-token
prediction not yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .errors import MappingError
from .specs import Mapping, ModelSpec, TrainingSpec
from .specs.mapping import DEFAULT_RECOMPUTE_MODULES

Runtime = Literal["megatron", "foldplan"]


@dataclass(frozen=True)
class Support:
    """The values of one request field that the foldplan runtime runs."""

    section: Literal["model", "mapping", "training"]
    runs: Callable[[Any], bool]  # value -> whether the executor runs it
    what: str  # the feature the other values ask for ("the flex dispatcher")


def _only(*values: Any) -> Callable[[Any], bool]:
    return lambda v: v in values


FOLDPLAN_SUPPORT: dict[str, Support] = {
    "mtp_num_layers": Support("model", _only(None), "multi-token prediction"),
    "window_size": Support("model", _only(None), "sliding-window attention"),
    "dispatcher": Support("mapping", _only("alltoall", "allgather"), "the flex dispatcher"),
    "flex_backend": Support("mapping", _only("deepep"), "the flex dispatcher's HybridEP backend"),
    "moe_a2a_overlap": Support("mapping", _only(False), "the expert all-to-all overlap"),
    "pipeline_layout": Support("mapping", _only(None), "a custom pipeline layout"),
    "offload_modules": Support("mapping", _only(()), "activation offloading"),
    "recompute_modules": Support("mapping", _only(DEFAULT_RECOMPUTE_MODULES),
                                 "selective recompute of modules other than core_attn"),
}
"""Fields with values the executor does not run; every other field (and value) it runs:
multi_latent_attention, moe_router_num_groups/group_topk, qk_layernorm, add_qkv_bias,
moe_router_enable_expert_bias, moe_shared_expert_gate, moe_router_score_function
softmax|sigmoid, moe_router_topk_scaling_factor, rotary_interleaved,
account_for_embedding/loss_in_pipeline_split, precision and fp8_recipe (module docstring)."""


def runtime_supports(runtime: Runtime, field: str, value: Any) -> bool:
    """Whether `runtime` runs `value` for request field `field` (any section)."""
    if runtime == "megatron":
        return True
    support = FOLDPLAN_SUPPORT.get(field)
    return support is None or support.runs(value)


def _json(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def executor_errors(model: ModelSpec, training: TrainingSpec,
                    m: Mapping) -> list[MappingError]:
    """What foldplan's executor cannot run in this combination (kind "executor"): the table's
    fields, then the rules that involve two values. `m` is resolved (sequence_parallel set)."""
    sections = {"model": model, "mapping": m, "training": training}
    errors = []
    for field, support in FOLDPLAN_SUPPORT.items():
        value = getattr(sections[support.section], field)
        if not support.runs(value):
            errors.append(MappingError("executor", field, f"{field}={_json(value)}: "
                                       f"{support.what} is not supported by the executor yet"))
    if m.tp > 1 and not m.sp and not model.is_moe:  # MoE models: the validator's rule
        errors.append(MappingError("executor", "sequence_parallel", f"sequence_parallel=false "
                                   f"with tp={m.tp}: the executor always runs TP with sequence "
                                   "parallelism"))
    if model.vocab_size % m.tp:  # the executor does not pad the vocabulary
        errors.append(MappingError("executor", "tp", f"tp={m.tp} does not divide vocab_size="
                                   f"{model.vocab_size}"))
    return errors
