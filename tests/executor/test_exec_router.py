"""Router: score variants, capacity rule (per-rank, drop by probability), losses."""

from __future__ import annotations

import math

import pytest
import torch

from executor.parallel_dims import ParallelDims
from executor.router import Router, RouterConfig, drop_by_capacity, expert_capacity


def make_router(E=8, K=2, D=16, **cfg):
    r = Router(D, E, K, RouterConfig(**cfg))
    with torch.no_grad():
        r.weight_ED.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(0)))
    return r


def test_capacity_formula():
    assert expert_capacity(1.0, 64, 2, 8) == 16
    assert expert_capacity(1.25, 10, 2, 8) == math.ceil(1.25 * 10 * 2 / 8) == 4


def test_drop_keeps_highest_probabilities_per_expert():
    g = torch.Generator().manual_seed(1)
    T, E, K, cap = 50, 4, 2, 7
    probs = torch.rand(T, K, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    kept_p, kept_i, dropped = drop_by_capacity(probs, idx, E, cap)
    for e in range(E):
        routed = probs[idx == e]
        kept = probs[kept_i == e]
        assert len(kept) == min(cap, len(routed))
        # every kept probability is >= every dropped one of the same expert
        dropped_e = probs[(idx == e) & (kept_i == -1)]
        if len(dropped_e):
            assert kept.min() >= dropped_e.max()
    assert dropped == int((kept_i == -1).sum()) == sum(max(0, int((idx == e).sum()) - cap) for e in range(E))
    assert torch.all(kept_p[kept_i == -1] == 0)


@pytest.mark.parametrize("cfg", [dict(), dict(pre_softmax=True), dict(score_function="sigmoid")])
def test_router_variants(cfg):
    torch.manual_seed(0)
    r = make_router(**cfg)
    x = torch.randn(32, 16)
    out = r(x, ParallelDims.single(), None)
    logits = x @ r.weight_ED.t()
    top = torch.topk(logits, 2, dim=1)
    assert torch.equal(out.indices_TK, top.indices)  # all variants choose the top logits
    if cfg.get("pre_softmax"):
        expect = torch.softmax(logits, -1).gather(1, top.indices)
    elif cfg.get("score_function") == "sigmoid":
        s = torch.sigmoid(top.values)
        expect = s / s.sum(-1, keepdim=True)
    else:
        expect = torch.softmax(top.values, -1)
    torch.testing.assert_close(out.probs_TK, expect)


def test_aux_and_z_loss_values():
    r = make_router(aux_loss_coeff=0.1, z_loss_coeff=0.01)
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(2))
    out = r(x, ParallelDims.single(), None)
    logits = x @ r.weight_ED.t()
    scores = torch.softmax(logits, -1)
    counts = torch.bincount(out.indices_TK.reshape(-1), minlength=8).float()
    aux = 0.1 * 8 / (20 * 20 * 2) * (counts * scores.sum(0)).sum()
    z = 0.01 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(out.aux_loss, aux + z)


def test_router_capacity_drops_per_local_tokens():
    r = make_router(capacity_factor=0.5)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(3))
    out = r(x, ParallelDims.single(), None)
    cap = expert_capacity(0.5, 40, 2, 8)
    counts = torch.bincount(out.indices_TK[out.indices_TK >= 0], minlength=8)
    assert counts.max() <= cap and out.num_dropped > 0
    assert out.num_dropped == int((out.indices_TK == -1).sum())


def test_router_config_rejects_unknown_score():
    with pytest.raises(ValueError, match="score_function"):
        RouterConfig(score_function="tanh")
