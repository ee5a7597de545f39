"""Measure this machine for the cost model: `python -m executor.profile --out FILE --nproc N`
(`foldplan profile --out FILE` is the same command).

The file it writes is a `cost_model.profile_model.Profile` (the keys, with their meaning and
bounds, are documented there), which `ClusterSpec.profile` carries and
cost_model/hardware.py reads in place of datasheet numbers; `raw` keeps every measurement and
`machine` the host. Modules:

  measure.py  what one rank measures (GEMM, k sweep, memory, op overhead, collectives, small
              GEMMs, elementwise rates, SDPA), torch
  executor_ops.py  what foldplan's own executor does (ops, bytes, per-op time, in-place
              traffic, optimizer per parameter) on tiny instances of its Trainer: the
              profile's `executor`, read by `training.runtime: foldplan` (CPU time on CPU
              ranks)
  lockstep.py the share of a core a rank gets while the ranks train together (alone,
              data-parallel, expert-parallel): turns the CPU times into wall time
  fit.py      the ranks' numbers -> a Profile: medians, the short-k fit, and the latency and
              bandwidth fit with bytes and steps counted by
              `cost_model.kernels.collective_bytes_and_steps`, as the cost model prices them
  launch.py   `run_profile` spawns `nproc` ranks on this host; `torchrun_worker` is one rank of
              a torchrun job across hosts (docs/CALIBRATION.md: on one host inter_node_* =
              intra_node_*; across hosts only inter_node_* is measured)
  cli.py      the command line
"""

from .cli import main
from .launch import run_profile

__all__ = ["main", "run_profile"]
