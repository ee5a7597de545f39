"""What foldplan's own executor does per micro-batch and per step, measured on tiny instances
of its real modules (the `Trainer` of executor/trainer.py, its layers, dispatchers and
optimizer): the numbers `training.runtime: foldplan` predicts with
(cost_model/foldplan_runtime.py).

Nothing here is hard-coded about the executor: every count comes from running its current
code under a `TorchDispatchMode` that sees every op reaching the dispatcher (views, the ops
inside our autograd Functions, forward and backward, collectives), so the profile follows the
executor as it changes.

- Ops: one training step of a tiny model (width 32, 4 heads / 2 query groups, 8 experts top-2,
  expert FFN 64, vocabulary 256, seq `SEQ`, two micro-batches per rank, the second one
  counted: it accumulates gradients, as every micro-batch of a step but the first does) with 1
  and 2 MoE layers, and with one MoE + one dense layer. Per micro-batch (inside
  `pipeline.run_schedule`, from the last micro-batch's `get_batch` call on): a MoE
  layer = ops(2 MoE) - ops(1 MoE), a dense layer = ops(MoE + dense) - ops(1 MoE), the edge
  (embedding, output layer, loss, schedule) = ops(1 MoE) - a MoE layer. Per step outside
  the micro-batches (gradient reduction, norm, clipping, AdamW, step numbers): a base and a
  per-layer slope from the same two models. The MoE layer is counted for each expert layout
  the profile's world can host: `local` (ep = etp = 1, one rank), `local_dp` (the same on
  every rank, dp = world), `alltoall_ep`, `allgather_ep`
  (ep = world), `alltoall_etp` (etp = world), `alltoall_ep_etp` (ep 2 x etp world/2, world
  >= 4); `_capacity` for the same with capacity factor 1
  (`cost_model.foldplan_runtime.moe_layer_ops_key`). Collective calls are counted by kind
  beside the ops (the cost model prices their latency).
- Bytes: per op, its non-view tensors (inputs and outputs; GEMMs, attention and collectives
  excluded: they are priced by their own laws), per micro-batch, at seq `SEQ` and 2 * `SEQ`:
  the difference over the extra tokens is the per-token traffic, given in h-wide rows of 4
  bytes ("row passes" per layer; the edge in V-wide logit rows); the rest, per parameter of
  the layer, is the weight traffic of a micro-batch (main-gradient accumulation, weight
  copies).
Times are read with `work_clock`: on CPU ranks the CPU time the rank itself spent (not the
wall time, which also holds the time other processes had the core: one share for the whole
step, `cpu_share`, measured in lockstep.py, turns CPU into wall time); on GPUs the wall clock.

- Time per op: the 2-MoE-layer model's micro-batch (`run_schedule`) time over its op
  count, at the tiny sizes where no op has work to speak of: what one op of the executor
  costs on its own (Python, autograd, dispatch, allocation), `EXECUTOR_REPEATS` times.
- Traffic in place (`TRAFFIC_INSTANCES`): 4-layer models of width 96 and 192 train; the
  micro-batches' time less their GEMM and attention calls (timed again alone) and less
  their ops' fixed cost (per op as the tiny model's, measured in alternation), over the bytes
  the other ops move: the rate at which the executor's non-GEMM ops move data in a real step
  (cold caches, fresh allocations), at two row sizes.
- Share of a core (lockstep.py): CPU time over wall time of a rank while the ranks train a
  model together (data-parallel, in lockstep).
- Step outside the micro-batches per parameter: a model with about 3.5 M parameters
  (width 256, 8 experts of FFN 512, one layer), timed over steps: AdamW (`optimizer.step`,
  on the optimizer's shard) per parameter, and the rest of the step outside the micro-batches
  (gradient flattening, norm, clipping, zeroing) per parameter, each less its ops' fixed cost.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

SEQ = 16
TINY_HIDDEN, TINY_VOCAB = 32, 256
EXECUTOR_REPEATS = 12
# Ops whose time the cost model prices by a FLOP law, not by bytes (their tensors are
# excluded from the byte count; the op still counts as an op).
PRICED_BY_FLOPS = {"mm", "bmm", "_grouped_mm", "addmm", "baddbmm", "linear",
                   "_scaled_dot_product_flash_attention_for_cpu",
                   "_scaled_dot_product_flash_attention_for_cpu_backward",
                   "_scaled_dot_product_flash_attention",
                   "_scaled_dot_product_flash_attention_backward",
                   "_scaled_dot_product_efficient_attention",
                   "_scaled_dot_product_efficient_attention_backward",
                   "_scaled_dot_product_cudnn_attention",
                   "_scaled_dot_product_cudnn_attention_backward"}


def collective_kind(op_name: str) -> str:
    """all_to_all, all_gather, reduce_scatter or all_reduce (the cost model's names) of a
    c10d op name (alltoall_base_, allgather_into_tensor_coalesced_, allreduce_, ...)."""
    for part, kind in (("alltoall", "all_to_all"), ("allgather", "all_gather"),
                       ("reduce_scatter", "reduce_scatter")):
        if part in op_name:
            return kind
    return "all_reduce"


class OpCounter(TorchDispatchMode):
    """Counts every dispatched op, the bytes of the non-view tensors each one touches, and
    the collective calls by kind; with `keep_priced`, keeps a copy of each GEMM and
    attention call (op, arguments) to time them again alone."""

    def __init__(self, keep_priced: bool = False) -> None:
        super().__init__()
        self.priced: list | None = [] if keep_priced else None
        self.ops = 0
        self.bytes = 0.0
        self.collectives: Counter[str] = Counter()  # calls by collective_kind

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        name = func.overloadpacket.__name__
        if func.namespace in ("c10d", "_c10d_functional"):
            if name not in ("wait", "wait_tensor", "barrier"):
                self.collectives[collective_kind(name)] += 1
            return out
        if name in PRICED_BY_FLOPS:
            if self.priced is not None:
                self.priced.append((func, tree_map(
                    lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t,
                    (args, kwargs))))
            return out
        if any(r.alias_info is not None and not r.alias_info.is_write
               for r in func._schema.returns):
            return out  # a view: no data moves
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def tiny_spec(num_layers: int, dense_last: bool = False, hidden: int = TINY_HIDDEN, ffn: int = 64,
              heads: int = 4, groups: int = 2):
    """The tiny model: `num_layers` MoE layers (the last one dense with `dense_last`)."""
    from cost_model.specs import ModelSpec

    freq = tuple([1] * (num_layers - 1) + [0 if dense_last else 1])
    return ModelSpec(name="profile-tiny", num_layers=num_layers, hidden_size=hidden,
                     num_attention_heads=heads, num_query_groups=groups,
                     kv_channels=hidden // heads, ffn_hidden_size=ffn, vocab_size=TINY_VOCAB,
                     num_experts=8, moe_ffn_hidden_size=ffn, moe_router_topk=2,
                     moe_layer_freq=freq)


def work_clock(device) -> Callable[[], float]:
    """The clock of the executor measurements: on CPU ranks the CPU time of what the rank
    computes (`time.thread_time` with one torch thread, as the executor gives ranks that share
    a host; `time.process_time` with several), whatever share of a core it got meanwhile: the
    profile's `cpu_share` (lockstep.py) turns it into wall time. On GPUs the wall clock (the
    host issues, the device runs)."""
    if device.type != "cpu":
        return time.perf_counter
    return time.thread_time if torch.get_num_threads() == 1 else time.process_time


@contextlib.contextmanager
def _schedule_probe(record: dict, clock: Callable[[], float] = time.perf_counter):
    """While inside: every `run_schedule` call of the executor's Trainer is timed by `clock`
    into record["sched_s"]; when record["counter"] is set, it runs under that counter and
    record["last_micro"] gets the counter's (ops, bytes) when the last micro-batch starts
    (its `get_batch` call), so the last micro-batch's own counts can be told apart."""
    from executor import trainer as trainer_mod

    orig = trainer_mod.run_schedule

    def probe(chunks, steps, p2p, get_batch, *a, **k):
        counter = record.get("counter")

        def batch(micro):
            if counter is not None:
                record["last_micro"] = (counter.ops, counter.bytes, Counter(counter.collectives))
            return get_batch(micro)

        t0 = clock()
        with counter if counter is not None else contextlib.nullcontext():
            out = orig(chunks, steps, p2p, batch, *a, **k)
        record.setdefault("sched_s", []).append(clock() - t0)
        return out

    trainer_mod.run_schedule = probe
    try:
        yield record
    finally:
        trainer_mod.run_schedule = orig


