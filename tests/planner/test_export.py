"""Megatron-LM arguments for the round-2 options (planner/export.py): each option of a mapping,
model and training setup appears with Megatron's argument name and value."""

from __future__ import annotations

from cost_model.presets import preset_model
from cost_model.specs import Mapping, TrainingSpec
from planner.export import megatron_args

QWEN3 = preset_model("qwen3-235b-a22b")
V3 = preset_model("deepseek-v3")
QWEN2 = preset_model("qwen2-57b-a14b")
BF16 = TrainingSpec(seq_length=4096, global_batch_size=2048)


def _value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, flag
    return args[args.index(flag) + 1]


def _values(args: list[str], flag: str) -> list[str]:
    """The arguments after `flag` up to the next flag (nargs='*' options)."""
    i = args.index(flag) + 1
    out = []
    while i < len(args) and not args[i].startswith("--"):
        out.append(args[i])
        i += 1
    return out


def test_public_qwen3_run_arguments():
    """The public Qwen3-235B run: flex/DeepEP, selective layernorm + moe_act recompute,
    embedding and loss in the pipeline split, pp 8 x vpp 4 (96 slots, not 94 / 32 layers)."""
    m = Mapping(tp=2, pp=8, vpp=4, ep=32, dispatcher="flex", recompute="selective",
                recompute_modules=("layernorm", "moe_act"),
                account_for_embedding_in_pipeline_split=True,
                account_for_loss_in_pipeline_split=True)
    args = megatron_args(QWEN3, BF16, m)
    assert _value(args, "--moe-token-dispatcher-type") == "flex"
    assert _value(args, "--moe-flex-dispatcher-backend") == "deepep"
    assert _value(args, "--moe-router-dtype") == "fp32"
    assert _value(args, "--recompute-granularity") == "selective"
    assert _values(args, "--recompute-modules") == ["layernorm", "moe_act"]
    assert "--account-for-embedding-in-pipeline-split" in args
    assert "--account-for-loss-in-pipeline-split" in args
    assert _value(args, "--num-virtual-stages-per-pipeline-rank") == "4"
    assert "--num-layers-per-virtual-pipeline-stage" not in args
    assert "--qk-layernorm" in args and "--add-qkv-bias" not in args
    assert "--overlap-moe-expert-parallel-comm" not in args


def test_deepseek_v3_routing_mtp_overlap_and_fp8_recipe():
    m = Mapping(tp=1, pp=8, vpp=2, ep=64, dispatcher="flex", flex_backend="hybridep",
                moe_a2a_overlap=True)
    fp8 = BF16.model_copy(update={"precision": "fp8", "fp8_recipe": "blockwise"})
    args = megatron_args(V3, fp8, m)
    assert _value(args, "--moe-router-score-function") == "sigmoid"
    assert "--moe-router-enable-expert-bias" in args
    assert _value(args, "--moe-router-topk-scaling-factor") == "2.5"
    assert _value(args, "--moe-router-num-groups") == "8"
    assert _value(args, "--moe-router-group-topk") == "4"
    assert _value(args, "--mtp-num-layers") == "1"
    assert _value(args, "--moe-flex-dispatcher-backend") == "hybridep"
    assert "--overlap-moe-expert-parallel-comm" in args and "--delay-wgrad-compute" in args
    assert _value(args, "--fp8-recipe") == "blockwise" and _value(args, "--fp8-format") == "e4m3"
    assert "--bf16" in args
    assert "--rotary-interleaved" not in args  # MLA rotates interleaved pairs itself


def test_exact_architecture_flags_and_defaults():
    args = megatron_args(QWEN2, BF16, Mapping(tp=2, ep=4))
    assert "--add-qkv-bias" in args and "--disable-bias-linear" in args
    assert "--moe-shared-expert-gate" in args
    assert _value(args, "--moe-shared-expert-intermediate-size") == "20480"
    assert _value(args, "--moe-router-score-function") == "softmax"
    for flag in ("--moe-flex-dispatcher-backend", "--mtp-num-layers", "--moe-router-num-groups",
                 "--moe-router-enable-expert-bias", "--moe-router-topk-scaling-factor",
                 "--qk-layernorm", "--fp8-recipe", "--recompute-modules",
                 "--account-for-embedding-in-pipeline-split", "--rotary-interleaved"):
        assert flag not in args, flag
    interleaved = QWEN2.model_copy(update={"rotary_interleaved": True})
    assert "--rotary-interleaved" in megatron_args(interleaved, BF16, Mapping(tp=2, ep=4))
    fp8 = megatron_args(QWEN2, BF16.model_copy(update={"precision": "fp8"}), Mapping(tp=2, ep=4))
    assert _value(fp8, "--fp8-format") == "hybrid" and _value(fp8, "--fp8-recipe") == "delayed"


def test_selective_recompute_writes_the_mapping_modules_and_pre_softmax_for_top1():
    args = megatron_args(QWEN2, BF16, Mapping(tp=2, ep=4, recompute="selective"))
    assert _values(args, "--recompute-modules") == ["core_attn"]
    args = megatron_args(QWEN2, BF16, Mapping(tp=2, ep=4, pp=4, vpp=7))
    assert _value(args, "--num-layers-per-virtual-pipeline-stage") == "1"
    top1 = QWEN2.model_copy(update={"moe_router_topk": 1})
    assert "--moe-router-pre-softmax" in megatron_args(top1, BF16, Mapping(tp=2, ep=4))
    assert "--moe-router-pre-softmax" not in megatron_args(QWEN2, BF16, Mapping(tp=2, ep=4))


def test_cpu_plans_only_propose_what_the_executor_runs():
    """The cpu preset plans for foldplan's executor: no flex dispatcher, overlap or recompute
    modules beyond the default; pinning one of them is refused naming it."""
    import pytest

    from cost_model.presets import preset_model
    from cost_model.runtimes import runtime_supports
    from cost_model.specs import ClusterSpec, TrainingSpec
    from planner.search import plan

    model = preset_model("tiny-moe")
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=4, gpu="cpu")
    training = TrainingSpec(seq_length=64, global_batch_size=8, precision="fp32")
    result = plan(model, cluster, training, top_k=5)
    assert result.candidates
    for c in result.candidates:
        for field in ("dispatcher", "moe_a2a_overlap", "recompute_modules", "flex_backend"):
            assert runtime_supports("foldplan", field, getattr(c.mapping, field)), c.mapping
    with pytest.raises(ValueError, match="fixed.dispatcher='flex'"):
        plan(model, cluster, training, fixed={"dispatcher": "flex"})
