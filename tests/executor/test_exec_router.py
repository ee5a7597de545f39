"""Router: score variants, capacity rule (per-rank, drop by probability), losses."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist

from cost_model.presets import preset_model
from cost_model.specs import Mapping, TrainingSpec
from executor.data import bundled_corpus_tokens
from executor.parallel_dims import ParallelDims, build_parallel_dims
from executor.router import (
    Router,
    RouterConfig,
    choose_by_expert,
    drop_by_capacity,
    expert_capacity,
    load_imbalance,
)
from executor.trainer import Trainer


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


@pytest.mark.parametrize("cfg", [{}, {"pre_softmax": True}, {"score_function": "sigmoid"}])
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


@pytest.mark.parametrize("T,E,K,cap", [(50, 4, 2, 7), (64, 8, 2, 16), (33, 8, 3, 9), (10, 8, 2, 20)])
def test_choice_by_expert_is_the_pair_drop_as_rows(T, E, K, cap):
    """choose_by_expert (the pad-to-capacity rows from one topk) keeps exactly the pairs
    drop_by_capacity keeps, with their probabilities, best first; padding rows hold an
    unrouted token with probability 0; the dropped counts agree; the gradient of a row's
    probability reaches its pair and nothing else (float64 gradcheck)."""
    g = torch.Generator().manual_seed(T + cap)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    idx = logits.topk(K, dim=1).indices
    probs = torch.softmax(logits.gather(1, idx), -1).requires_grad_()
    kept_p, kept_i, dropped = drop_by_capacity(probs.detach(), idx, E, cap)
    choice = choose_by_expert(probs, idx, E, cap)
    C = min(cap, T)
    assert choice.capacity == C and choice.tokens_EC.shape == (E, C)
    assert int(choice.num_dropped) == int(dropped) == int((kept_i == -1).sum())
    for e in range(E):
        rows = [(int(t), float(w)) for t, w in zip(choice.tokens_EC[e], choice.probs_EC1.detach()[e, :, 0])]
        kept = sorted(((float(kept_p[t, k]), t) for t in range(T) for k in range(K) if kept_i[t, k] == e),
                      reverse=True)
        assert [w for _, w in rows[: len(kept)]] == [w for w, _ in kept]  # best first
        assert {t for t, _ in rows[: len(kept)]} == {t for _, t in kept}
        assert all(w == 0 and not bool((idx[t] == e).any()) for t, w in rows[len(kept):])  # padding
    assert torch.autograd.gradcheck(lambda p: choose_by_expert(p, idx, E, cap).probs_EC1, (probs,))


def test_router_by_expert_drops_what_the_pairs_drop():
    r = make_router(capacity_factor=0.5)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(3))
    pairs = r(x, ParallelDims.single(), None)
    rows = r(x, ParallelDims.single(), None, by_expert=True)
    assert pairs.kept is None and rows.kept is not None
    assert int(rows.num_dropped) == int(pairs.num_dropped) > 0
    assert torch.equal(rows.kept.num_dropped, rows.num_dropped)
    # the pairs of the by-expert routing are every routed pair (the drop lives in `kept`)
    assert int((rows.indices_TK == -1).sum()) == 0
    kept_pairs = {(t, int(pairs.indices_TK[t, k])) for t in range(40) for k in range(2)
                  if pairs.indices_TK[t, k] >= 0}
    routed_rows = {(t, e) for e in range(8) for t in rows.kept.tokens_EC[e].tolist()
                   if bool((rows.indices_TK[t] == e).any())}
    assert routed_rows == kept_pairs


def test_router_config_rejects_unknown_score():
    with pytest.raises(ValueError, match="score_function"):
        RouterConfig(score_function="tanh")


def test_expert_load_is_recorded_per_forward_not_per_recompute():
    from torch.utils.checkpoint import checkpoint

    r = make_router(aux_loss_coeff=0.1)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out = r(x, ParallelDims.single(), None)
    counts = torch.bincount(out.indices_TK.reshape(-1), minlength=8).float()
    expected = float(counts.max() / counts.mean())
    assert len(r.take_loads()) == 1 and r.take_loads() == []  # taken, then reset
    # under activation checkpointing the forward is replayed in backward: counted once
    loss = checkpoint(lambda t: r(t, ParallelDims.single(), None).aux_loss, x, use_reentrant=False)
    loss.backward()
    loads = r.take_loads()
    assert len(loads) == 1 and float(load_imbalance(torch.stack(loads))[0]) == pytest.approx(expected)
    assert expected > 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trainer_reports_the_mean_load_of_its_moe_layers():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        m = Mapping(micro_batch_size=1, dp=1, edp=1, recompute="full")
        t = Trainer(preset_model("tiny-moe"),
                    TrainingSpec(seq_length=64, global_batch_size=2, precision="fp32"),
                    build_parallel_dims(m, 1, 1, torch.device("cpu")), bundled_corpus_tokens())
        seen = []
        for router in (mod for mod in t.model.modules() if isinstance(mod, Router)):
            def spy(real=router.take_loads):
                loads = real()
                seen.append((float(load_imbalance(torch.stack(loads)).sum()), len(loads)))
                return loads
            router.take_loads = spy
        res = t.step(0)
    finally:
        dist.destroy_process_group()
    assert len(seen) == 4 and all(c == 2 for _, c in seen)  # 4 MoE layers x 2 micro-batches
    assert res.expert_load_imbalance == pytest.approx(sum(s for s, _ in seen) / 8)
    assert res.expert_load_imbalance > 1.0