class _Layouts:
    """Builds Trainers of the tiny model for one expert layout, on the profile's ranks."""

    def __init__(self, dist, world: int, device):
        self.dist, self.world, self.device = dist, world, device
        self.clock = work_clock(device)

    def trainer(self, spec, layout: dict, capacity: float | None, seq: int = SEQ,
                micro_batch_size: int = 1):
        from cost_model.specs import Mapping, TrainingSpec
        from executor.data import bundled_corpus_tokens
        from executor.parallel_dims import ParallelDims, build_parallel_dims
        from executor.trainer import Trainer

        mapping = Mapping(micro_batch_size=micro_batch_size, **layout)
        if layout:
            dims = build_parallel_dims(mapping, self.world, self.world, self.device)
            dp = dims.dp
        else:
            dims, dp = ParallelDims.single(mapping, self.device), 1
        # Two micro-batches: the second one accumulates gradients, as all but the first of a
        # step do (and the first does nothing the others do not).
        training = TrainingSpec(seq_length=seq, global_batch_size=2 * dp * micro_batch_size,
                                precision="fp32",
                                moe_expert_capacity_factor=capacity)
        return Trainer(spec, training, dims, bundled_corpus_tokens(), seed=0)


def _count_step(trainer) -> dict[str, float]:
    """Ops and bytes of one step: of its last micro-batch (`sched_*`: the forward and
    backward of a micro-batch that accumulates gradients) and outside the micro-batches
    (`rest_ops`)."""
    inner, outer = OpCounter(), OpCounter()
    rec: dict = {"counter": inner}
    with _schedule_probe(rec), outer:
        trainer.step(1)
    ops0, bytes0, coll0 = rec["last_micro"]
    return {"sched_ops": inner.ops - ops0, "sched_bytes": inner.bytes - bytes0,
            "sched_collectives": dict(inner.collectives - coll0),
            "rest_ops": outer.ops - inner.ops,
            "rest_collectives": dict(outer.collectives - inner.collectives),
            "num_micro": trainer.num_micro, "all_sched_ops": inner.ops}


