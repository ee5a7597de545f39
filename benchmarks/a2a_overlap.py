"""Exposed expert all-to-all with the overlap off and on, on CPU ranks (gloo).

    .venv/bin/python benchmarks/a2a_overlap.py [--reps 20] [--seq-length 64 512] [--out FILE]

The expert all-to-all overlap (issue 12 item 5; executor/moe.py) : for
tiny-moe and tiny-moe with a shared expert (`moe_shared_expert_intermediate_size` 256) at
ep 2 (two ranks, dp 2, same settings, no dispatch mode), one run per model alternates the
overlap off and on step by step (off, on, on, off, ...) after two warm-up steps, and reports
per rank the medians over `--reps` steps of each: seconds blocked in the token all-to-all
(`ep.all_to_all`, launch + wait, forward and backward; CommCounter.blocked_s), in the count
exchange (`ep.counts`), and the step's wall time. `--seq-length` scales the tokens.
tiny-moe has no shared expert, so the switch changes nothing there: its off/on difference is
the run's noise (an A/A control) to hold the shared variant's difference against.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
from step_anatomy import spawn_ranks  # the same rank launcher

OVERLAP_MODELS = {"tiny-moe": None, "tiny-moe+shared": 256}  # name -> shared expert FFN size


def _overlap_rank(rank: int, world: int, port: int, model: str, seq: int, reps: int,
                  result_file: str) -> None:
    """One rank of the overlap comparison (see the module docstring)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    from cost_model.presets import preset_model
    from cost_model.specs import Mapping, ModelSpec, TrainingSpec
    from executor.comm import CommCounter
    from executor.data import bundled_corpus_tokens
    from executor.moe import set_a2a_overlap
    from executor.parallel_dims import build_parallel_dims
    from executor.trainer import Trainer

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as executor.train does
    dist.init_process_group("gloo", rank=rank, world_size=world)
    spec = preset_model("tiny-moe")
    if OVERLAP_MODELS[model]:
        spec = ModelSpec(**dict(spec.model_dump(), name=model,
                                moe_shared_expert_intermediate_size=OVERLAP_MODELS[model]))
    training = TrainingSpec(seq_length=seq, global_batch_size=4, precision="fp32")
    dims = build_parallel_dims(Mapping(ep=2, micro_batch_size=1), world, world)
    counter = CommCounter()
    trainer = Trainer(spec, training, dims, bundled_corpus_tokens(), seed=0, counter=counter)
    keys = ("ep.all_to_all.forward", "ep.all_to_all.backward", "ep.counts.forward", "ep.counts.backward")
    samples: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
    order = [False, True, True, False]  # ABBA: a drift in load hits both alike
    for i in range(2 + 2 * reps):
        on = order[i % 4]
        set_a2a_overlap(trainer.chunks, on)
        before = {k: counter.blocked_s[k] for k in keys}
        t0 = time.perf_counter()
        trainer.step(i)
        step_s = time.perf_counter() - t0
        if i < 2:
            continue  # warm-up, one step of each
        got = {k: counter.blocked_s[k] - before[k] for k in keys}
        row = {"a2a_fwd_s": got[keys[0]], "a2a_bwd_s": got[keys[1]], "a2a_s": got[keys[0]] + got[keys[1]],
               "counts_s": got[keys[2]] + got[keys[3]], "step_s": step_s}
        for k, v in row.items():
            samples["on" if on else "off"].setdefault(k, []).append(v)
    dist.destroy_process_group()
    Path(result_file).write_text(json.dumps({
        mode: {k: {"median": statistics.median(v), "n": len(v)} for k, v in cols.items()}
        for mode, cols in samples.items()}))


def measure_overlap(model: str, seq: int, reps: int, work: Path) -> dict:
    """Both ranks' medians, overlap off and on, for one model."""
    files = [work / f"overlap-{model}-{seq}-rank{r}.json" for r in range(2)]
    ranks = spawn_ranks(_overlap_rank, lambda r: (model, seq, reps), files, timeout_s=900)
    return {"model": model, "ep": 2, "seq_length": seq, "reps": reps, "ranks": ranks}


def _print_overlap(r: dict) -> None:
    for mode in ("off", "on"):
        ranks = [x[mode] for x in r["ranks"]]
        cols = "  ".join(f"{k} " + "/".join(f"{x[k]['median'] * 1e3:6.2f}" for x in ranks)
                         for k in ("a2a_fwd_s", "a2a_bwd_s", "a2a_s", "counts_s", "step_s"))
        print(f"{r['model']:16s} seq {r['seq_length']:4d} overlap {mode:3s}  {cols}  (ms, rank 0/1)", flush=True)



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--reps", type=int, default=20, help="steps of each mode")
    ap.add_argument("--seq-length", type=int, nargs="*", default=[64], help="sequence lengths")
    args = ap.parse_args(argv)
    print(f"load: {os.getloadavg()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="overlap-") as tmp:
        for seq in args.seq_length:
            for model in OVERLAP_MODELS:
                results.append(measure_overlap(model, seq, args.reps, Path(tmp)))
                _print_overlap(results[-1])
    print(f"load: {os.getloadavg()}", flush=True)
    text = json.dumps({"global_batch_size": 4, "micro_batch_size": 1, "precision": "fp32",
                       "torch": torch.__version__, "results": results}, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
