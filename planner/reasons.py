"""Why no mapping fits: reasons that name the numbers and say what to change."""

from __future__ import annotations

import math

from cost_model.hardware import hardware
from cost_model.memory import GIB
from cost_model.specs import Mapping
from cost_model.validate import mapping_errors

_SIZE_FIELDS = {"tp", "cp", "pp", "ep", "etp"}


def infeasible_reasons(model, cluster, training, fixed: dict, configs, over: float, over_row,
                       closest) -> list[str]:
    """Reasons for an empty answer: the pinned mapping's own errors, else the memory the
    closest configuration lacks (`closest` from the memory bound, `over_row` from the
    evaluated mappings), else a divisibility hint."""
    if fixed and set(fixed) >= _SIZE_FIELDS:
        errors, _ = mapping_errors(model, cluster, training, Mapping(**fixed))
        if errors:
            return [e.message for e in errors]
    hw = hardware(cluster)
    capacity, reserve = hw.memory_bytes, hw.memory_reserve_bytes
    if capacity <= reserve:
        return [f"no mapping fits in memory: the GPU's {capacity / GIB:.1f} GiB are all taken by "
                f"the fixed reserve of {reserve / GIB:.1f} GiB for buffers and workspaces "
                f"(gpu.memory_reserve_gib): lower the reserve or use a GPU with more memory"]
    if over_row is None and closest[1] is not None:
        need, lc, pp = closest
        # With the state spread perfectly, the whole model's state over N GPUs must fit.
        min_gpus = math.ceil(cluster.world_size * (need - reserve) / (capacity - reserve))
        return [
            f"no mapping fits in memory: even the best spread of weights, gradients and "
            f"optimizer state (tp={lc.tp} pp={pp} ep={lc.ep} etp={lc.etp}, distributed "
            f"optimizer) needs at least {need / GIB:.1f} GiB per GPU of {capacity / GIB:.1f} "
            f"GiB, at least {(need - capacity) / GIB:.1f} GiB more per GPU before "
            f"activations: raise pp or ep, or add GPUs (about {min_gpus} of this kind at the "
            f"least)"
        ]
    if not configs or over_row is None:
        pinned = ", ".join(f"{k}={v}" for k, v in fixed.items()) or "none"
        return [f"no valid mapping of {model.name or 'this model'} on {cluster.world_size} GPUs "
                f"(pinned: {pinned}): check divisibility of heads, experts, layers and the "
                f"global batch by the parallel sizes"]
    m = over_row.mapping
    return [
        f"no mapping fits in memory: the closest ({_short(m)}) needs "
        f"{over_row.result.peak_bytes / GIB:.1f} GiB per GPU of "
        f"{over_row.result.capacity_bytes / GIB:.1f} GiB, at least {over / GIB:.1f} GiB more per "
        f"GPU: raise pp or ep, use full recompute, or add GPUs"
    ]


def _short(m: Mapping) -> str:
    return (f"tp={m.tp} cp={m.cp} pp={m.pp} vpp={m.vpp} ep={m.ep} etp={m.etp} dp={m.dp} "
            f"mbs={m.micro_batch_size} recompute={m.recompute}")
