"""Anatomy of one training step: dispatched ops, host reads, shapes, exposed communication.

    .venv/bin/python benchmarks/step_anatomy.py [--config ep1-dropless ...] [--out FILE.json]

Runs the executor's own rank entry point (`executor.train.main`, what `foldplan run` starts
under torchrun) for tiny-moe (seq 64, global batch 4, micro-batch 1, fp32, the default
distributed optimizer) in one process per rank on gloo, with a `TorchDispatchMode` installed
around the whole run. Per step = (5-step run - 2-step run) / 3 (issue 12's definition), so
process-group setup, model init and the metric files cancel out. Configurations:
ep1-dropless, ep1-cap1 (one rank), ep2-dropless, ep2-cap1 (two ranks, ep 2 x dp 2), "cap1" being
`moe_expert_capacity_factor: 1.0`. Counted per rank:

  ops             every aten / c10d op that reaches the dispatcher: views, the ops inside our
                  autograd Functions (forward and backward), optimizer and collectives included
  host_reads      reads of device data by the host: `_local_scalar_dense` (.item(), int(t),
                  float(t), bool(t)), `Tensor.tolist()` and `Tensor.numpy()` (these dispatch no
                  op on CPU, so they are counted by wrapping the methods), copies from a
                  non-CPU device to the CPU
  data_dependent  ops whose output shape depends on tensor values (nonzero, masked_select,
                  unique, bincount, boolean-mask indexing, repeat_interleave without
                  output_size): each forces a device sync on a GPU and defeats CUDA graphs
  new_shapes      distinct output shapes first seen after step 1, per step: 0 means every step
                  has the same shapes (what a CUDA graph needs)
  comm_s          wall time inside torch.distributed calls and in Work.wait() (gloo runs the
                  calls blocking, an async one blocks in its wait, so this is the
                  communication the step exposes), and step_s the step's wall time:
                  medians over the 5-step run's steps after the first
Per-op counts (`top_ops`) come with the JSON to show where the ops go; `--components` counts
the ops of one forward + backward of each piece of a layer (attention, RMSNorm, router,
dispatch + experts) and of the step outside the micro-batches.
The dispatch mode slows the run: step_s is for comparison between configurations only.
The all-to-all overlap (issue 12 item 5) is measured by benchmarks/a2a_overlap.py.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CONFIGS = {  # name -> (ep, capacity factor); ep 2 runs on two ranks (dp 2)
    "ep1-dropless": (1, None),
    "ep1-cap1": (1, 1.0),
    "ep2-dropless": (2, None),
    "ep2-cap1": (2, 1.0),
}
LONG, SHORT = 5, 2
DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
                  "unique_consecutive", "argwhere", "bincount", "masked_scatter"}
COMM_FUNCS = ("all_reduce", "all_to_all_single", "all_gather", "all_gather_into_tensor",
              "reduce_scatter_tensor", "broadcast", "barrier", "all_gather_object", "send", "recv")


class Anatomy(TorchDispatchMode):
    """Counts every dispatched op, host reads, data-dependent ops and output shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.host_reads: Counter[str] = Counter()
        self.data_dependent: Counter[str] = Counter()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[str(func)] += 1
        if name == "_local_scalar_dense":
            self.host_reads["item"] += 1
        if name in DATA_DEPENDENT or self._bool_index(name, args) or (
                name == "repeat_interleave" and kwargs.get("output_size") is None
                and isinstance(args[0], torch.Tensor) and len(args) < 3):
            self.data_dependent[name] += 1
        out = func(*args, **kwargs)
        if name in ("_to_copy", "copy_") and self._to_host(name, args, out):
            self.host_reads["copy_to_host"] += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out

    @staticmethod
    def _bool_index(name: str, args) -> bool:
        if name not in ("index", "index_put", "index_put_"):
            return False
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))

    @staticmethod
    def _to_host(name: str, args, out) -> bool:
        src = args[1] if name == "copy_" else args[0]
        dst = args[0] if name == "copy_" else out
        return (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)
                and src.device.type != "cpu" and dst.device.type == "cpu")


@contextlib.contextmanager
def count_host_methods(mode: Anatomy):
    """tolist() / numpy() read device data without dispatching an op on CPU: while inside,
    each call counts as a host read of `mode`."""
    saved = {meth: getattr(torch.Tensor, meth) for meth in ("tolist", "numpy")}
    for meth, orig in saved.items():
        @functools.wraps(orig)
        def wrapped(self, *a, __orig=orig, __name=meth, **k):
            mode.host_reads[__name] += 1
            return __orig(self, *a, **k)

        setattr(torch.Tensor, meth, wrapped)
    try:
        yield mode
    finally:
        for meth, orig in saved.items():
            setattr(torch.Tensor, meth, orig)


