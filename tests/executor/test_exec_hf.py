"""Hugging Face checkpoints on one rank (no torch.distributed): the executor's loss equals
transformers' causal-LM loss, the conversion round trip is bit-identical and loads back into
transformers, bad checkpoints are refused naming the problem, and the cost model's MLA
FLOPs / parameters agree with the executor's MLA layer. Multi-rank runs: test_exec_hf_multirank.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from _hf_models import hf_loss, save_model

from cost_model.flops import megatron_flops_per_sequence
from cost_model.params import layer_params
from cost_model.specs import Mapping, ModelSpec, TrainingSpec
from executor.config import UnsupportedPlan, load_run
from executor.hf_checkpoint import (
    INDEX_FILE,
    CheckpointError,
    HFCheckpoint,
    check_checkpoint,
    load_into,
    model_tensors,
    to_hf_tensors,
    write_checkpoint,
)
from executor.model import MoETransformer
from executor.parallel_dims import ParallelDims
from executor.router import RouterConfig

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
TRAINING = TrainingSpec(seq_length=16, global_batch_size=2, precision="fp32")


def executor_model(ckpt: HFCheckpoint) -> MoETransformer:
    spec, arch = check_checkpoint(ckpt, ckpt.model_spec())
    model = MoETransformer(spec, ParallelDims.single(), arch=arch,
                           router_config=RouterConfig.for_model(spec, TRAINING, arch))
    load_into(ckpt, [model], spec)
    return model


def executor_loss(model: MoETransformer, windows: torch.Tensor) -> float:
    with torch.no_grad():
        ce, _, _ = model(windows[:, :-1], windows[:, 1:])
    return float(ce) / windows[:, 1:].numel()


WINDOWS = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch,overrides", [(a, {}) for a in ARCHS + ["deepseek_v2", "llama", "qwen3"]] + [
    ("deepseek_v3", {"rope_interleave": False}),
    ("deepseek_v3", {"norm_topk_prob": False, "n_group": 1, "topk_group": 1}),  # no groups, raw weights
    ("qwen3_moe", {"head_dim": 16}),  # head_dim != hidden_size / heads
    ("qwen2_moe", {"norm_topk_prob": True}),
    ("mixtral", {"num_experts_per_tok": 1}),  # top-1: weight 1 after renormalisation
])
def test_loss_equals_transformers(tmp_path, arch, overrides):
    hf = save_model(arch, tmp_path, **overrides)
    ours = executor_loss(executor_model(HFCheckpoint(tmp_path)), WINDOWS)
    ref = hf_loss(hf, WINDOWS)
    assert ours == pytest.approx(ref, rel=2e-5)


@pytest.mark.parametrize("arch,overrides", [(a, {}) for a in ARCHS]
                         + [("deepseek_v3", {"rope_interleave": False})])
def test_round_trip_is_bit_identical_and_loads_in_transformers(tmp_path, arch, overrides):
    from transformers import AutoModelForCausalLM

    hf = save_model(arch, tmp_path / "in", **overrides)
    ckpt = HFCheckpoint(tmp_path / "in")
    model = executor_model(ckpt)
    full = {n: t.detach() for n, t in model_tensors(model).items()}
    tensors = to_hf_tensors(model.spec, ckpt.config, model.arch, full, ckpt.dtype)
    original = {}
    for f in (tmp_path / "in").glob("*.safetensors"):
        original.update(load_file(f))
    assert tensors.keys() == original.keys()
    assert all(torch.equal(tensors[k], original[k]) for k in original)
    write_checkpoint(tmp_path / "out", ckpt.config, tensors, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf_loss(back, WINDOWS) == hf_loss(hf, WINDOWS)


def _plan(spec: ModelSpec) -> dict:
    mapping = dict(tp=1, cp=1, pp=1, ep=1, etp=1, dp=1, edp=1)
    return {"model": spec.model_dump(), "cluster": {"num_nodes": 1, "gpus_per_node": 1, "gpu": "cpu"},
            "training": TRAINING.model_dump(), "candidates": [{"mapping": mapping}]}


def test_plan_must_be_made_from_the_checkpoint_config(tmp_path):
    save_model("mixtral", tmp_path)
    spec = HFCheckpoint(tmp_path).model_spec()
    assert load_run(_plan(spec), 0, init_hf=str(tmp_path)).model == spec
    other = spec.model_copy(update=dict(num_layers=3, moe_router_topk=1))
    with pytest.raises(UnsupportedPlan, match="moe_router_topk: plan 1, checkpoint 2.*num_layers"):
        load_run(_plan(other), 0, init_hf=str(tmp_path))


def test_deepseek_without_mtp_tensors_runs_without_mtp(tmp_path):
    save_model("deepseek_v3", tmp_path)  # num_nextn_predict_layers=1, no layer-3 tensors
    ckpt = HFCheckpoint(tmp_path)
    assert ckpt.config["num_nextn_predict_layers"] == 1 and not ckpt.has_mtp()
    assert ckpt.model_spec().mtp_num_layers is None


def test_shapes_not_matching_the_config_are_refused(tmp_path):
    save_model("qwen3_moe", tmp_path)
    f = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(f)
    tensors["model.layers.1.mlp.experts.2.up_proj.weight"] = torch.zeros(20, 32)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts.2.up_proj.weight' has shape \[20, 32\], "
                                              r"the config implies \[24, 32\]"):
        check_checkpoint(HFCheckpoint(tmp_path), HFCheckpoint(tmp_path).model_spec())


def test_missing_shard_and_missing_tensor_are_refused(tmp_path):
    save_model("mixtral", tmp_path)
    ckpt = HFCheckpoint(tmp_path)
    tensors = load_file(next(tmp_path.glob("*.safetensors")))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    (tmp_path / "model.safetensors").unlink()
    write_checkpoint(tmp_path, ckpt.config, tensors, max_shard_bytes=50_000)
    with pytest.raises(CheckpointError, match="experts.3.w2.weight' is missing"):
        check_checkpoint(HFCheckpoint(tmp_path), ckpt.model_spec())
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"shard\(s\) model-00002-of-\d+.safetensors .* missing"):
        HFCheckpoint(tmp_path)


def test_unknown_architecture_and_unsupported_rope_scaling_are_refused(tmp_path):
    save_model("mixtral", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type='gpt2' is not supported"):
        HFCheckpoint(tmp_path).model_spec()
    linear = cfg | {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}}
    (tmp_path / "config.json").write_text(json.dumps(linear))
    with pytest.raises(CheckpointError, match="rope_type=.linear."):
        HFCheckpoint(tmp_path).arch()


def test_expert_bias_moves_toward_underloaded_experts():
    cfg = RouterConfig(score_function="sigmoid", expert_bias=True, expert_bias_update_rate=0.01)
    from executor.router import Router

    router = Router(8, 4, 1, cfg)
    with torch.no_grad():
        router.weight_ED.zero_()
        router.weight_ED[0, 0] = 10.0  # every token with x[0] > 0 goes to expert 0
    x = torch.zeros(6, 8)
    x[:, 0] = 1.0
    router(x, ParallelDims.single(), None)
    router.update_expert_bias()
    assert router.expert_bias_E.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])


MLA_SPEC = ModelSpec(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=256,
                     multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=8,
                     qk_pos_emb_head_dim=4, v_head_dim=8)


def test_cost_model_mla_flops_and_params_agree_with_the_executor_layer():
    """Megatron's FLOPs formula (cost_model.flops) and the cost model's layer parameters
    (cost_model.params) against the executor's MLA model, counted by torch's FLOP counter.
    Matmul FLOPs and weight matrices agree exactly; the two differences are the latent
    RMSNorms: Megatron's formula counts one FLOP per latent element and token (its "+1"
    terms, x6 for forward and backward), which the counter does not see, and the cost model's
    parameter count leaves out their q_lora_rank + kv_lora_rank weights."""
    from torch.utils.flop_counter import FlopCounterMode

    model = MoETransformer(MLA_SPEC, ParallelDims.single())
    s, L = 32, MLA_SPEC.num_layers
    tokens = torch.randint(0, 256, (1, s), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(tokens, tokens)
    ours = 3 * counter.get_total_flops()  # backward = 2x forward for every matmul
    latent_norms = MLA_SPEC.q_lora_rank + MLA_SPEC.kv_lora_rank
    assert megatron_flops_per_sequence(MLA_SPEC, s, causal_half=False) == ours + 6 * L * s * latent_norms
    layer = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.0."))
    assert layer_params(MLA_SPEC, False, Mapping())[0] == layer - latent_norms


def test_cli_refuses_a_mismatched_checkpoint_before_any_rank_starts(tmp_path, capsys):
    from api.cli import main

    save_model("mixtral", tmp_path / "ckpt")
    spec = HFCheckpoint(tmp_path / "ckpt").model_spec().model_copy(update=dict(num_layers=3))
    plan = _plan(spec)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    argv = ["run", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out"),
            "--init-hf", str(tmp_path / "ckpt")]
    assert main(argv + ["--steps", "1"]) == 2
    assert "num_layers: plan 3, checkpoint 2" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train.log").exists()  # no rank was started
    assert main(argv + ["--steps", "0"]) == 2
    assert "--steps 0 converts a checkpoint: it needs --init-hf and --export-hf" in capsys.readouterr().err


@pytest.mark.parametrize("arch,rope", [
    ("deepseek_v3", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 8,
                     "beta_fast": 32, "beta_slow": 1}),  # DeepSeek-V3's shape of YaRN
    ("qwen3_moe", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                   "original_max_position_embeddings": 8}),
])
def test_yarn_rope_equals_transformers(tmp_path, arch, rope):
    """Windows of 17 tokens, longer than original_max_position_embeddings=8, so the scaled
    frequencies, the cos/sin attention factor and DeepSeek's softmax mscale all matter."""
    hf = save_model(arch, tmp_path, rope_parameters=rope, max_position_embeddings=64)
    ours = executor_loss(executor_model(HFCheckpoint(tmp_path)), WINDOWS)
    assert ours == pytest.approx(hf_loss(hf, WINDOWS), rel=2e-5)


