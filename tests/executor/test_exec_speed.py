"""Issue 12: the executor reads nothing back where the mapping does not need it.

- routing_index's static layouts (T*K rows, E*C rows) permute like the exact layout; padding
  rows change no real token's value or gradient (torch kernels).
- One training step at ep = 1 (dropless and capacity): no host read in forward and backward,
  one for the step's numbers, no op with a data-dependent output shape, the same shapes in
  every step (counted with benchmarks/step_anatomy.py's dispatch mode).
- At ep = 2 (two gloo ranks): one host read per MoE layer and micro-batch plus the step's one.
- The Triton kernels (interpreted) take the padded layouts like the torch kernels.
- bf16 mixed precision on CPU: bf16 parameters, fp32 main grads, masters and moments (their
  bytes), losses near fp32, and a bit-exact resume from saved state.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _multirank import TEST_SPEC, free_port

from benchmarks.step_anatomy import Anatomy, count_host_methods
from cost_model.specs import Mapping, TrainingSpec
from executor import trainer as trainer_mod
from executor.data import bundled_corpus_tokens
from executor.experts import ExpertRows, GroupedExperts
from executor.kernels import get_ops, routing_index
from executor.parallel_dims import ParallelDims, build_parallel_dims
from executor.trainer import Trainer


def _routing(T=40, K=2, E=8, drop=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    dropped = torch.where(torch.rand(T, K, generator=g) < drop, torch.full_like(idx, -1), idx)
    return idx, dropped


def test_static_layouts_put_kept_pairs_where_the_exact_layout_does():
    E, C = 8, 12
    idx, dropped = _routing(E=E)
    exact = routing_index(dropped, E)
    assert int(exact.tokens_per_expert_E.max()) <= C  # the capacity layout's precondition
    static = routing_index(dropped, E, static=True)
    cap = routing_index(dropped, E, capacity=C)
    dropless = routing_index(idx, E, static=True, dropless=True)
    n = int(exact.tokens_per_expert_E.sum())
    assert (exact.num_rows, static.num_rows, cap.num_rows) == (n, idx.numel(), E * C)
    assert torch.equal(static.dest_TK, exact.dest_TK)
    assert torch.equal(static.src_pair_N[:n], exact.src_pair_N)
    assert torch.all(static.src_pair_N[n:] == idx.numel())  # padding rows -> sentinel pair
    # capacity layout: expert e's j-th kept pair sits at row e*C + j
    rank = exact.dest_TK - (torch.cumsum(exact.tokens_per_expert_E, 0) - exact.tokens_per_expert_E)[dropped.clamp(min=0)]
    assert torch.equal(cap.dest_TK, torch.where(dropped >= 0, dropped * C + rank, -1))
    assert torch.equal(dropless.dest_TK, routing_index(idx, E).dest_TK)
    assert not dropless.padded and static.padded and cap.padded
    assert cap.offsets_E.tolist() == [C * (e + 1) for e in range(E)]


@pytest.mark.parametrize("layout", ["static", "capacity"])
def test_padded_permute_matches_exact_forward_and_backward(layout):
    E, D = 8, 16
    _, dropped = _routing(E=E, seed=3)
    T, K = dropped.shape
    g = torch.Generator().manual_seed(4)
    x0, p0 = torch.randn(T, D, generator=g, dtype=torch.float64), torch.rand(T, K, generator=g, dtype=torch.float64)
    w = torch.randn(D, D, generator=g, dtype=torch.float64)
    permute, unpermute = get_ops("torch")
    assert int(routing_index(dropped, E).tokens_per_expert_E.max()) <= 12  # capacity precondition
    outs = []
    for index in (routing_index(dropped, E),
                  routing_index(dropped, E, static=layout == "static", capacity=12 if layout == "capacity" else None)):
        x, p = x0.clone().requires_grad_(), p0.clone().requires_grad_()
        x_ND, p_N = permute(x, p, index)
        out = unpermute(torch.tanh(x_ND @ w), p_N, index)
        (out.square().sum() + p_N.square().sum()).backward()
        kept = index.src_pair_N < T * K
        assert torch.all(p_N[~kept] == 0), "padding rows carry probability zero"
        outs.append((out.detach(), x.grad, p.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_capacity_rows_equal_grouped_rows():
    experts = GroupedExperts(4, 16, 32, True, ep=1, ep_rank=0, etp=1, etp_rank=0)
    experts.init_from_seed(0, "e")
    x = torch.randn(4 * 5, 16, generator=torch.Generator().manual_seed(2))
    a = experts(x, ExpertRows(torch.tensor([5, 10, 15, 20], dtype=torch.int32), capacity=5))
    b = experts._forward_padded(x, (5, 5, 5, 5))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _count_steps(trainer: Trainer, steps: range) -> list[tuple[Anatomy, int]]:
    """(mode of the whole step, host reads inside forward + backward) per step."""
    inner_reads = []
    orig = trainer_mod.run_schedule

    def schedule(*a, **k):
        mode = Anatomy()
        with mode, count_host_methods(mode):
            out = orig(*a, **k)
        inner_reads.append(sum(mode.host_reads.values()))
        return out

    results = []
    trainer_mod.run_schedule = schedule
    try:
        for s in steps:
            mode = Anatomy()
            with mode, count_host_methods(mode):
                trainer.step(s)
            results.append((mode, inner_reads[-1]))
    finally:
        trainer_mod.run_schedule = orig
    return results


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_one_rank_step_reads_the_host_once(capacity):
    torch.manual_seed(0)
    training = TrainingSpec(seq_length=32, global_batch_size=2, precision="fp32",
                            moe_expert_capacity_factor=capacity)
    trainer = Trainer(TEST_SPEC, training, ParallelDims.single(Mapping(micro_batch_size=1)),
                      bundled_corpus_tokens(), seed=0)
    (first, inner1), (second, inner2), (third, inner3) = _count_steps(trainer, range(3))
    assert inner1 == inner2 == inner3 == 0, "forward and backward read nothing back"
    assert [sum(m.host_reads.values()) for m in (first, second, third)] == [1, 1, 1]
    assert not (first.data_dependent or second.data_dependent or third.data_dependent)
    assert second.shapes | third.shapes <= first.shapes, "every step has the first step's shapes"
    assert second.ops == third.ops  # once the optimizer state exists, every step runs the same ops


def _ep2_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mapping = Mapping(ep=2, micro_batch_size=1)
        training = TrainingSpec(seq_length=32, global_batch_size=4, precision="fp32")
        dims = build_parallel_dims(mapping, 2, 2, torch.device("cpu"))
        trainer = Trainer(TEST_SPEC, training, dims, bundled_corpus_tokens(), seed=0)
        trainer.step(0)
        mode = Anatomy()
        with mode, count_host_methods(mode):
            trainer.step(1)
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"reads": sum(mode.host_reads.values()), "data_dependent": sum(mode.data_dependent.values())}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ep2_reads_once_per_moe_layer_and_micro_batch(tmp_path):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_ep2_rank, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0]
    num_moe = sum(TEST_SPEC.moe_layer_pattern())
    num_micro = 2  # global batch 4 over dp 2, micro-batch 1
    for r in range(2):
        got = json.loads(Path(tmp_path, f"rank{r}.json").read_text())
        assert got == {"reads": num_moe * num_micro + 1, "data_dependent": 0}, (r, got)


def test_bf16_mixed_precision_keeps_fp32_main_grads_and_masters():
    """Megatron-style bf16 (CPU runs it too): bf16 parameters, fp32 main grads, fp32 masters
    and moments = 2 + 4 + 12 bytes per parameter at dp 1; losses track the fp32 run."""
    training = TrainingSpec(seq_length=32, global_batch_size=4, precision="fp32")
    losses = {}
    for dtype in (None, torch.bfloat16):
        trainer = Trainer(TEST_SPEC, training, ParallelDims.single(Mapping(micro_batch_size=1)),
                          bundled_corpus_tokens(), seed=0, autocast_dtype=dtype)
        losses[dtype] = [trainer.step(s).loss for s in range(3)]
    params = list(trainer.model.parameters())
    n = sum(p.numel() for p in params)
    assert trainer.autocast_dtype is None and {p.dtype for p in params} == {torch.bfloat16}
    assert sum(p.main_grad.numel() * p.main_grad.element_size() for p in params) == 4 * n
    opt = trainer.optimizer
    state = [opt.inner.state[b.master] for b in opt.buckets]
    assert sum(b.master.numel() * b.master.element_size() for b in opt.buckets) == 4 * n
    assert sum(s[k].numel() * s[k].element_size() for s in state for k in ("exp_avg", "exp_avg_sq")) == 8 * n
    # the masters keep what bf16 rounds away: updates of ~lr do not vanish
    master = torch.cat([b.master.detach() for b in opt.buckets])
    as_bf16 = torch.cat([b.flat([p.detach() for p in b.params]) for b in opt.buckets])
    assert not torch.equal(master, as_bf16) and torch.equal(master.bfloat16().float(), as_bf16)
    torch.testing.assert_close(torch.tensor(losses[torch.bfloat16]), torch.tensor(losses[None]), rtol=2e-3, atol=0)


def test_bf16_resume_restores_the_fp32_masters_bit_for_bit():
    """A bf16 run's optimizer state carries its fp32 masters: continuing from a saved state
    equals not stopping (model + optimizer state dicts, as checkpoint.py saves them)."""
    training = TrainingSpec(seq_length=32, global_batch_size=2, precision="fp32")

    def trainer():
        return Trainer(TEST_SPEC, training, ParallelDims.single(Mapping(micro_batch_size=1)),
                       bundled_corpus_tokens(), seed=0, autocast_dtype=torch.bfloat16)

    a = trainer()
    for s in range(2):
        a.step(s)
    buf = io.BytesIO()  # through bytes, as a checkpoint file: nothing shared with `a`
    torch.save({"model": a.model.state_dict(), "optimizer": a.optimizer.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert "masters" in saved["optimizer"]
    b = trainer()
    b.model.load_state_dict(saved["model"])
    b.optimizer.load_state_dict(saved["optimizer"])
    assert [a.step(s).loss for s in (2, 3)] == [b.step(s).loss for s in (2, 3)]
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


TRITON_PADDED = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from executor.kernels import get_ops, routing_index
g = torch.Generator().manual_seed(5)
T, K, E, D = 13, 2, 4, 24
idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
idx = torch.where(torch.rand(T, K, generator=g) < 0.3, torch.full_like(idx, -1), idx)
x0, p0 = torch.randn(T, D, generator=g), torch.rand(T, K, generator=g)
w = torch.randn(D, D, generator=g) / D ** 0.5
worst = 0.0
cap = int(torch.bincount(idx[idx >= 0], minlength=E).max()) + 1  # the router's promise: <= C per expert
for kw in (dict(static=True), dict(capacity=cap)):
    index = routing_index(idx, E, **kw)
    outs = []
    for backend in ("torch", "triton"):
        permute, unpermute = get_ops(backend)
        x, p = x0.clone().requires_grad_(), p0.clone().requires_grad_()
        x_ND, p_N = permute(x, p, index)
        out = unpermute(torch.tanh(x_ND @ w), p_N, index)
        (out.square().sum() + p_N.square().sum()).backward()
        outs.append((out.detach(), p_N.detach(), x.grad, p.grad))
    for a, b in zip(*outs):
        worst = max(worst, float((a - b).abs().max()))
print("WORST", worst)
"""


@pytest.mark.timeout(300)
def test_triton_kernels_take_the_padded_layouts_interpreted():
    """The Triton kernels (GPU path) on static and capacity buffers equal the torch kernels;
    run by the Triton interpreter in a subprocess (TRITON_INTERPRET must precede the import)."""
    pytest.importorskip("triton")
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, "-c", TRITON_PADDED], capture_output=True, text=True,
                          env=env, cwd=repo, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split("WORST")[1]) < 1e-5  # fp32 both, summation order differs
