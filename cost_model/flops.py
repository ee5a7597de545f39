"""Model FLOPs per step by Megatron-LM's formula, used for MFU.

This is `num_floating_point_operations` of Megatron-LM `training.py` as of mid 2025 (after the
March 2025 change that counts causal attention as half): 12 = 3 (fwd, wgrad, dgrad) x 2 (two
GEMMs per block) x 2 (multiply-add), SwiGLU x1.5, MoE layers count top-k routed experts plus
shared experts, the logit layer 6*h*V per token. Multi-token prediction is not modelled.
"""

from __future__ import annotations

from .specs import ModelSpec, TrainingSpec


def padded_vocab(vocab_size: int, tp: int = 1, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of 128 * tp."""
    mult = divisible_by * tp
    return -(-vocab_size // mult) * mult


def megatron_flops_per_sequence(model: ModelSpec, seq_length: int, causal_half: bool = True) -> float:
    """FLOPs for one sequence of `seq_length` tokens, forward and backward."""
    L, h, s = model.num_layers, model.hidden_size, seq_length
    n, g = model.num_attention_heads, model.query_groups
    pattern = model.moe_layer_pattern()
    num_moe = sum(pattern)
    num_dense = L - num_moe
    gated = 1.5 if model.swiglu else 1.0
    expansion = 12
    half = 0.5 if causal_half else 1.0

    if model.multi_latent_attention:
        dq, dr, dv = model.qk_head_dim, model.qk_pos_emb_head_dim, model.v_head_dim
        if model.q_lora_rank is None:
            q_term = h * n * (dq + dr)
        else:
            q_term = model.q_lora_rank * (h + n * (dq + dr) + 1)
        attn = (
            6
            * L
            * (
                q_term
                + model.kv_lora_rank * (h + n * (dq + dv) + 1)
                + h * dr
                + n * dv * h
                + s * n * (dq + dr) * half
                + s * n * dv * half
            )
        )
    else:
        qproj_ratio = model.head_dim * n / h
        attn = expansion * L * h * h * ((1 + g / n + s / h * half) * qproj_ratio)

    mlp = (
        expansion
        * L
        * h
        * (
            model.ffn_hidden_size * gated * num_dense / L
            + model.expert_ffn * model.topk * gated * num_moe / L
            + model.shared_ffn * gated * num_moe / L
        )
    )
    logits = 6 * h * padded_vocab(model.vocab_size)
    # Multi-token prediction: per module a 2h -> h projection, one layer like the decoder's
    # last, and its own output layer (Megatron-LM's num_floating_point_operations).
    mtp = 0.0
    if model.mtp_num_layers:
        last_moe = pattern[-1]
        layer_attn = attn / L
        layer_mlp = expansion * h * gated * (
            (model.expert_ffn * model.topk + model.shared_ffn) if last_moe else model.ffn_hidden_size)
        mtp = model.mtp_num_layers * (6 * 2 * h * h + layer_attn + layer_mlp + logits)
    return s * (mlp + attn + logits + mtp)


def model_flops_per_step(model: ModelSpec, training: TrainingSpec) -> float:
    return training.global_batch_size * megatron_flops_per_sequence(model, training.seq_length)


def tflops_per_gpu(model_flops_per_step: float, step_time_s: float, num_gpus: int) -> float:
    """Model TFLOP/s per GPU: Megatron-LM's FLOPs of one step over its time and GPUs."""
    return model_flops_per_step / step_time_s / num_gpus / 1e12


def mfu(model_flops_per_step: float, step_time_s: float, num_gpus: int,
        peak_flops_per_gpu: float) -> float:
    """Model FLOPs utilisation: Megatron-LM's FLOPs of one step over what `num_gpus` GPUs
    at `peak_flops_per_gpu` (see `Hardware.mfu_peak_flops`) could do in `step_time_s`."""
    return model_flops_per_step / (step_time_s * num_gpus * peak_flops_per_gpu)
