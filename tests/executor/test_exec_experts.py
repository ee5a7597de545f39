"""The grouped-GEMM expert path equals the padded-bmm path, forward and backward."""

import pytest
import torch

from executor.experts import GroupedExperts, grouped_mm_supported


@pytest.mark.parametrize("gated", [True, False])
def test_grouped_equals_padded(gated):
    if not grouped_mm_supported(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm is not available in this torch build")
    experts = GroupedExperts(4, 32, 64, gated, ep=1, ep_rank=0, etp=2, etp_rank=1)
    experts.init_from_seed(0, "layer0.experts")
    counts = (10, 0, 25, 15)  # an empty expert and an uneven load
    grads = []
    outs = []
    for forward in (experts._forward_grouped, experts._forward_padded):
        x = torch.randn(sum(counts), 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = forward(x, counts)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad] + [p.grad.clone() for p in experts.parameters()])
        experts.zero_grad()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_forward_uses_the_grouped_path_when_offered(monkeypatch):
    experts = GroupedExperts(2, 16, 32, True, ep=1, ep_rank=0, etp=1, etp_rank=0)
    experts.init_from_seed(0, "e")
    called = []
    monkeypatch.setattr(experts, "_forward_padded", lambda *a: called.append("padded") or a[0])
    monkeypatch.setattr(experts, "_forward_grouped", lambda *a: called.append("grouped") or a[0])
    experts(torch.randn(5, 16), (2, 3))
    expected = "grouped" if grouped_mm_supported(torch.device("cpu"), torch.float32) else "padded"
    assert called == [expected]
    monkeypatch.setenv("FOLDPLAN_GROUPED_MM", "0")
    experts(torch.randn(5, 16), (2, 3))
    assert called[-1] == "padded"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_equals_padded_on_gpu_bf16():
    dev = torch.device("cuda")
    if not grouped_mm_supported(dev, torch.bfloat16):
        pytest.skip("torch._grouped_mm does not take bf16 on this GPU")
    experts = GroupedExperts(8, 512, 1024, True, ep=1, ep_rank=0, etp=1, etp_rank=0)
    experts.init_from_seed(0, "layer0.experts")
    experts.to(dev)
    counts = (300, 0, 17, 64, 128, 1, 500, 14)
    x = torch.randn(sum(counts), 512, device=dev)  # fp32 activations, as the residual stream
    with torch.autocast("cuda", torch.bfloat16):
        a = experts(x, counts)  # casts to bf16 itself: autocast does not cover _grouped_mm
        b = experts._forward_padded(x, counts)
    assert a.dtype == b.dtype == torch.bfloat16
    # bf16 inputs, fp32 accumulation in both; outputs are rounded to bf16 (8 bits of mantissa)
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
