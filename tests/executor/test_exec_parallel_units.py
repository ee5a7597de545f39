"""Pure pieces of TP / CP / PP and partial recompute, without torch.distributed."""

from __future__ import annotations

import pytest
import torch

import executor.model as model_mod
from cost_model.specs import Mapping, ModelSpec
from executor.attention import cp_positions
from executor.model import MoETransformer
from executor.parallel_dims import ParallelDims, stage_groups
from executor.pipeline import schedule_1f1b, schedule_interleaved, stage_layer_ranges
from executor.tensor_parallel import shard

SPEC = ModelSpec(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=64, vocab_size=256, num_experts=4, moe_ffn_hidden_size=24,
                 moe_router_topk=2, moe_layer_freq=[1, 0, 1, 0])


def test_shard_splits_fused_blocks_one_by_one():
    full = torch.arange(8.0)  # [g0 g1 g2 g3 | u0 u1 u2 u3]
    assert shard(full, 0, 2, 1, 2).tolist() == [2.0, 3.0, 6.0, 7.0]
    assert shard(full, 0, 1, 1, 2).tolist() == [4.0, 5.0, 6.0, 7.0]
    parts = [shard(full.view(2, 4), 1, 1, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(parts, 1), full.view(2, 4))


def test_cp_positions_load_balanced():
    assert cp_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    every = torch.cat([cp_positions(24, 3, r) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))
    # causal work (keys visible to the queries) is equal on every cp rank
    work = [int(sum(p + 1 for p in cp_positions(24, 3, r).tolist())) for r in range(3)]
    assert len(set(work)) == 1
    with pytest.raises(ValueError, match="2\\*cp=4 does not divide seq_length=6"):
        cp_positions(6, 2, 0)


def test_stage_groups_from_pp_groups():
    assert stage_groups([[0, 4], [1, 5], [2, 6], [3, 7]]) == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("fields,expect", [
    (dict(pp=2), [[range(4)], [range(4, 8)]]),
    (dict(pp=3, decoder_first_pipeline_num_layers=2), [[range(2)], [range(2, 5)], [range(5, 8)]]),
    (dict(pp=3, decoder_last_pipeline_num_layers=4), [[range(2)], [range(2, 4)], [range(4, 8)]]),
    (dict(pp=2, vpp=2), [[range(2), range(4, 6)], [range(2, 4), range(6, 8)]]),
])
def test_stage_layer_ranges(fields, expect):
    assert stage_layer_ranges(8, Mapping(**fields)) == expect


def _check_schedule(steps_per_stage, num_micro, num_chunks):
    """Every (micro-batch, chunk) runs forward once, then backward once, on every stage."""
    for steps in steps_per_stage:
        fwd = [(m, c) for k, m, c in steps if k == "F"]
        bwd = [(m, c) for k, m, c in steps if k == "B"]
        want = {(m, c) for m in range(num_micro) for c in range(num_chunks)}
        assert set(fwd) == want and set(bwd) == want and len(fwd) == len(bwd) == len(want)
        for i, (k, m, c) in enumerate(steps):
            if k == "B":
                assert ("F", m, c) in steps[:i]


def test_1f1b_schedule_warmup_and_order():
    steps = [schedule_1f1b(6, 4, r) for r in range(4)]
    _check_schedule(steps, 6, 1)
    assert [k for k, _, _ in steps[0][:4]] == ["F", "F", "F", "F"]  # 3 warm-up forwards, then 1F
    assert steps[0][4] == ("B", 0, 0)
    assert [k for k, _, _ in steps[3][:4]] == ["F", "B", "F", "B"]  # last stage: no warm-up
    in_flight = max(sum(1 if k == "F" else -1 for k, _, _ in steps[0][: i + 1]) for i in range(12))
    assert in_flight == 4  # at most pp micro-batches alive on the first stage


def test_interleaved_schedule_covers_every_chunk():
    steps = [schedule_interleaved(4, 2, r, 2) for r in range(2)]
    _check_schedule(steps, 4, 2)
    assert steps[0][:3] == [("F", 0, 0), ("F", 1, 0), ("F", 0, 1)]  # chunk 1 starts after pp micro-batches
    assert next(s for s in steps[1] if s[0] == "B") == ("B", 0, 1)  # backward starts at the last chunk


@pytest.mark.parametrize("num_layers,expect", [(None, 4), (1, 1), (3, 3)])
def test_partial_recompute_checkpoints_first_n_layers(monkeypatch, num_layers, expect):
    calls = []
    real = model_mod.checkpoint

    def counting(fn, *args, **kw):
        calls.append(fn)
        return real(fn, *args, **kw)

    monkeypatch.setattr(model_mod, "checkpoint", counting)
    m = MoETransformer(SPEC, ParallelDims.single(), recompute="full", recompute_num_layers=num_layers)
    m.init_weights(0)
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    ce, _, _ = m(tokens[:, :-1], tokens[:, 1:])
    ce.backward()
    layers = list(m.layers.values())
    assert calls == layers[:expect]
    ref = MoETransformer(SPEC, ParallelDims.single())
    ref.init_weights(0)
    ce_ref, _, _ = ref(tokens[:, :-1], tokens[:, 1:])
    ce_ref.backward()
    assert torch.allclose(ce, ce_ref)
    assert torch.allclose(m.embed.weight.grad, ref.embed.weight.grad, atol=1e-7)
