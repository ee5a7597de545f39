"""Validation against public Megatron-Core runs (../shared/reference/calibration_public_h100.json).

Sources in the file: Megatron-MoE-ModelZoo best_practice/qwen3 (Qwen3-235B-A22B on 256 H100
with DeepEP, TP2 EP32 and TP4 EP8, both PP8 VPP4 with embedding and loss in the split) and
NeMo Megatron-Bridge 26.06 (Qwen3-30B-A3B, EP16 over two nodes, fp8, HybridEP). Tolerance: 15%
on each point's step time (issue "today's Megatron-Core"); the two Qwen3-235B mappings must
rank as measured; each ran, so each must fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cost_model.estimate import estimate
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from planner.search import plan

PUBLIC = Path(__file__).resolve().parents[3] / "shared" / "reference" / "calibration_public_h100.json"
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def points() -> dict:
    if not PUBLIC.exists():
        pytest.skip(f"reference data not found at {PUBLIC}")
    return {p["name"]: p for p in json.loads(PUBLIC.read_text())["points"]}


def _specs(p):
    return (ModelSpec(**p["model"]), ClusterSpec(**p["cluster"]), TrainingSpec(**p["training"]),
            Mapping(**p["mapping"]))


def test_each_public_point_within_tolerance(points):
    errors = {}
    for name, p in points.items():
        est = estimate(*_specs(p))
        assert est.fits_memory, name
        errors[name] = est.step_time_s / p["step_time_s"] - 1
    bad = {k: f"{v:+.1%}" for k, v in errors.items() if abs(v) > TOLERANCE}
    assert not bad, bad


def test_qwen3_235b_mappings_rank_as_measured(points):
    ep32 = estimate(*_specs(points["mz-qwen3-235b-tp2ep32pp8vpp4"])).step_time_s
    ep8 = estimate(*_specs(points["mz-qwen3-235b-tp4ep8pp8vpp4"])).step_time_s
    assert ep32 < ep8  # measured 19.7 s against 29.0 s


def test_planner_returns_the_public_run_when_it_is_pinned(points):
    """The public Qwen3-235B run with all its options (flex dispatch, layernorm + moe_act
    recompute, embedding and loss in the split) is a feasible plan, answered as asked."""
    p = points["mz-qwen3-235b-tp2ep32pp8vpp4"]
    model, cluster, training, mapping = _specs(p)
    fixed = {k: v for k, v in mapping.model_dump().items() if k not in ("dp", "edp")
             and v is not None}
    result = plan(model, cluster, training, top_k=1, fixed=fixed)
    assert result.search.status == "OPTIMAL"
    got = result.candidates[0]
    assert got.mapping.model_dump(include=set(fixed)) == fixed
    assert got.estimate == estimate(model, cluster, training, mapping)
    args = got.megatron_args
    assert args[args.index("--moe-token-dispatcher-type") + 1] == "flex"
    assert "--account-for-embedding-in-pipeline-split" in args


def test_public_qwen3_235b_sizes_rank_near_the_planners_best(points):
    """The issue's acceptance on the public Qwen3-235B TP2 PP8 VPP4 EP32 run: with its sizes
    and dispatcher pinned, the planner picks its recompute modules (layernorm, moe_act) and
    the all-to-all overlap Megatron-Core's later runs of it switched on, within 10% of the
    best mapping of the whole space."""
    p = points["mz-qwen3-235b-tp2ep32pp8vpp4"]
    model, cluster, training, mapping = _specs(p)
    best = plan(model, cluster, training, top_k=1).candidates[0].estimate.step_time_s
    fixed = mapping.model_dump(include={"tp", "pp", "vpp", "ep", "etp", "cp",
                                        "micro_batch_size", "dispatcher"})
    public = plan(model, cluster, training, top_k=1, fixed=fixed).candidates[0]
    assert public.mapping.recompute_modules == ("layernorm", "moe_act")
    assert public.estimate.step_time_s <= 1.1 * best