def _fake_dims(tp_rank: int, ep_rank: int):
    """Rank (tp_rank, ep_rank) of a tp 2 x ep 2 mapping, groups without process groups: enough
    to build the model and load it (no collective runs)."""
    from types import MappingProxyType

    from executor.parallel_dims import ALL_KINDS, Group

    sizes = {"tp": (2, tp_rank), "ep": (2, ep_rank), "tp_ep": (4, 2 * ep_rank + tp_rank)}
    groups = {k: Group(tuple(range(sizes.get(k, (1, 0))[0])), None, sizes.get(k, (1, 0))[1])
              for k in ALL_KINDS}
    return ParallelDims(Mapping(tp=2, ep=2, dp=2), 4, 0, None, MappingProxyType(groups))


class _CountingCheckpoint(HFCheckpoint):
    """Counts the elements each read returns."""

    def read(self, key, dim=0, start=None, stop=None):
        t = super().read(key, dim, start, stop)
        self.elements = getattr(self, "elements", 0) + t.numel()
        return t


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_each_rank_reads_only_its_slices(tmp_path, arch):
    """tp 2 x ep 2 ranks built in one process: every loaded shard is exactly the rank's piece
    of the single-rank tensor, and each rank reads well under the whole checkpoint."""
    save_model(arch, tmp_path)
    whole = executor_model(HFCheckpoint(tmp_path))
    full = {n: t.detach() for n, t in model_tensors(whole).items()}
    total = sum(t.numel() for t in full.values())
    spec, arch_opts = whole.spec, whole.arch
    for tp_rank in range(2):
        for ep_rank in range(2):
            ckpt = _CountingCheckpoint(tmp_path)
            model = MoETransformer(spec, _fake_dims(tp_rank, ep_rank), arch=arch_opts,
                                   router_config=RouterConfig.for_model(spec, TRAINING, arch_opts))
            load_into(ckpt, [model], spec)
            for name, t in model_tensors(model).items():
                expected = full[name] if name.endswith("expert_bias_E") else model.shard_of_full(name, full[name])
                assert torch.equal(t.detach(), expected), name
            # tp halves the dense tensors and ep the experts (measured: 0.50 Mixtral, 0.54
            # DeepSeek-V3, whose replicated latents and router are read whole)
            assert ckpt.elements < 0.6 * total
