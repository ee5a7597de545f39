"""Single-process model tests: MoE math against a per-token loop, sharded init, chunk sort."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cost_model.specs import ModelSpec
from executor.dispatcher import chunk_permutation
from executor.experts import GroupedExperts
from executor.model import MoETransformer
from executor.moe import MoELayer
from executor.parallel_dims import ParallelDims
from executor.router import RouterConfig

SPEC = ModelSpec(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=64, vocab_size=256, num_experts=4, moe_ffn_hidden_size=24,
                 moe_router_topk=2, moe_shared_expert_intermediate_size=16, moe_layer_freq=[1, 0])


@pytest.mark.parametrize("capacity", [None, 0.5])
def test_moe_layer_matches_per_token_loop(capacity):
    layer = MoELayer(SPEC, ParallelDims.single(), None, RouterConfig(capacity_factor=capacity), "alltoall")
    for name, p in layer.named_parameters():
        torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(hash(name) % 1000))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    out = layer(x)
    routing = layer.router(x.reshape(10, 32), ParallelDims.single(), None)
    w1, w2 = layer.experts.w1_EDF, layer.experts.w2_EFD
    expect = []
    for t, xt in enumerate(x.reshape(10, 32)):
        acc = layer.shared(xt)
        for k in range(2):
            e = int(routing.indices_TK[t, k])
            if e < 0:
                continue
            gate, up = (xt @ w1[e]).chunk(2)
            acc = acc + routing.probs_TK[t, k] * ((F.silu(gate) * up) @ w2[e])
        expect.append(acc)
    torch.testing.assert_close(out.out_BsD.reshape(10, 32), torch.stack(expect), rtol=1e-5, atol=1e-6)
    if capacity is not None:
        assert out.num_dropped > 0


def test_sharded_expert_init_reassembles_full_init():
    def make(ep, ep_rank, etp, etp_rank):
        m = GroupedExperts(8, 16, 12, True, ep, ep_rank, etp, etp_rank)
        m.init_from_seed(5, "layers.0.ffn.experts")
        return m

    full = make(1, 0, 1, 0)
    for ep, etp in [(2, 1), (4, 2), (8, 3)]:
        for i in range(ep):
            for j in range(etp):
                shard = make(ep, i, etp, j)
                assert torch.equal(shard.w1_EDF, shard.shard_of_full("w1_EDF", full.w1_EDF.detach()))
                assert torch.equal(shard.w2_EFD, shard.shard_of_full("w2_EFD", full.w2_EFD.detach()))


def test_model_init_depends_on_seed_only():
    a = MoETransformer(SPEC, ParallelDims.single())
    b = MoETransformer(SPEC, ParallelDims.single())
    a.init_weights(3)
    b.init_weights(3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    b.init_weights(4)
    assert not torch.equal(a.embed.weight, b.embed.weight)


def test_dense_model_and_tied_output_train():
    spec = SPEC.model_copy(update=dict(num_experts=None, untie_embeddings_and_output_weights=False))
    model = MoETransformer(spec, ParallelDims.single())
    model.init_weights(0)
    assert model.output is None
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    ce, aux, dropped = model(tokens[:, :-1], tokens[:, 1:])
    ce.backward()
    assert model.embed.weight.grad is not None and float(aux) == 0.0 and dropped == 0


def test_mla_model_trains():
    """MLA (executor/mla.py) builds and back-propagates; its values are checked against
    transformers' DeepSeek-V3 in test_exec_hf.py."""
    spec = SPEC.model_copy(update=dict(multi_latent_attention=True, q_lora_rank=8, kv_lora_rank=8,
                                       qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8))
    model = MoETransformer(spec, ParallelDims.single())
    model.init_weights(0)
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    ce, _, _ = model(tokens[:, :-1], tokens[:, 1:])
    ce.backward()
    assert torch.isfinite(ce) and model.get_parameter("layers.0.attn.kv_b.weight").grad.abs().sum() > 0


def test_chunk_permutation_roundtrip():
    counts = torch.tensor([[2, 0, 1], [0, 3, 1], [1, 1, 0]])
    to_expert, to_chunk = chunk_permutation(counts)
    rows = torch.arange(int(counts.sum()))
    # chunk-major labels (chunk, expert) for each row, then check expert-major order
    labels = [(c, e) for c in range(3) for e in range(3) for _ in range(int(counts[c, e]))]
    reordered = [labels[i] for i in to_expert.tolist()]
    assert reordered == sorted(labels, key=lambda ce: (ce[1], ce[0]))
    assert torch.equal(rows[to_expert][to_chunk], rows)
