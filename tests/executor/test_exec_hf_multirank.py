"""`--init-hf` / `--export-hf` end to end with torchrun on CPU ranks (gloo, fp32).

- The first step's loss of a run started from a transformers checkpoint equals transformers'
  causal-LM loss on that step's global batch (relative 2e-5) under tp 2 with sequence
  parallelism, ep 2 folded with etp 1, pp 2, cp 2, and tp 2 x ep 2 on 4 ranks.
- `--steps 0 --init-hf A --export-hf B` on tp 2 x ep 2 writes B bit-identical to A.
- After K = 2 training steps on tp 2 x ep 2, the exported checkpoint loaded on one rank and
  fed the batch of step K+1 gives the loss the multi-rank run reports for step K+1.
The default suite runs DeepSeek-V3 (MLA, grouped sigmoid routing with the expert bias, shared
experts, a dense first layer) through that matrix; all four architectures x four mappings:
    FOLDPLAN_HF_FULL=1 .venv/bin/python -m pytest -q tests/executor/test_exec_hf_multirank.py
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from _hf_models import hf_loss, save_model
from test_exec_hf import executor_loss, executor_model

from cost_model.specs import TrainingSpec
from executor.data import BatchOrder, bundled_corpus_tokens
from executor.hf_checkpoint import HFCheckpoint
from executor.launch import run_plan

TRAINING = TrainingSpec(seq_length=32, global_batch_size=4, precision="fp32")
SEED = 3
MAPPINGS = {  # name -> (world size, mapping)
    "tp2_sp": (2, dict(tp=2, sequence_parallel=True)),
    "ep2_etp1": (2, dict(dp=2, ep=2, etp=1)),
    "pp2": (2, dict(pp=2, decoder_first_pipeline_num_layers=1)),  # 2 or 3 layers
    "cp2": (2, dict(cp=2)),
    "tp2_ep2": (4, dict(tp=2, dp=2, ep=2, etp=1)),
}
FULL = os.environ.get("FOLDPLAN_HF_FULL") == "1"
ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"] if FULL else ["deepseek_v3"]
MATRIX = [(a, m) for a in ARCHS for m in MAPPINGS if m != "tp2_ep2"]  # tp2_ep2: see below


def make_plan(ckpt: HFCheckpoint, name: str) -> dict:
    world, mapping = MAPPINGS[name]
    full = dict(tp=1, cp=1, pp=1, vpp=1, ep=1, etp=1, micro_batch_size=1, dispatcher="alltoall")
    full.update(mapping)
    return {"model": ckpt.model_spec().model_dump(),
            "cluster": {"num_nodes": 1, "gpus_per_node": world, "gpu": "cpu"},
            "training": TRAINING.model_dump(), "candidates": [{"mapping": full}]}


def step_windows(step: int) -> torch.Tensor:
    """The global batch of `step` (0-based) as windows of S+1 tokens (executor/data.py order)."""
    order = BatchOrder(bundled_corpus_tokens(), TRAINING.seq_length, TRAINING.global_batch_size, SEED)
    inputs, targets = order.micro_batch(step, 0, TRAINING.global_batch_size, 1, 0)
    return torch.cat([inputs, targets[:, -1:]], dim=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {a: (root / a, save_model(a, root / a)) for a in ARCHS}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("arch,mapping", MATRIX)
def test_first_step_loss_equals_transformers(tmp_path, checkpoints, arch, mapping):
    path, hf = checkpoints[arch]
    metrics = run_plan(make_plan(HFCheckpoint(path), mapping), 0, 1, tmp_path, seed=SEED,
                       echo=False, init_hf=str(path))
    assert metrics["loss"][0] == pytest.approx(hf_loss(hf, step_windows(0)), rel=2e-5)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_ep2_conversion_training_and_export(tmp_path, checkpoints, arch):
    path, hf = checkpoints[arch]
    ckpt = HFCheckpoint(path)
    plan = make_plan(ckpt, "tp2_ep2")
    # pure conversion: bit-identical tensors
    run_plan(plan, 0, 0, tmp_path / "convert", seed=SEED, echo=False, init_hf=str(path),
             export_hf=str(tmp_path / "converted"))
    original, converted = load_file(next(path.glob("*.safetensors"))), {}
    for f in (tmp_path / "converted").glob("*.safetensors"):
        converted.update(load_file(f))
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)
    # K + 1 = 3 steps from the checkpoint; the first step's loss is transformers'
    K = 2
    long = run_plan(plan, 0, K + 1, tmp_path / "long", seed=SEED, echo=False, init_hf=str(path))
    assert long["loss"][0] == pytest.approx(hf_loss(hf, step_windows(0)), rel=2e-5)
    # K steps, exported, loaded on one rank: the loss of step K+1's batch is the run's
    run_plan(plan, 0, K, tmp_path / "short", seed=SEED, echo=False, init_hf=str(path),
             export_hf=str(tmp_path / "trained"))
    model = executor_model(HFCheckpoint(tmp_path / "trained"))
    assert executor_loss(model, step_windows(K)) == pytest.approx(long["loss"][K], rel=2e-5)
    assert long["loss"][K] != pytest.approx(long["loss"][0], rel=1e-3)  # it did train
