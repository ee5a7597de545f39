"""The final selection: the top-k configurations with CP-SAT and a proof of optimality.

Formulation (one solve per position of the top-k). Variables: x_r (bool) for the best
mapping of each evaluated configuration r, y (bool) for everything not evaluated, which
enters at its lower bound. Constraint families: exactly one chosen
(`_add_choice_constraints`), the chosen one fits in memory as the cost model says
(`_add_memory_constraints`), candidates already returned excluded
(`_add_exclusion_constraints`). Objective: step time in integer units of 1e-5 of the best
step, costs doubled and y's cost + 1, so a bound never ties a real mapping. An optimum on an
x_r is the best remaining mapping of the whole space under the cost model: status OPTIMAL.
Where a solve stops at its time limit, or proves that unevaluated space could still beat
every remaining evaluated mapping, the best remaining evaluated mapping is taken and the
answer is FEASIBLE (found, not proven).
"""

from __future__ import annotations

from ortools.sat.python import cp_model

from .candidates import Row, dedupe, tie_key
from .cpsat import Model

OBJECTIVE_RESOLUTION = 1e-5  # of the best step time


def select(rows: list[Row], bound: float | None, top_k: int, stopped_early: bool,
           time_left_s: float) -> tuple[str, list[Row], dict, float]:
    """(status, chosen rows best first, solver statistics, objective resolution in s)."""
    rows = dedupe(rows)
    if not rows:
        return "INFEASIBLE", [], {}, 0.0
    best = min(r.step for r in rows)
    q = best * OBJECTIVE_RESOLUTION
    # Keep the model small: rows that cannot enter the top-k are left out (at most top_k *
    # a few hundred rows stay; the exact order among kept rows is the solver's).
    rows.sort(key=lambda r: (r.step, tie_key(r.mapping)))
    keep = rows[: max(top_k * 50, 200)]
    cost = [int(round(r.step / q)) for r in keep]
    chosen: list[Row] = []
    stats: dict = {"solves": 0, "branches": 0, "conflicts": 0}
    proven = not stopped_early
    excluded: list[int] = []
    for _ in range(min(top_k, len(keep))):
        model = Model()
        x = [model.new_bool_var(f"x{i}") for i in range(len(keep))]
        y = [model.new_bool_var("unexpanded")] if bound is not None else []
        _add_choice_constraints(model, x + y)
        _add_memory_constraints(model, x, keep)
        _add_exclusion_constraints(model, x, excluded)
        model.minimize(
            sum(2 * c * v for c, v in zip(cost, x))
            # Rounded like the rows: a bound at or above a row's step never beats it (the
            # search stops at bounds equal to the k-th best; exact bounds meet it).
            + sum((2 * int(round(bound / q)) + 1) * v for v in y)
        )
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 1
        solver.parameters.max_time_in_seconds = max(0.01, time_left_s / top_k)
        status = solver.solve(model)
        stats["solves"] += 1
        stats["branches"] += solver.num_branches
        stats["conflicts"] += solver.num_conflicts
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            break
        remaining = [j for j in range(len(keep)) if j not in excluded]
        if any(solver.value(v) for v in x) and status == cp_model.OPTIMAL:
            # Equal objective: take the lowest index (closest to defaults among equal times).
            obj = solver.objective_value
            i = min(j for j in remaining if 2 * cost[j] == round(obj))
        else:
            i, proven = remaining[0], False
        chosen.append(keep[i])
        excluded.append(i)
    return ("OPTIMAL" if proven else "FEASIBLE"), chosen, stats, q


def _add_choice_constraints(model: cp_model.CpModel, variables) -> None:
    model.add_exactly_one(variables)


def _add_memory_constraints(model: cp_model.CpModel, x, rows: list[Row]) -> None:
    """A row that does not fit cannot be chosen: the cost model's `fits_memory` itself, so the
    planner and `/v1/estimate` agree to the byte (bytes rounded to integer units would not)."""
    for r, v in zip(rows, x):
        if not r.result.fits_memory:
            model.add(v == 0)


def _add_exclusion_constraints(model: cp_model.CpModel, x, excluded: list[int]) -> None:
    for i in excluded:
        model.add(x[i] == 0)
