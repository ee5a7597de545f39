"""Mapping-independent ("portable") model and optimizer state, for resuming on another mapping.

Every parameter shard knows where its elements sit in the single-rank tensor: applying the
rank's own sharding (`Trainer.shard_of_full`) to arange(numel).view(full_shape) gives the flat
full-tensor index of each local element. A checkpoint stores, per rank and parameter, those
indices with the values and the AdamW moments (the distributed optimizer's moment shards are
all-gathered to whole local parameters first). Loading on any mapping (any world size):
read every old rank's file, scatter the elements into full tensors, and take this rank's
shard of each with the new sharding. Replicated copies simply write the same values twice.
Buffers (`Trainer.named_buffers`: state that is not a parameter, the routers' expert bias
of aux-loss-free balancing) travel the same way, with values only: each is whole on every
rank holding its layer, so its index is arange(numel) and every new rank holding the layer
takes the whole tensor, whichever stage, expert shard or world size it has now.
Cost: every new rank reads every old rank's file (fine for the model sizes run here).
"""

from __future__ import annotations

from pathlib import Path

import torch


def portable_state(trainer) -> dict:
    """{"step": adam step, "params": {name: (full_shape, index, value, exp_avg, exp_avg_sq)},
    "buffers": {name: (full_shape, index, value)}}."""
    opt = trainer.optimizer
    if trainer.distributed_optimizer:
        step, moments = opt.param_moments()
    else:
        step, moments = 0.0, {}
        for p, st in opt.state.items():
            step = float(st["step"])
            moments[p] = (st["exp_avg"], st["exp_avg_sq"])
    params = {}
    for name, p in trainer.named_parameters():
        shape = trainer.full_shape_of(name)
        index = trainer.shard_of_full(name, torch.arange(int(torch.tensor(shape).prod())).view(shape))
        m = moments.get(p, (torch.zeros_like(p), torch.zeros_like(p)))
        params[name] = (shape, index.reshape(-1).clone(), p.detach().reshape(-1).cpu().clone(),
                        m[0].reshape(-1).cpu().clone(), m[1].reshape(-1).cpu().clone())
    buffers = {name: (tuple(b.shape), torch.arange(b.numel()), b.detach().reshape(-1).cpu().clone())
               for name, b in trainer.named_buffers()}  # whole on every rank: see the docstring
    return {"step": step, "params": params, "buffers": buffers}


def full_tensors(files: list[Path]) -> tuple[float, dict[str, list[torch.Tensor]]]:
    """Reassemble full tensors from every rank's portable state: [value, exp_avg, exp_avg_sq]
    per parameter, [value] per buffer (a file written before buffers were saved has none)."""
    full: dict[str, list[torch.Tensor]] = {}
    step = 0.0
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=True)["portable"]
        step = max(step, state["step"])
        entries = list(state["params"].items()) + list(state.get("buffers", {}).items())
        for name, (shape, index, *values) in entries:
            if name not in full:
                full[name] = [torch.zeros(tuple(shape)) for _ in values]
            for dst, v in zip(full[name], values):
                dst.view(-1)[index] = v
    return step, full


@torch.no_grad()
def load_portable(trainer, step: float, full: dict[str, list[torch.Tensor]]) -> None:
    """Set this rank's parameter shards, AdamW moments and buffers from the full tensors."""
    moments = {}
    for name, p in trainer.named_parameters():
        if name not in full:
            raise ValueError(f"checkpoint has no parameter {name!r} (a different model?)")
        value, m1, m2 = (trainer.shard_of_full(name, t).to(p.device, p.dtype) for t in full[name])
        p.copy_(value)
        moments[p] = (m1, m2)
    for name, b in trainer.named_buffers():
        if name not in full:
            raise ValueError(f"checkpoint has no buffer {name!r} (written before buffers were "
                             "checkpointed, or a different model)")
        value = full[name][0]
        if tuple(value.shape) != tuple(b.shape):
            raise ValueError(f"checkpoint buffer {name!r} has shape {tuple(value.shape)}, "
                             f"this model's has {tuple(b.shape)} (a different model?)")
        b.copy_(value.to(b.device, b.dtype))
    opt = trainer.optimizer
    if step == 0:
        return
    if trainer.distributed_optimizer:
        opt.set_param_moments(step, moments)
    else:
        for p, (m1, m2) in moments.items():
            opt.state[p] = {"step": torch.tensor(step), "exp_avg": m1.clone(), "exp_avg_sq": m2.clone()}
