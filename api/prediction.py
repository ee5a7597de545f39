"""The prediction a run is measured against: the plan's estimate, or one for the profiled run
machines of this server (FOLDPLAN_RUN_PROFILE).

A run's `predicted` is the cost model's estimate with `training.runtime: foldplan` (the run is
foldplan's executor; equal to the plan's estimate when the profile has no executor
measurements) (`step_time_s`, `mfu`, `model_flops_per_step`,
`breakdown`, `memory`, ...) plus `machine` (which machine it is for), `num_gpus` and
`peak_flops_per_gpu` (the GPUs and the per-GPU peak its MFU is counted against:
`Hardware.mfu_peak_flops` at the plan's precision), so the measured MFU uses the same FLOPs
and peak (api/run_progress.py `with_rates`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cost_model.estimate import estimate
from cost_model.hardware import hardware
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec


def load_profile(path: Path) -> dict[str, Any]:
    """A `foldplan profile` JSON, checked as the cost model will read it; ValueError naming the
    file and the problem otherwise (the server refuses to start with a bad profile)."""
    try:
        profile = json.loads(Path(path).read_text())
        ClusterSpec(num_nodes=1, gpus_per_node=1, gpu="cpu", profile=profile)
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        why = "; ".join(e["msg"] for e in exc.errors()) if hasattr(exc, "errors") else str(exc)
        raise ValueError(f"run_profile={str(path)!r} is not a usable profile: {why}") from None
    return profile


def machine_prediction(plan: dict[str, Any], candidate: int, profile: dict[str, Any] | None,
                       profile_path: Path | None = None) -> dict[str, Any]:
    """The estimate for the machine the run uses: the plan's own cluster, or, when the server
    has a profile of its run machines (read from `profile_path`), the same cluster shape with
    the profile's numbers."""
    cl = plan["cluster"]
    training = TrainingSpec.model_validate(plan["training"])
    # A run is foldplan's executor: predicted with runtime foldplan, which uses the executor
    # measurements of the profile (cost_model/foldplan_runtime.py) and otherwise equals the
    # plan's own estimate.
    ours = training.model_copy(update={"runtime": "foldplan"})
    mapping = Mapping.model_validate(plan["candidates"][candidate]["mapping"])
    model = ModelSpec.model_validate(plan["model"])
    if profile is None:
        cluster = ClusterSpec.model_validate(cl)
        if cluster.profile is not None and cluster.profile.executor is not None:
            est = estimate(model, cluster, ours, mapping).model_dump(mode="json")
        else:
            est = dict(plan["candidates"][candidate]["estimate"])
        gpu = cl.get("gpu")
        gpu_name = gpu if isinstance(gpu, str) else (gpu or {}).get("name", "custom GPU")
        est["machine"] = (f"the plan's cluster: {cl['num_nodes']} x {cl['gpus_per_node']} "
                          f"{gpu_name}")
    else:
        on_cpu = (profile.get("backend") == "gloo"
                  or not profile.get("machine", {}).get("cuda_devices"))
        cluster = ClusterSpec.model_validate(  # a CPU profile: CPU ranks, whatever the plan's GPU
            {**cl, "profile": profile, **({"gpu": "cpu"} if on_cpu else {})})
        est = estimate(model, cluster, ours, mapping).model_dump(mode="json")
        est["machine"] = f"this server's run machines, profiled in {profile_path}"
    est["num_gpus"] = cluster.world_size
    est["peak_flops_per_gpu"] = hardware(cluster).mfu_peak_flops(training.precision)
    return est