def _wrap_comm(timer: dict[str, float]) -> None:
    """Time spent inside torch.distributed calls (blocking on gloo) and in Work.wait() of
    async ones (a blocking call waits inside the call: counted once)."""
    inside = [0]
    orig_wait = dist.Work.wait

    def timed(orig):
        @functools.wraps(orig)
        def wrapped(*a, **k):
            outer = inside[0] == 0
            inside[0] += 1
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                inside[0] -= 1
                if outer:
                    timer["comm_s"] += time.perf_counter() - t0

        return wrapped

    dist.Work.wait = timed(orig_wait)
    for fname in COMM_FUNCS:
        setattr(dist, fname, timed(getattr(dist, fname)))


def _rank_main(rank: int, world: int, port: int, plan_file: str, steps: int, out_dir: str,
               result_file: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    from executor import train, trainer

    timer = {"comm_s": 0.0}
    per_step: dict[str, list[float]] = {"step_s": [], "comm_s": []}
    orig_step = trainer.Trainer.step

    def timed_step(self, *a, **k):
        t0, c0 = time.perf_counter(), timer["comm_s"]
        try:
            return orig_step(self, *a, **k)
        finally:
            per_step["step_s"].append(time.perf_counter() - t0)
            per_step["comm_s"].append(timer["comm_s"] - c0)

    trainer.Trainer.step = timed_step
    _wrap_comm(timer)
    mode = Anatomy()
    with mode, count_host_methods(mode):
        rc = train.main(["--plan", plan_file, "--steps", str(steps), "--out", out_dir])
    assert rc == 0, rc
    Path(result_file).write_text(json.dumps({
        "ops": dict(mode.ops), "host_reads": dict(mode.host_reads),
        "data_dependent": dict(mode.data_dependent), "num_shapes": len(mode.shapes), **per_step}))


def plan_for(ep: int, capacity: float | None, world: int) -> dict:
    """A one-candidate plan of tiny-moe on `world` CPU ranks (what `foldplan run` reads)."""
    return {
        "model": {"preset": "tiny-moe"},
        "cluster": {"num_nodes": 1, "gpus_per_node": world, "gpu": "cpu"},
        "training": {"seq_length": 64, "global_batch_size": 4, "precision": "fp32",
                     "moe_expert_capacity_factor": capacity},
        "candidates": [{"mapping": {"ep": ep, "micro_batch_size": 1}}],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, args_of_rank, files: list[Path], timeout_s: float = 600) -> list[dict]:
    """Run `target(rank, world, port, *args_of_rank(rank), result_file)` in one spawned process
    per rank (gloo on loopback); each writes its JSON to its file, returned in rank order."""
    world = len(files)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args_of_rank(r), str(files[r])))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        raise RuntimeError(f"ranks exited with {codes}")
    return [json.loads(f.read_text()) for f in files]


def run_once(ep: int, capacity: float | None, steps: int, work: Path) -> list[dict]:
    """Every rank's counts for one run of `steps` steps."""
    world = ep
    (work / "run").mkdir(parents=True, exist_ok=True)
    plan_file = work / "plan.json"
    plan_file.write_text(json.dumps(plan_for(ep, capacity, world)))
    return spawn_ranks(_rank_main, lambda r: (str(plan_file), steps, str(work / "run")),
                       [work / f"rank{r}.json" for r in range(world)])


def per_step(long: dict, short: dict) -> dict:
    """(long run - short run) / (LONG - SHORT) for every counter of one rank."""
    n = LONG - SHORT

    def diff(a: dict, b: dict) -> dict:
        return {k: (a.get(k, 0) - b.get(k, 0)) / n for k in set(a) | set(b) if a.get(k, 0) != b.get(k, 0)}

    ops = diff(long["ops"], short["ops"])
    reads = diff(long["host_reads"], short["host_reads"])
    dd = diff(long["data_dependent"], short["data_dependent"])
    return {
        "ops": sum(ops.values()),
        "host_reads": sum(reads.values()),
        "host_reads_by_kind": reads,
        "data_dependent_ops": sum(dd.values()),
        "data_dependent_by_op": dd,
        "new_shapes": (long["num_shapes"] - short["num_shapes"]) / n,
        # times: median over the long run's steps after the first (warm-up)
        "comm_s": statistics.median(long["comm_s"][1:]),
        "step_s": statistics.median(long["step_s"][1:]),
        "top_ops": [[k, v] for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:25]],
    }


def measure(name: str, work: Path) -> dict:
    ep, cap = CONFIGS[name]
    long = run_once(ep, cap, LONG, work / f"{name}-{LONG}")
    short = run_once(ep, cap, SHORT, work / f"{name}-{SHORT}")
    ranks = [per_step(a, b) for a, b in zip(long, short)]
    return {"config": name, "ep": ep, "capacity_factor": cap, "ranks": ranks}


