"""Sliding-window attention (GPT-OSS): which layers, how the attention time shrinks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cost_model.estimate import estimate
from cost_model.presets import preset_model
from cost_model.runtimes import executor_errors
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from cost_model.validate import resolve_mapping

GPT_OSS = preset_model("gpt-oss-120b")
CLUSTER = ClusterSpec(num_nodes=8, gpus_per_node=8)
TRAIN = TrainingSpec(seq_length=4096, global_batch_size=64)
M = Mapping(tp=2, pp=4, ep=16, etp=1)


def test_windowed_layers_follow_megatrons_skip_frequency():
    # Megatron-Core `is_layer_window_attention`: layer numbers (1-based) divisible by the
    # skip frequency keep full attention.
    assert GPT_OSS.windowed_layer_fraction() == 0.5
    every = GPT_OSS.model_copy(update={"window_attn_skip_freq": None})
    assert every.windowed_layer_fraction() == 1.0
    third = GPT_OSS.model_copy(update={"window_attn_skip_freq": 3})
    assert third.windowed_layer_fraction() == pytest.approx(24 / 36)
    assert preset_model("mixtral-8x7b").windowed_layer_fraction() == 0.0
    with pytest.raises(ValidationError, match="window_attn_skip_freq needs window_size"):
        ModelSpec(**(GPT_OSS.model_dump() | {"window_size": None}))


def _compute(model) -> float:
    return estimate(model, CLUSTER, TRAIN, M).breakdown["compute"]


def test_a_window_as_long_as_the_sequence_is_full_attention():
    full = GPT_OSS.model_copy(update={"window_size": None, "window_attn_skip_freq": None})
    whole = GPT_OSS.model_copy(update={"window_size": TRAIN.seq_length - 1,
                                       "window_attn_skip_freq": None})
    # (w+1)s - w(w+1)/2 pairs with w = s-1 is s(s+1)/2, the full causal s^2/2 plus s/2.
    assert _compute(whole) == pytest.approx(_compute(full), rel=1 / TRAIN.seq_length)


def test_sliding_window_layers_cost_less_attention():
    full = GPT_OSS.model_copy(update={"window_size": None, "window_attn_skip_freq": None})
    every = GPT_OSS.model_copy(update={"window_attn_skip_freq": None})
    t_full, t_half, t_every = _compute(full), _compute(GPT_OSS), _compute(every)
    assert t_every < t_half < t_full
    # Half the layers windowed: half the saving of windowing every layer.
    assert t_full - t_half == pytest.approx((t_full - t_every) / 2, rel=1e-9)


def test_the_executor_refuses_sliding_windows():
    cpu = ClusterSpec(num_nodes=1, gpus_per_node=8, gpu="cpu")
    m = resolve_mapping(GPT_OSS, cpu, TRAIN, Mapping(ep=8))
    assert [e.field for e in executor_errors(GPT_OSS, TRAIN, m)
            if e.field == "window_size"] == ["window_size"]
