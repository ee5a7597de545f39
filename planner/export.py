"""What users run: Megatron-LM arguments and launch scripts for a candidate.

Argument names are those of Megatron-LM `core_r0.16.0` (`megatron/training/arguments.py`; the
TransformerConfig options are its fields with dashes, e.g. `moe_flex_dispatcher_backend` ->
`--moe-flex-dispatcher-backend`). Every parallel size is written, also when it is 1; the
overlap flags are the ones the cost model assumes (gradient reduce-scatter and parameter
all-gather overlapped, no TP-comm overlap), so what runs is what was estimated.
"""

from __future__ import annotations

import shlex

from cost_model.specs import Mapping, ModelSpec, TrainingSpec

MEGATRON_RELEASE = "core_r0.16.0"
# fp8 formats by recipe: e4m3 everywhere for the block-scaled recipes (DeepSeek-V3 trained
# blockwise in e4m3; MXFP8 is e4m3 data), hybrid (e4m3 forward, e5m2 gradients) otherwise.
_FP8_FORMAT = {"delayed": "hybrid", "tensorwise": "hybrid", "blockwise": "e4m3", "mxfp8": "e4m3"}


def _layer_freq_arg(model: ModelSpec) -> str:
    freq = model.moe_layer_freq
    if isinstance(freq, int):
        return str(freq)
    # Megatron parses a Python list expression, e.g. "([0]*3+[1]*58)".
    runs: list[tuple[int, int]] = []
    for v in freq:
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return "(" + "+".join(f"[{v}]*{n}" for v, n in runs) + ")"