def _counts(layouts: _Layouts, layout: dict, capacity: float | None, full: bool) -> dict:
    """Counts of the 1- and 2-MoE-layer models (and, with `full`, the dense layer and the
    double-length sequence) for one expert layout."""
    out = {}
    runs = [("moe1", 1, False, SEQ), ("moe2", 2, False, SEQ)]
    if full:
        runs += [("dense", 2, True, SEQ), ("moe1_2s", 1, False, 2 * SEQ),
                 ("moe2_2s", 2, False, 2 * SEQ), ("dense_2s", 2, True, 2 * SEQ)]
    for name, layers, dense, seq in runs:
        tr = layouts.trainer(tiny_spec(layers, dense), layout, capacity, seq)
        tr.step(0)  # warm-up: lazily built state (rope tables, optimizer state)
        out[name] = _count_step(tr)
        out[name]["params"] = sum(p.numel() for p in tr.model.parameters())
    return out


def _timed_steps(tr, repeats: int, clock: Callable[[], float]) -> tuple[list[float], dict]:
    """Seconds (`clock`) of `repeats` steps of `tr` (steps 2, 3, ...), and what
    `_schedule_probe` recorded of them (`sched_s`: the micro-batch schedule's per step)."""
    rec: dict = {}
    steps = []
    with _schedule_probe(rec, clock):
        for i in range(repeats):
            t0 = clock()
            tr.step(2 + i)
            steps.append(clock() - t0)
    return steps, rec


