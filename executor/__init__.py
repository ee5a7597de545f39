"""foldplan executor: trains an MoE transformer on the folded layout of a plan.

Layers (no module imports one above it):
  parallel_dims -> comm -> kernels -> router / dispatcher / experts -> moe -> model -> train
  launch starts `python -m executor.train` under torchrun.
"""
