"""Typed reasons a mapping cannot run: the one error type the validator, the runtime table and
the executor return, and the exception that carries them (`validate` re-exports both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec

ErrorKind = Literal["world", "layer", "stage_split", "pipeline", "batch", "option", "executor"]
"""What an error concerns. `world`: the sizes do not fill the cluster; `layer`: tp/cp/ep/etp
(and sequence parallelism) against the model and sequence, whatever the pipeline; `stage_split`:
the layers do not split over the pipeline stages as asked; `pipeline`: pp/vpp/split options
that do not go together; `batch`: the global batch against micro-batch and dp; `option`:
other settings that do not go together (Megatron-Core's rules for its options); `executor`:
what foldplan's executor cannot run (`runtimes.py`)."""

Section = Literal["mapping", "model", "training", "cluster"]

# Where a field lives in a request, first match wins (the sections share no field names that
# an error names; `name` is the model's).
_SECTIONS: tuple[tuple[Section, frozenset[str]], ...] = (
    ("mapping", frozenset(Mapping.model_fields)),
    ("model", frozenset(ModelSpec.model_fields)),
    ("training", frozenset(TrainingSpec.model_fields)),
    ("cluster", frozenset(ClusterSpec.model_fields)),
)


def field_section(field: str) -> Section:
    """The request section (`mapping`, `model`, `training`, `cluster`) that holds `field`."""
    for section, fields in _SECTIONS:
        if field in fields:
            return section
    raise AssertionError(f"field={field!r} is in no spec")  # a bug in an error's field name


@dataclass(frozen=True)
class MappingError:
    """One reason a mapping cannot run."""

    kind: ErrorKind
    field: str  # the request field to change (a mapping field, or a model/training field)
    message: str  # names the offending values and the rule

    def __str__(self) -> str:
        return self.message

    @property
    def section(self) -> Section:
        """The request section `field` belongs to (the API's 422 `loc`)."""
        return field_section(self.field)


class InvalidMapping(ValueError):
    """A mapping that cannot run for this model x cluster x training setup."""

    def __init__(self, errors: list[MappingError]):
        super().__init__("; ".join(e.message for e in errors))
        self.errors = errors
        self.reasons = [e.message for e in errors]
