"""The routers' expert bias (DeepSeek-V3's aux-loss-free balancing, a buffer updated after each
step) travels through checkpoints and resharding like the parameters.

A tiny DeepSeek-V3 model (_hf_models.py: sigmoid group-limited routing with the expert bias,
MLA, shared experts, a dense first layer) trained K = 2 steps, checkpointed, resumed on another
mapping: the bias after the resume equals the bias at the checkpoint, and the losses after the
switch equal the uninterrupted run's (relative 2e-6, the tolerance of the resharded resume in
test_exec_launch.py).
- one rank, no torch.distributed: the portable state (reshard.py) into a trainer of another
  optimizer layout that starts from a random init, bias zero; a fast update rate makes the
  bias change the routing within two steps, so a lost bias changes the losses too;
- `run_plan` (torchrun, 2 CPU ranks): ep 2 x dp 2 checkpointed at step 2, resumed with
  `--resume` on pp 2 (the MoE layers all on stage 1, dp 1 x micro-batch 2 for the same
  micro-batches), and the same checkpoint loaded by `checkpoint.load` on one rank.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from _hf_models import save_model

from cost_model.specs import Mapping, TrainingSpec
from executor import checkpoint
from executor.data import bundled_corpus_tokens
from executor.hf_checkpoint import HFCheckpoint, check_checkpoint
from executor.launch import run_plan
from executor.parallel_dims import ParallelDims
from executor.reshard import full_tensors, load_portable, portable_state
from executor.router import RouterConfig
from executor.run_files import checkpoint_dir
from executor.trainer import Trainer

TRAINING = TrainingSpec(seq_length=32, global_batch_size=4, precision="fp32")
SEED, K, STEPS = 3, 2, 4
REL = 2e-6  # test_exec_launch.py's resharded resume


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deepseek_v3")
    save_model("deepseek_v3", path)
    return path


def biases(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every router's expert bias on this rank, by the single-rank model's name."""
    return {n: b.detach().clone() for n, b in trainer.named_buffers() if n.endswith("expert_bias_E")}


def one_rank_trainer(path: Path, distributed_optimizer: bool, init_hf: bool, update_rate: float) -> Trainer:
    ckpt = HFCheckpoint(path)
    spec, arch = check_checkpoint(ckpt, ckpt.model_spec())
    router = dataclasses.replace(RouterConfig.for_model(spec, TRAINING, arch), expert_bias_update_rate=update_rate)
    dims = ParallelDims.single(Mapping(distributed_optimizer=distributed_optimizer))
    return Trainer(spec, TRAINING, dims, bundled_corpus_tokens(), seed=SEED, router_config=router,
                   arch=arch, init_hf=ckpt if init_hf else None)


def test_portable_state_carries_the_expert_bias(tmp_path, deepseek):
    old = one_rank_trainer(deepseek, distributed_optimizer=True, init_hf=True, update_rate=0.05)
    initial = biases(old)
    assert len(initial) == 2  # layers 1 and 2 are MoE layers
    losses = [old.step(s).loss for s in range(K)]
    torch.save({"portable": portable_state(old)}, tmp_path / "rank0.pt")
    at_checkpoint = biases(old)
    losses += [old.step(s).loss for s in range(K, STEPS)]  # the uninterrupted run
    assert all(not torch.equal(at_checkpoint[n], initial[n]) for n in initial)

    new = one_rank_trainer(deepseek, distributed_optimizer=False, init_hf=False, update_rate=0.05)
    assert all(not b.any() for b in biases(new).values())  # a fresh model starts at zero
    load_portable(new, *full_tensors([tmp_path / "rank0.pt"]))
    resumed = biases(new)
    assert resumed.keys() == at_checkpoint.keys()
    assert all(torch.equal(resumed[n], at_checkpoint[n]) for n in resumed)
    after = [new.step(s).loss for s in range(K, STEPS)]
    for a, b in zip(after, losses[K:]):
        assert abs(a - b) <= REL * abs(b), (after, losses)


