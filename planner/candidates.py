"""Evaluated mappings and the keys that group them into the candidates a user sees.

A configuration is a mapping without its stage split and recompute depth (the planner reports
the best of those); configurations that differ only in rank order, optimizer sharding or
(without expert parallelism) dispatcher, and have the same time and memory, are one candidate,
the one closest to the defaults (`_DEFAULTS`) standing for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_model.estimate import StepResult
from cost_model.specs import Mapping

# Preference among mappings the cost model cannot tell apart (same time and memory).
_DEFAULTS = dict(order="tp-cp-ep-dp-pp", distributed_optimizer=True, dispatcher="alltoall",
                 recompute="none", moe_a2a_overlap=False, recompute_modules=("core_attn",),
                 flex_backend="deepep", account_for_embedding_in_pipeline_split=False,
                 account_for_loss_in_pipeline_split=False)


@dataclass(frozen=True)
class Row:
    """A resolved mapping and the cost model's answer for it."""

    mapping: Mapping
    result: StepResult

    @property
    def step(self) -> float:
        return self.result.step_time_s


def is_classic(m: Mapping) -> bool:
    """The unfolded Megatron mapping: expert TP equals attention TP, EP carved out of DP x CP."""
    return sizes_classic(m.tp, m.cp, m.ep, m.etp, m.dp)


def sizes_classic(tp: int, cp: int, ep: int, etp: int, dp: int) -> bool:
    """`is_classic` of every mapping with these sizes."""
    return etp == tp and (dp * cp) % ep == 0


def tie_key(m: Mapping) -> tuple:
    """Order among equal step times: closest to the defaults first, then smaller sizes."""
    return tuple(getattr(m, k) != v for k, v in _DEFAULTS.items()) + (
        m.pp, m.vpp, m.micro_batch_size, m.tp, m.cp, m.ep, m.etp,
        m.decoder_first_pipeline_num_layers or 0, m.decoder_last_pipeline_num_layers or 0)


def class_key(m: Mapping) -> Mapping:
    """A configuration: the mapping without its stage split (explicit or by counting the
    embedding / loss as layers) and recompute depth (the planner reports the best of those
    for each configuration)."""
    return m.model_copy(update={"decoder_first_pipeline_num_layers": None,
                                "decoder_last_pipeline_num_layers": None,
                                "recompute_num_layers": None,
                                "account_for_embedding_in_pipeline_split": False,
                                "account_for_loss_in_pipeline_split": False})


def super_key(m: Mapping) -> Mapping:
    """Configurations that may merge into one candidate (rank order, optimizer sharding and,
    without expert parallelism, the dispatcher, when time and memory agree)."""
    return merged(class_key(m))


def merged(m: Mapping) -> Mapping:
    """`m` without the fields that cannot tell candidates apart when time and memory agree."""
    update = {"order": "", "distributed_optimizer": True}
    if m.ep * m.etp == 1:
        # No expert communication: the dispatcher and its overlap do not matter.
        update.update(dispatcher="", flex_backend="", moe_a2a_overlap=False)
    return m.model_copy(update=update)


def equivalence_key(row: Row) -> tuple:
    """Mappings that differ only in rank order or optimizer sharding and have the same
    predicted time and memory are one candidate to the user."""
    return (round(row.step, 12), round(row.result.peak_bytes), merged(row.mapping))


def dedupe(rows: list[Row]) -> list[Row]:
    """Among mappings the cost model cannot tell apart, keep the one closest to defaults."""
    seen: dict[tuple, Row] = {}
    for row in sorted(rows, key=lambda r: (r.step, tie_key(r.mapping))):
        seen.setdefault(equivalence_key(row), row)
    return list(seen.values())
