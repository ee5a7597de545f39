"""All-to-all overlap (issue 12 item 5) on gloo ranks: the overlapped and the plain path are
bit-identical, and the overlap really happens.

- comm: `all_to_all_v_start(...).wait()` moves the same rows and gradients as `all_to_all_v`
  (uneven splits, an empty one included), with compute between start and wait.
- training: for each mapping, two trainers from the same seed, `a2a_overlap` on and off, two
  steps each: every loss, gradient (step 1) and parameter (after step 2) torch.equal.
- resume: the overlapped run's state after step 2, loaded into a plain trainer, gives the
  same step 3 as the overlapped run continuing (ep2_w2).
- order: with the overlap on, the shared experts' forward runs between the launch of the token
  all-to-all and its wait, and their backward between the launch of the gradient's all-to-all
  and its wait; with it off, the exchanges are blocking (`all_to_all_v`, the code path of
  before the overlap).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _multirank import TEST_SPEC, TEST_TRAINING, free_port

from cost_model.specs import Mapping
from executor import comm
from executor.data import bundled_corpus_tokens
from executor.moe import MoELayer, set_a2a_overlap
from executor.parallel_dims import Group, build_parallel_dims
from executor.router import RouterConfig
from executor.trainer import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WORLD = 4
# (name, world, mapping fields, router options)
CONFIGS = [
    ("ep2_w2", 2, {"ep": 2}, {}),
    ("ep2_capacity_w2", 2, {"ep": 2}, {"capacity_factor": 1.0, "aux_loss_coeff": 0.0}),
    ("ep2_recompute_full_w2", 2, {"ep": 2, "recompute": "full"}, {}),
    ("tp2_ep2_w4", 4, {"tp": 2, "ep": 2}, {}),  # the shared MLP's tp collectives while EP is in flight
    ("etp2_ep2_w4", 4, {"ep": 2, "etp": 2}, {}),
]


def _comm_check(rank: int, world: int) -> dict:
    """Uneven splits (rank r sends (r + j) % 3 rows to rank j; 0 rows to itself on rank 0)."""
    g = Group(tuple(range(world)), dist.group.WORLD, rank)
    in_splits = [(rank + j) % 3 for j in range(world)]
    out_splits = [(j + rank) % 3 for j in range(world)]
    base = torch.randn(sum(in_splits), 5, generator=torch.Generator().manual_seed(rank))
    w = torch.randn(sum(out_splits), 5, generator=torch.Generator().manual_seed(10 + rank))
    x1, x2 = base.clone().requires_grad_(), base.clone().requires_grad_()
    y1 = comm.all_to_all_v(x1, out_splits, in_splits, g)
    counter = comm.CommCounter()
    pending = comm.all_to_all_v_start(x2, out_splits, in_splits, g, counter, "w.a2a")
    busy = (torch.randn(64, 64) @ torch.randn(64, 64)).sum()  # compute while in flight
    y2 = pending.wait()
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    return {"values": bool(torch.equal(y1, y2)), "grads": bool(torch.equal(x1.grad, x2.grad)),
            "busy_finite": bool(torch.isfinite(busy)), "bytes": dict(counter.current),
            "blocked_keys": sorted(counter.blocked_s)}


def _trace_order(trainer: Trainer) -> list[str]:
    """Events of one step on this rank: launches and waits of the EP token all-to-all and the
    shared experts' forward and backward of the first MoE layer."""
    events: list[str] = []
    launch, wait = comm._a2a_launch, comm._a2a_wait

    def traced_launch(*a, **k):
        events.append("launch " + a[-1])
        return launch(*a, **k)

    def traced_wait(work, counter, key):
        wait(work, counter, key)
        events.append("wait " + key)

    layer = next(m for c in trainer.chunks for m in c.modules() if isinstance(m, MoELayer))
    hooks = [layer.shared.register_forward_hook(lambda *_: events.append("shared forward")),
             layer.shared.register_full_backward_hook(lambda *_: events.append("shared backward"))]
    comm._a2a_launch, comm._a2a_wait = traced_launch, traced_wait
    try:
        trainer.step(2)
    finally:
        comm._a2a_launch, comm._a2a_wait = launch, wait
        for h in hooks:
            h.remove()
    return events


def _resume_check(t_on: Trainer, dims, rank: int, name: str, tokens, router_opts) -> list[float]:
    """[continued loss, resumed loss] of step 3: overlapped run vs its checkpoint in a plain one."""
    from executor.reshard import full_tensors, load_portable, portable_state

    d = Path(os.environ["OVERLAP_OUT"], name)
    d.mkdir(exist_ok=True)
    torch.save({"portable": portable_state(t_on)}, d / f"rank{rank}.pt")
    dist.barrier(group=dims.group("ep").pg)  # the two ranks of this sub-world
    t_new = Trainer(TEST_SPEC, TEST_TRAINING, dims, tokens, seed=0, router_config=RouterConfig(**router_opts),
                    a2a_overlap=False)
    adam_step, full = full_tensors([d / f"rank{r}.pt" for r in range(2)])
    load_portable(t_new, adam_step, full)
    return [t_on.step(2).loss, t_new.step(2).loss]