def test_checkpoint_without_buffers_is_refused(tmp_path, deepseek):
    """A portable state that lacks the bias (written before buffers were saved) is refused,
    naming the buffer, instead of silently restarting the balancing from zero."""
    old = one_rank_trainer(deepseek, distributed_optimizer=True, init_hf=True, update_rate=0.05)
    state = portable_state(old)
    del state["buffers"]
    torch.save({"portable": state}, tmp_path / "rank0.pt")
    new = one_rank_trainer(deepseek, distributed_optimizer=False, init_hf=False, update_rate=0.05)
    with pytest.raises(ValueError, match=r"no buffer 'layers\.1\.ffn\.router\.expert_bias_E'"):
        load_portable(new, *full_tensors([tmp_path / "rank0.pt"]))


def make_plan(path: Path, **mapping) -> dict:
    full = {"tp": 1, "cp": 1, "pp": 1, "vpp": 1, "ep": 1, "etp": 1, "micro_batch_size": 1,
            "dispatcher": "alltoall", **mapping}
    return {"model": HFCheckpoint(path).model_spec().model_dump(),
            "cluster": {"num_nodes": 1, "gpus_per_node": 2, "gpu": "cpu"},
            "training": TRAINING.model_dump(), "candidates": [{"mapping": full}]}


def saved_biases(out: Path, step: int) -> dict[str, torch.Tensor]:
    """The expert biases of a checkpoint's native model states (every rank's, merged)."""
    out_biases: dict[str, torch.Tensor] = {}
    for f in sorted(checkpoint_dir(out, step).glob("rank*.pt")):
        model = torch.load(f, map_location="cpu", weights_only=True)["model"]
        for name, value in model.items():
            if name.endswith("expert_bias_E"):
                assert name not in out_biases or torch.equal(out_biases[name], value), name
                out_biases[name] = value
    return out_biases


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_on_another_mapping_keeps_the_expert_bias(tmp_path, deepseek):
    ref_dir = tmp_path / "ep2"
    ref = run_plan(make_plan(deepseek, dp=2, ep=2), 0, STEPS, ref_dir, seed=SEED, echo=False,
                   init_hf=str(deepseek), save_every=K)
    at_k, at_end = saved_biases(ref_dir, K), saved_biases(ref_dir, STEPS)
    assert sorted(at_k) == ["layers.1.ffn.router.expert_bias_E", "layers.2.ffn.router.expert_bias_E"]
    assert all(not torch.equal(at_k[n], at_end[n]) for n in at_k)  # the bias moves every step

    # pp 2 resumed from step K: the stage holding the MoE layers gets their biases
    pp_dir = tmp_path / "pp2"
    (pp_dir / "checkpoints").mkdir(parents=True)
    checkpoint_dir(pp_dir, K).symlink_to(checkpoint_dir(ref_dir, K))
    pp_plan = make_plan(deepseek, pp=2, micro_batch_size=2, decoder_first_pipeline_num_layers=1)
    resumed = run_plan(pp_plan, 0, STEPS, pp_dir, seed=SEED, echo=False, init_hf=str(deepseek),
                       save_every=K, resume=True)
    assert "resharded" in (pp_dir / "train.log").read_text()
    assert resumed["steps"] == [K + 1, STEPS] and resumed["comm_bytes"]["pp.send"] > 0
    for a, b in zip(resumed["loss"], ref["loss"][K:]):
        assert abs(a - b) <= REL * abs(b), (resumed["loss"], ref["loss"])
    after = saved_biases(pp_dir, STEPS)  # two updates after the switch, as in the reference
    assert after.keys() == at_end.keys() and all(torch.equal(after[n], at_end[n]) for n in after)

    # the step-K checkpoint on one rank: the bias right after the load is the checkpoint's
    one = one_rank_trainer(deepseek, distributed_optimizer=True, init_hf=True, update_rate=1e-3)
    meta = {"world_size": 1, "mapping": one.dims.mapping.model_dump(mode="json"), "seed": SEED}
    assert checkpoint.load(ref_dir, K, 0, one, meta)  # resharded
    loaded = biases(one)
    assert loaded.keys() == at_k.keys() and all(torch.equal(loaded[n], at_k[n]) for n in loaded)
