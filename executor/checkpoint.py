"""Per-rank checkpoints: DIR/checkpoints/step_<N>/rank<r>.pt plus a COMPLETE marker.

Every rank writes its own model shard and optimizer state (native, for resuming on the same
mapping) and the portable form of reshard.py (for resuming on another mapping or world size);
both carry the model's buffers (the routers' expert bias) beside the parameters, so
aux-loss-free balancing continues where it was on either path;
after a barrier rank 0 writes COMPLETE (with the world size and mapping), so a checkpoint
without the marker is ignored.
Data order is a pure function of the step (see data.py), so resuming at step N continues with
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from .reshard import full_tensors, load_portable, portable_state
from .run_files import COMPLETE_MARKER, checkpoint_dir, latest_checkpoint

_step_dir = checkpoint_dir  # the folder layout lives in run_files (the service reads it too)


def save(out_dir: Path, step: int, rank: int, trainer, meta: dict) -> Path:
    """Collective: every rank saves, then rank 0 marks the checkpoint complete."""
    d = _step_dir(out_dir, step)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"rank{rank}.pt.tmp"
    torch.save({"step": step, "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                "portable": portable_state(trainer)}, tmp)
    tmp.replace(d / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (d / COMPLETE_MARKER).write_text(json.dumps(dict(meta, step=step)))
    dist.barrier()
    return d


latest_complete = latest_checkpoint  # highest step with a COMPLETE marker, or None


def load(out_dir: Path, step: int, rank: int, trainer, meta: dict) -> bool:
    """Load checkpoint `step` into this rank's trainer; returns whether it was resharded.

    Same world size and mapping: this rank's own file. Otherwise every rank's portable state
    is reassembled and resharded for this mapping. A different seed (data order) is refused.
    """
    d = _step_dir(out_dir, step)
    saved = json.loads((d / COMPLETE_MARKER).read_text())
    for key, value in meta.items():
        if key not in ("world_size", "mapping") and saved.get(key) != value:
            raise ValueError(f"checkpoint {d} was written with {key}={saved.get(key)!r}, "
                             f"this run has {key}={value!r}")
    if all(saved.get(k) == meta.get(k) for k in ("world_size", "mapping")):
        state = torch.load(d / f"rank{rank}.pt", map_location="cpu", weights_only=True)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        return False
    adam_step, full = full_tensors([d / f"rank{r}.pt" for r in range(saved["world_size"])])
    load_portable(trainer, adam_step, full)
    return True