def _op_seconds(layouts: _Layouts, repeats: int) -> dict:
    """Time per op (`work_clock`) of the 2-MoE-layer tiny model's micro-batch, and per op of
    the rest of its step."""
    tr = layouts.trainer(tiny_spec(2), {}, None)
    tr.step(0)
    counts = _count_step(tr)
    steps, rec = _timed_steps(tr, repeats, layouts.clock)
    sched = statistics.median(rec["sched_s"])
    rest = statistics.median(a - b for a, b in zip(steps, rec["sched_s"]))
    ops = counts["all_sched_ops"]  # the timed schedule runs every micro-batch
    return {"us_per_op": 1e6 * sched / ops,
            "us_per_op_windows": [1e6 * t / ops for t in rec["sched_s"]],
            "rest_us_per_op": 1e6 * rest / counts["rest_ops"], **counts}


def _step_seconds(layouts: _Layouts, us_per_op: float, repeats: int) -> dict:
    """Seconds per parameter of the step outside the micro-batches, on a ~3.5 M-parameter
    model: AdamW on the optimizer's shard, and the rest (less its ops' fixed cost)."""
    spec = tiny_spec(1, hidden=256, ffn=512, heads=8, groups=4)
    tr = layouts.trainer(spec, {}, None)
    tr.step(0)
    counts = _count_step(tr)
    opt_s: list[float] = []
    orig = tr.optimizer.step

    def timed_step():
        t0 = layouts.clock()
        orig()
        opt_s.append(layouts.clock() - t0)

    tr.optimizer.step = timed_step
    steps, rec = _timed_steps(tr, repeats, layouts.clock)
    params = sum(p.numel() for p in tr.model.parameters())
    rest = [a - b - c for a, b, c in zip(steps, rec["sched_s"], opt_s)]
    fixed = counts["rest_ops"] * us_per_op * 1e-6
    return {"params": params, "optimizer_s": statistics.median(opt_s),
            "rest_s": statistics.median(rest), "rest_ops": counts["rest_ops"],
            "optimizer_s_per_param": statistics.median(opt_s) / params,
            "rest_s_per_param": max(0.0, statistics.median(rest) - fixed) / params}


