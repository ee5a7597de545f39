"""foldplan executor: trains an MoE transformer on the folded layout of a plan.

Layers (no module imports one above it):
  arch / norm / parallel_dims -> comm -> tensor_parallel -> kernels -> router / dispatcher /
  experts / mlp -> moe / attention / mla -> model -> pipeline / optimizer -> trainer ->
  reshard / checkpoint / hf_names / hf_checkpoint -> train
  launch starts `python -m executor.train` under torchrun; config reads and checks the plan
  (and an --init-hf checkpoint against it); run_files is a run folder's typed files and the
  ranks' command line (shared with the service, no torch); text_data is `foldplan tokenize`;
  profile/ measures a machine for the cost model.
"""
