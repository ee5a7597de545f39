"""CP-SAT models without the per-model start-up cost of OR-Tools' camelCase aliases.

`cp_model.CpModel.__init__` adds a deprecated camelCase alias of every `add_*` / `new_*`
method to each new model (about 1.5 ms in OR-Tools 9.15): for a search that builds hundreds
of small stage models that was a third of its time. foldplan uses the snake_case API only.
"""

from __future__ import annotations

from ortools.sat.python import cp_model


class Model(cp_model.CpModel):
    """A `CpModel` with the snake_case API only."""

    def _add_pre_pep8_methods(self) -> None:
        pass