def _overlap_job(rank: int, world: int) -> dict:
    tokens = bundled_corpus_tokens()
    out = {"_comm": _comm_check(rank, world)}
    for name, w, fields, router_opts in CONFIGS:
        dims = build_parallel_dims(Mapping(**fields), w, gpus_per_node=4, base_ranks=list(range(w)))
        if dims is None:
            continue
        runs = {}
        for on in (False, True):
            t = Trainer(TEST_SPEC, TEST_TRAINING, dims, tokens, seed=0, router_config=RouterConfig(**router_opts),
                        a2a_overlap=on)
            stats = [t.step(s, keep_grads=(s == 0)) for s in range(2)]
            runs[on] = (t, stats)
        (t_off, s_off), (t_on, s_on) = runs[False], runs[True]
        same_grads = all(torch.equal(s_off[0].grads[n], s_on[0].grads[n]) for n in s_off[0].grads)
        p_off, p_on = dict(t_off.named_parameters()), dict(t_on.named_parameters())
        same_params = all(torch.equal(p_off[n], p_on[n]) for n in p_off)
        resume = _resume_check(t_on, dims, rank, name, tokens, router_opts) if name == "ep2_w2" else None
        # the same trainer, flipped off again between steps: the plain order
        order_on = _trace_order(t_on)
        set_a2a_overlap(t_on.chunks, False)
        order_off = _trace_order(t_on)
        out[name] = {"loss_off": [s.loss for s in s_off], "loss_on": [s.loss for s in s_on],
                     "grad_norm_off": [s.grad_norm for s in s_off], "grad_norm_on": [s.grad_norm for s in s_on],
                     "same_grads": same_grads, "same_params": same_params, "num_grads": len(s_off[0].grads),
                     "order_on": order_on, "order_off": order_off, "resume": resume}
    return out


def _entry(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      OVERLAP_OUT=out_dir)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(_overlap_job(rank, world)))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def overlap(tmp_path_factory) -> dict[str, list[dict]]:
    out_dir = tmp_path_factory.mktemp("overlap")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, WORLD, port, str(out_dir))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "ranks timed out after 240 s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    merged: dict[str, list[dict]] = {}
    for r in range(WORLD):
        for name, res in json.loads(Path(out_dir, f"rank{r}.json").read_text()).items():
            merged.setdefault(name, []).append(res)
    return merged


def test_start_wait_moves_the_same_rows_and_gradients(overlap):
    for r in overlap["_comm"]:
        assert r["values"] and r["grads"] and r["busy_finite"]
        assert r["bytes"]["w.a2a"] > 0  # forward and backward bytes counted
        assert r["blocked_keys"] == ["w.a2a.backward", "w.a2a.forward"]


@pytest.mark.parametrize("name", [c[0] for c in CONFIGS])
def test_overlap_is_bit_identical(overlap, name):
    world = {c[0]: c[1] for c in CONFIGS}[name]
    ranks = overlap[name]
    assert len(ranks) == world
    for r in ranks:
        assert r["loss_on"] == r["loss_off"]  # exact float equality
        assert r["grad_norm_on"] == r["grad_norm_off"]
        assert r["num_grads"] > 0 and r["same_grads"]
        assert r["same_params"]


def test_overlapped_checkpoint_resumes_bit_exactly(overlap):
    for r in overlap["ep2_w2"]:
        continued, resumed = r["resume"]
        assert continued == resumed


def _inside(events: list[str], middle: str, launch: str, wait: str) -> list[bool]:
    """For each `middle` event: does it fall between a `launch` and the next `wait`?"""
    out, open_ = [], False
    for e in events:
        if e == launch:
            open_ = True
        elif e == wait:
            open_ = False
        elif e == middle:
            out.append(open_)
    return out


@pytest.mark.parametrize("name", [c[0] for c in CONFIGS])
def test_shared_experts_overlap_the_dispatch(overlap, name):
    for r in overlap[name]:
        for direction in ("forward", "backward"):
            args = (f"shared {direction}", f"launch ep.all_to_all.{direction}", f"wait ep.all_to_all.{direction}")
            on, off = _inside(r["order_on"], *args), _inside(r["order_off"], *args)
            assert on and all(on), (direction, r["order_on"])
            assert off and not any(off), (direction, r["order_off"])
        assert not any(e.startswith("launch ") for e in r["order_off"])  # plain: blocking exchanges