def components(capacity: float | None) -> dict[str, int]:
    """Ops of one forward + backward of each piece of tiny-moe's first layer (one micro-batch,
    one CPU rank, after a warm-up step) and of the step outside the micro-batches: where the
    ops go. Pieces: attention, one RMSNorm, router, dispatch + experts + combine, the whole
    layer, and `step_rest` (gradient reduction, norm, clipping, optimizer, step numbers)."""
    from cost_model.presets import preset_model
    from cost_model.specs import Mapping, TrainingSpec
    from executor import trainer as trainer_mod
    from executor.data import bundled_corpus_tokens
    from executor.parallel_dims import ParallelDims
    from executor.router import Routing

    training = TrainingSpec(seq_length=64, global_batch_size=4, precision="fp32",
                            moe_expert_capacity_factor=capacity)
    dims = ParallelDims.single(Mapping(micro_batch_size=1))
    trainer = trainer_mod.Trainer(preset_model("tiny-moe"), training, dims, bundled_corpus_tokens(), seed=0)
    trainer.step(0)
    chunk = trainer.chunks[0]
    block = next(iter(chunk.layers.values()))
    _, rope, mask = chunk.attention_context(64, dims.device)
    h_BSD = torch.randn(1, 64, chunk.spec.hidden_size, requires_grad=True)
    h_TD = h_BSD.detach().view(64, -1).requires_grad_()
    h = h_TD if chunk.flat else h_BSD  # the layers' input as training passes it (model.py)
    routing = block.ffn.router(h_TD, dims, None)
    probs_TK = routing.probs_TK.detach().requires_grad_()

    def dispatch_experts():
        r = Routing(probs_TK, routing.indices_TK, routing.aux_loss, 0)
        x_MD, meta = block.ffn.dispatcher.dispatch(h_TD, r)
        block.ffn.dispatcher.combine(block.ffn.experts(x_MD, meta.rows), meta).sum().backward()

    def layer():
        x, aux, _ = block(h, rope, mask)
        (x.sum() + aux).backward()

    def router():
        r = block.ffn.router(h_TD, dims, None)
        (r.probs_TK.sum() + r.aux_loss).backward()

    pieces = {
        "attention": lambda: block.attn(h, rope, mask).sum().backward(),
        "rmsnorm": lambda: block.attn_norm(h).sum().backward(),
        "router": router,
        "dispatch_experts": dispatch_experts,
        "layer": layer,
    }
    out = {}
    for name, fn in pieces.items():
        mode = Anatomy()
        with mode:
            fn()
        out[name] = sum(mode.ops.values())  # incl. the few ops of .sum() and its backward seed
    inner = Anatomy()
    orig = trainer_mod.run_schedule

    def schedule(*a, **k):
        with inner:
            return orig(*a, **k)

    trainer_mod.run_schedule = schedule
    try:
        mode = Anatomy()
        with mode:
            trainer.step(1)
    finally:
        trainer_mod.run_schedule = orig
    out["step_rest"] = sum(mode.ops.values()) - sum(inner.ops.values())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="*", choices=sorted(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--out", default=None, help="write the JSON here (default: stdout only)")
    ap.add_argument("--components", action="store_true",
                    help="only the ops of each piece of one layer (ep 1, dropless and capacity)")
    args = ap.parse_args(argv)
    if args.components:
        for cap in (None, 1.0):
            print(f"capacity {cap}: " + ", ".join(f"{k} {v}" for k, v in components(cap).items()))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="anatomy-") as tmp:
        for name in args.config:
            results.append(measure(name, Path(tmp)))
            r = results[-1]["ranks"]
            worst = {k: max(x[k] for x in r) for k in ("ops", "host_reads", "data_dependent_ops", "new_shapes")}
            print(f"{name:14s} ops/step {worst['ops']:8.1f}  host reads/step {worst['host_reads']:5.1f}  "
                  f"data-dependent/step {worst['data_dependent_ops']:5.1f}  new shapes/step "
                  f"{worst['new_shapes']:5.1f}  comm {max(x['comm_s'] for x in r) * 1e3:6.1f} ms  "
                  f"step {max(x['step_s'] for x in r) * 1e3:7.1f} ms  (worst rank)", flush=True)
    doc = {"model": "tiny-moe", "seq_length": 64, "global_batch_size": 4, "micro_batch_size": 1,
           "precision": "fp32", "per_step": f"({LONG}-step run - {SHORT}-step run) / {LONG - SHORT}",
           "torch": torch.__version__, "results": results}
    text = json.dumps(doc, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