def _expert_layouts(world: int) -> list[tuple[str, dict]]:
    """(key, mapping fields) of the expert layouts this world can host (8 experts, FFN 64)."""
    out: list[tuple[str, dict]] = [("local_dp", {"ep": 1})] if world > 1 else []
    if world > 1 and 8 % world == 0:
        out += [("alltoall_ep", {"ep": world}),
                ("allgather_ep", {"ep": world, "dispatcher": "allgather"})]
    if world > 1 and 64 % world == 0:
        out += [("alltoall_etp", {"etp": world})]
    if world >= 4 and world % 2 == 0 and 64 % (world // 2) == 0:
        out += [("alltoall_ep_etp", {"ep": 2, "etp": world // 2})]
    return out


def _traffic_rate(layouts: _Layouts, tiny, tiny_ops: float, repeats: int, hidden: int,
                  seq: int, micro_batch_size: int) -> dict:
    """Bytes/s of the executor's own non-GEMM ops in place: a model of `TRAFFIC_LAYERS` MoE
    layers of width `hidden` (expert FFN 2 x hidden) trains steps of two micro-batches of
    `micro_batch_size` x `seq` tokens; the micro-batches' time, less their GEMM and
    attention calls timed again alone and less their ops' fixed cost, over the bytes their
    other ops move. Several layers, so that parameters, gradients and activations do not all
    stay in the caches (the rate falls several-fold when they do not). Each step alternates
    with a step of the `tiny` model (`tiny_ops` ops per schedule), whose time per op at that
    moment is the fixed cost subtracted: both see the same load of a shared machine. The
    median over the steps' rates; fit.py caps it at the hot-buffer elementwise rate."""
    spec = tiny_spec(TRAFFIC_LAYERS, hidden=hidden, ffn=2 * hidden, heads=hidden // 32,
                     groups=max(1, hidden // 64))
    tr = layouts.trainer(spec, {}, None, seq, micro_batch_size)
    tr.step(0)
    counter = OpCounter(keep_priced=True)
    with _schedule_probe({"counter": counter}):
        tr.step(1)

    def replay() -> float:
        t0 = layouts.clock()
        for func, (args, kwargs) in counter.priced:
            func(*args, **kwargs)
        return layouts.clock() - t0

    replay()
    priced = statistics.median(replay() for _ in range(3))
    rates, scheds, op_us = [], [], []
    for s in range(repeats):
        tiny_rec: dict = {}
        with _schedule_probe(tiny_rec, layouts.clock):
            tiny.step(2 + s)
        rec: dict = {}
        with _schedule_probe(rec, layouts.clock):
            tr.step(2 + s)
        us = tiny_rec["sched_s"][0] / tiny_ops
        rest = rec["sched_s"][0] - priced - counter.ops * us
        rates.append(counter.bytes / max(rest, 1e-6) / 1e9)
        scheds.append(rec["sched_s"][0])
        op_us.append(us * 1e6)
    return {"hidden": hidden, "tokens": seq * micro_batch_size,
            "row_bytes": seq * micro_batch_size * hidden * 4, "sched_s": scheds,
            "priced_s": priced, "ops": counter.ops, "bytes": counter.bytes,
            "us_per_op": op_us, "GBps_per_step": rates, "GBps": statistics.median(rates)}


# (hidden, seq, micro-batch) of the in-place traffic measurements: rows of 96 KiB, 384 KiB.
TRAFFIC_INSTANCES = ((96, 256, 1), (192, 256, 2))
TRAFFIC_LAYERS = 4


def measure_executor(dist, world: int, device, quick: bool) -> dict[str, Any]:
    """Every executor measurement of this rank (module docstring); all ranks call it together
    (the multi-rank layouts run collectives)."""
    layouts = _Layouts(dist, world, device)
    repeats = 4 if quick else EXECUTOR_REPEATS
    out: dict[str, Any] = {"seq": SEQ, "hidden": TINY_HIDDEN, "vocab": TINY_VOCAB}
    if dist.is_initialized():
        dist.barrier()
    out["op_time"] = _op_seconds(layouts, repeats)
    out["counts"] = {"local": _counts(layouts, {}, None, full=True),
                     "local_capacity": _counts(layouts, {}, 1.0, full=False)}
    for key, layout in _expert_layouts(world):
        out["counts"][key] = _counts(layouts, layout, None, full=False)
        out["counts"][key + "_capacity"] = _counts(layouts, layout, 1.0, full=False)
    if dist.is_initialized():
        dist.barrier()
    out["step_time"] = _step_seconds(layouts, out["op_time"]["us_per_op"], max(3, repeats // 2))
    if dist.is_initialized():
        dist.barrier()
    tiny = layouts.trainer(tiny_spec(2), {}, None)
    tiny.step(0)
    tiny_ops = _count_step(tiny)["all_sched_ops"]
    out["traffic"] = [_traffic_rate(layouts, tiny, tiny_ops, 3 if quick else 5, *shape)
                      for shape in (TRAFFIC_INSTANCES[:1] if quick else TRAFFIC_INSTANCES)]
    from .lockstep import measure_lockstep

    out["lockstep"] = measure_lockstep(layouts, dist, world, quick)
    out["clock"] = layouts.clock.__name__
    return out
