"""Per-rank checkpoints: DIR/checkpoints/step_<N>/rank<r>.pt plus a COMPLETE marker.

Every rank writes its own model shard and optimizer state; after a barrier rank 0 writes
COMPLETE (with the world size and mapping), so a checkpoint without the marker is ignored.
Data order is a pure function of the step (see data.py), so resuming at step N continues with
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


def _step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:08d}"


def save(out_dir: Path, step: int, rank: int, model, optimizer, meta: dict) -> Path:
    """Collective: every rank saves, then rank 0 marks the checkpoint complete."""
    d = _step_dir(out_dir, step)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"rank{rank}.pt.tmp"
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
    tmp.replace(d / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (d / "COMPLETE").write_text(json.dumps(dict(meta, step=step)))
    dist.barrier()
    return d


def latest_complete(out_dir: Path) -> int | None:
    """Highest step with a COMPLETE marker, or None."""
    root = Path(out_dir) / "checkpoints"
    steps = [int(p.parent.name.split("_")[1]) for p in root.glob("step_*/COMPLETE")]
    return max(steps) if steps else None


def load(out_dir: Path, step: int, rank: int, model, optimizer, meta: dict) -> None:
    """Load this rank's shard of checkpoint `step`; refuses a different world or mapping."""
    d = _step_dir(out_dir, step)
    saved = json.loads((d / "COMPLETE").read_text())
    for key, value in meta.items():
        if saved.get(key) != value:
            raise ValueError(f"checkpoint {d} was written with {key}={saved.get(key)!r}, "
                             f"this run has {key}={value!r}")
    state = torch.load(d / f"rank{rank}.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