def _pipeline_args(model: ModelSpec, m: Mapping) -> list[str]:
    a: list[str] = []
    if m.pipeline_layout is not None:
        # Megatron-LM derives the virtual stages from the layout's stage count; the layout
        # excludes every other split argument.
        return ["--pipeline-model-parallel-layout", m.pipeline_layout]
    split_flags = m.account_for_embedding_in_pipeline_split or m.account_for_loss_in_pipeline_split
    uneven = (m.decoder_first_pipeline_num_layers is not None
              or m.decoder_last_pipeline_num_layers is not None)
    if m.vpp > 1:
        if split_flags or uneven:  # layers per virtual stage differ between stages
            a += ["--num-virtual-stages-per-pipeline-rank", str(m.vpp)]
        else:
            a += ["--num-layers-per-virtual-pipeline-stage",
                  str(model.num_layers // (m.pp * m.vpp))]
    if m.decoder_first_pipeline_num_layers is not None:
        a += ["--decoder-first-pipeline-num-layers", str(m.decoder_first_pipeline_num_layers)]
    if m.decoder_last_pipeline_num_layers is not None:
        a += ["--decoder-last-pipeline-num-layers", str(m.decoder_last_pipeline_num_layers)]
    if m.account_for_embedding_in_pipeline_split:
        a += ["--account-for-embedding-in-pipeline-split"]
    if m.account_for_loss_in_pipeline_split:
        a += ["--account-for-loss-in-pipeline-split"]
    return a


def _recompute_args(m: Mapping) -> list[str]:
    if m.partial_recompute:
        return ["--recompute-granularity", "full", "--recompute-method", "block",
                "--recompute-num-layers", str(m.recompute_num_layers)]
    if m.recompute == "full":
        return ["--recompute-granularity", "full", "--recompute-method", "uniform",
                "--recompute-num-layers", "1"]
    if m.recompute == "selective":
        return ["--recompute-granularity", "selective", "--recompute-modules",
                *m.recompute_modules]
    return []


def _offload_args(m: Mapping) -> list[str]:
    """TransformerConfig's `fine_grained_activation_offloading` and `offload_modules` as
    Megatron-LM arguments."""
    if not m.offload_modules:
        return []
    return ["--fine-grained-activation-offloading", "--offload-modules", *m.offload_modules]


def _attention_args(model: ModelSpec) -> list[str]:
    a: list[str] = []
    if model.multi_latent_attention:
        a += ["--multi-latent-attention", "--kv-lora-rank", str(model.kv_lora_rank),
              "--qk-head-dim", str(model.qk_head_dim),
              "--qk-pos-emb-head-dim", str(model.qk_pos_emb_head_dim),
              "--v-head-dim", str(model.v_head_dim)]
        if model.q_lora_rank:
            a += ["--q-lora-rank", str(model.q_lora_rank)]
    else:
        if model.num_query_groups and model.num_query_groups != model.num_attention_heads:
            a += ["--group-query-attention", "--num-query-groups", str(model.num_query_groups)]
        if model.kv_channels:
            a += ["--kv-channels", str(model.kv_channels)]
    if model.qk_layernorm:
        a += ["--qk-layernorm"]
    if model.add_qkv_bias:
        a += ["--add-qkv-bias"]
    if model.rotary_interleaved:
        a += ["--rotary-interleaved"]
    return a


def _moe_args(model: ModelSpec, training: TrainingSpec, m: Mapping) -> list[str]:
    a = [
        "--num-experts", str(model.num_experts),
        "--moe-ffn-hidden-size", str(model.expert_ffn),
        "--moe-router-topk", str(model.topk),
        "--moe-layer-freq", _layer_freq_arg(model),
        "--moe-token-dispatcher-type", m.dispatcher,
        "--moe-grouped-gemm",
        "--moe-router-load-balancing-type", "aux_loss",
        "--moe-router-score-function", model.moe_router_score_function,
    ]
    if m.dispatcher == "flex":  # DeepEP / HybridEP take fp32 routing probabilities
        a += ["--moe-flex-dispatcher-backend", m.flex_backend, "--moe-router-dtype", "fp32"]
    if model.topk == 1 and model.moe_router_score_function == "softmax":
        a += ["--moe-router-pre-softmax"]  # Megatron refuses softmax after a top-1 choice
    if model.moe_router_enable_expert_bias:
        a += ["--moe-router-enable-expert-bias"]
    if model.moe_router_topk_scaling_factor is not None:
        a += ["--moe-router-topk-scaling-factor", str(model.moe_router_topk_scaling_factor)]
    if model.moe_router_num_groups is not None:
        a += ["--moe-router-num-groups", str(model.moe_router_num_groups),
              "--moe-router-group-topk", str(model.moe_router_group_topk)]
    if model.shared_ffn:
        a += ["--moe-shared-expert-intermediate-size", str(model.shared_ffn)]
        if model.moe_shared_expert_gate:
            a += ["--moe-shared-expert-gate"]
    if m.moe_a2a_overlap:  # the overlap as Megatron's MoE guide runs it, wgrad delayed
        a += ["--overlap-moe-expert-parallel-comm", "--delay-wgrad-compute"]
    if training.moe_expert_capacity_factor is not None:
        a += ["--moe-expert-capacity-factor", str(training.moe_expert_capacity_factor),
              "--moe-token-drop-policy", "probs"]
    return a


def megatron_args(model: ModelSpec, training: TrainingSpec, m: Mapping) -> list[str]:
    """Megatron-LM command-line arguments for model x training x mapping."""
    a: list[str] = [
        "--tensor-model-parallel-size", str(m.tp),
        "--pipeline-model-parallel-size", str(m.pp),
        "--context-parallel-size", str(m.cp),
        "--expert-model-parallel-size", str(m.ep),
        "--expert-tensor-parallel-size", str(m.etp),
    ]
    a += _pipeline_args(model, m)
    if m.order == "tp-cp-ep-pp-dp":
        a += ["--use-tp-pp-dp-mapping"]
    if m.sp:
        a += ["--sequence-parallel"]
    if m.distributed_optimizer:
        a += ["--use-distributed-optimizer", "--overlap-param-gather"]
    a += ["--overlap-grad-reduce", "--accumulate-allreduce-grads-in-fp32"]
    a += _recompute_args(m)
    a += _offload_args(m)
    a += [
        "--micro-batch-size", str(m.micro_batch_size),
        "--global-batch-size", str(training.global_batch_size),
        "--seq-length", str(training.seq_length),
        "--max-position-embeddings", str(training.seq_length),
        "--num-layers", str(model.num_layers),
        "--hidden-size", str(model.hidden_size),
        "--ffn-hidden-size", str(model.ffn_hidden_size),
        "--num-attention-heads", str(model.num_attention_heads),
        "--vocab-size", str(model.vocab_size),
        "--position-embedding-type", "rope",
        "--normalization", "RMSNorm",
        "--disable-bias-linear",
        "--transformer-impl", "transformer_engine",
    ]
    a += _attention_args(model)
    if model.swiglu:
        a += ["--swiglu"]
    if model.untie_embeddings_and_output_weights:
        a += ["--untie-embeddings-and-output-weights"]
    if model.mtp_num_layers is not None:
        a += ["--mtp-num-layers", str(model.mtp_num_layers)]
    if model.is_moe:
        a += _moe_args(model, training, m)
    if training.precision == "bf16":
        a += ["--bf16"]
    elif training.precision == "fp8":
        a += ["--bf16", "--fp8-format", _FP8_FORMAT[training.fp8_recipe],
              "--fp8-recipe", training.fp8_recipe]
    return a


def arg_lines(args: list[str]) -> list[str]:
    """The arguments as shell words, one flag with its values per line (for launch scripts and
    the plan page). Example: ["--tp", "2", "--bf16"] -> ["--tp 2", "--bf16"]."""
    lines: list[str] = []
    for token in args:
        for word in token.split(" ") if token.startswith("--") else [token]:
            quoted = shlex.quote(word)
            if word.startswith("--") or not lines:
                lines.append(quoted)
            else:
                lines[-1] += " " + quoted
    return lines


# Where the data, the tokenizer and the checkpoints come from: environment placeholders shared
# by both scripts. Unset, the job trains on mock data with a null tokenizer and saves nothing.
_IO_BLOCK = """# Data, tokenizer, checkpoints: set these, or leave them unset to train on mock data.
#   DATA_PATH=/data/my-corpus_text_document   (a Megatron indexed dataset prefix)
#   TOKENIZER_MODEL=/models/tokenizer          (a Hugging Face tokenizer folder or name)
#   CHECKPOINT_DIR=/checkpoints/run1           (saved every SAVE_INTERVAL steps, resumed from)
DATA_ARGS=(--mock-data)
if [[ -n "${DATA_PATH:-}" ]]; then DATA_ARGS=(--data-path "$DATA_PATH" --split 99,1,0); fi
TOKENIZER_ARGS=(--tokenizer-type NullTokenizer)
if [[ -n "${TOKENIZER_MODEL:-}" ]]; then
    TOKENIZER_ARGS=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
fi
CHECKPOINT_ARGS=()
if [[ -n "${CHECKPOINT_DIR:-}" ]]; then
    CHECKPOINT_ARGS=(--save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR"
                     --save-interval "${SAVE_INTERVAL:-1000}")
fi"""

_TAIL = """    "${DATA_ARGS[@]}" "${TOKENIZER_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" \\
    --train-iters "${TRAIN_ITERS:-100}" --lr 1e-4 --log-interval 1 \\
    "$@"
"""


def torchrun_script(args: list[str], num_nodes: int, gpus_per_node: int) -> str:
    """A per-node launch script (run the same script on every node with NODE_RANK set); extra
    Megatron-LM arguments given to the script are passed on (`"$@"`)."""
    quoted = " \\\n    ".join(arg_lines(args))
    return f"""#!/usr/bin/env bash
# Generated by foldplan for Megatron-LM {MEGATRON_RELEASE}.
# Run on every node: NODE_RANK=<0..{num_nodes - 1}> MASTER_ADDR=<node 0 host> bash launch.sh [ARGS]
set -euo pipefail
: "${{MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout}}"
: "${{MASTER_ADDR:?set MASTER_ADDR}}"
: "${{NODE_RANK:?set NODE_RANK}}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
{_IO_BLOCK}
torchrun --nnodes {num_nodes} --nproc-per-node {gpus_per_node} --node-rank "$NODE_RANK" \\
    --master-addr "$MASTER_ADDR" --master-port "${{MASTER_PORT:-29500}}" \\
    "$MEGATRON_LM/pretrain_gpt.py" \\
    {quoted} \\
{_TAIL}"""


def sbatch_script(args: list[str], num_nodes: int, gpus_per_node: int) -> str:
    """A Slurm batch script that starts one torchrun per node with srun; extra Megatron-LM
    arguments given to `sbatch job.sbatch ARGS` are passed on (`"$@"`)."""
    quoted = " \\\n    ".join(arg_lines(args))
    return f"""#!/usr/bin/env bash
#SBATCH --job-name=foldplan
#SBATCH --nodes={num_nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --exclusive
# Generated by foldplan for Megatron-LM {MEGATRON_RELEASE}. Submit: sbatch job.sbatch [ARGS]
set -euo pipefail
: "${{MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout}}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
{_IO_BLOCK}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes {num_nodes} --nproc-per-node {gpus_per_node} \\
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:29500" --rdzv-id "$SLURM_JOB_ID" \\
    "$MEGATRON_LM/pretrain_gpt.py" \\
    {quoted} \\
{_TAIL}"""
