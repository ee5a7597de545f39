"""Multi-rank CPU (gloo) equivalence: every mapping trains like the single-rank reference.

Same seed, data and global batch, fp32. Dropless configs: per-step loss within 1e-5 relative
and every parameter's gradient after step 1 within 1e-5 of its norm. Capacity configs compare
against a reference that applies the capacity rule to each rank's local tokens.
"""

from __future__ import annotations

import pytest

from _multirank import EQUIV_CONFIGS, spawn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    results = spawn("equivalence", 8, tmp_path_factory.mktemp("equiv"), timeout=360)
    merged: dict[str, list[dict]] = {}
    for rank_result in results:
        for name, r in rank_result.items():
            merged.setdefault(name, []).append(r)
    return merged


@pytest.mark.parametrize("name", [c[0] for c in EQUIV_CONFIGS])
def test_matches_single_rank(equivalence, name):
    world = dict((c[0], c[1]) for c in EQUIV_CONFIGS)[name]
    ranks = equivalence[name]
    assert len(ranks) == world
    for r in ranks:
        assert r["loss_rel_err"] < 1e-5, (r["loss"], r["ref_loss"])
        assert r["grad_err"] < 1e-5, (r["worst_grad"], r["grad_err"])
        assert r["dropped"] == r["ref_dropped"]
