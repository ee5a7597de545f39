"""Spec validation, presets and the Hugging Face importer."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cost_model.presets import (UnsupportedConfig, import_hf_config, model_presets,
                                preset_model, resolve_gpu, resolve_model)
from cost_model.specs import ClusterSpec, HFConfigRef, Mapping, ModelSpec, PresetRef, TrainingSpec
from cost_model.validate import InvalidMapping, mapping_errors, resolve_mapping

MIXTRAL = preset_model("mixtral-8x22b")
H100x128 = ClusterSpec(num_nodes=16, gpus_per_node=8, gpu="h100")
TRAIN = TrainingSpec(seq_length=4096, global_batch_size=256)


def test_required_presets_exist_and_are_valid():
    required = {"mixtral-8x7b", "mixtral-8x22b", "qwen2-57b-a14b", "qwen3-30b-a3b",
                "qwen3-235b-a22b", "deepseek-v2-lite", "deepseek-v3", "llama3-70b", "tiny-moe"}
    presets = model_presets()
    assert required <= set(presets)
    assert not presets["llama3-70b"].is_moe
    assert presets["deepseek-v3"].multi_latent_attention
    assert presets["deepseek-v3"].num_moe_layers == 58  # first 3 layers dense
    tiny = presets["tiny-moe"]
    assert tiny.vocab_size == 256 and tiny.is_moe


def test_tiny_moe_has_a_few_million_parameters():
    from cost_model.params import total_params

    assert 1e6 < total_params(preset_model("tiny-moe")) < 10e6


def test_gpu_presets_have_sources():
    for gid in ("h100", "h200", "a100-80gb", "b200", "cpu"):
        g = resolve_gpu(gid)
        assert g.source and g.peak_tflops > 0 and g.memory_gib > 0
    assert resolve_gpu("h100").intra_node_GBps == 450
    assert resolve_gpu("h100").inter_node_GBps == 50


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        resolve_model(PresetRef(preset="nope"))
    with pytest.raises(ValueError, match="unknown gpu preset 'tpu'"):
        resolve_gpu("tpu")


def test_model_validation_names_values():
    with pytest.raises(ValidationError, match="num_attention_heads=10 is not divisible by num_query_groups=4"):
        ModelSpec(num_layers=2, hidden_size=64, num_attention_heads=10, num_query_groups=4,
                  ffn_hidden_size=128, vocab_size=256)
    with pytest.raises(ValidationError, match="moe_router_topk=9 exceeds num_experts=8"):
        ModelSpec(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                  vocab_size=256, num_experts=8, moe_router_topk=9)
    with pytest.raises(ValidationError, match="moe_layer_freq has 3 entries but num_layers=2"):
        ModelSpec(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                  vocab_size=256, num_experts=8, moe_router_topk=2, moe_layer_freq=[1, 0, 1])


def test_cluster_limit():
    with pytest.raises(ValidationError, match="exceeds the limit of 131072 GPUs"):
        ClusterSpec(num_nodes=20000, gpus_per_node=8)


def test_mapping_order_must_be_permutation():
    with pytest.raises(ValidationError, match="order='tp-cp-dp-pp'"):
        Mapping(order="tp-cp-dp-pp")


@pytest.mark.parametrize(
    "mapping, message, kind, field",
    [
        (Mapping(tp=2, ep=3, pp=8), "does not divide", "world", "edp"),  # 3 divides neither 128 nor 8
        (Mapping(tp=2, ep=16, pp=4), "ep=16 does not divide num_experts=8", "layer", "ep"),
        (Mapping(tp=16, pp=8), "tp=16 does not divide num_query_groups=8", "layer", "tp"),
        (Mapping(tp=2, ep=8, pp=3), "pp*vpp = 3*1 = 3 does not divide num_layers=56",
         "stage_split", "pp"),
        (Mapping(tp=2, ep=8, pp=8, dp=4), "tp*cp*pp (2*1*8) x 4 = 64 but the cluster has 128 GPUs",
         "world", "dp"),
        (Mapping(tp=2, ep=8, pp=8, sequence_parallel=False), "needs sequence_parallel", "layer",
         "sequence_parallel"),
        (Mapping(tp=2, ep=8, pp=8, micro_batch_size=64), "global_batch_size=256 is not divisible",
         "batch", "micro_batch_size"),
        (Mapping(tp=2, cp=3, ep=8, pp=8), "seq_length=4096 is not divisible by 2*cp=6", "layer",
         "cp"),
        (Mapping(tp=2, ep=4, pp=8, order="tp-cp-ep-pp-dp"), "needs edp == dp", "option", "order"),
        (Mapping(tp=2, ep=8, pp=1, decoder_first_pipeline_num_layers=4),
         "need pp > 1", "pipeline", "decoder_first_pipeline_num_layers"),
    ],
)
def test_mapping_validation_names_the_offending_values(mapping, message, kind, field):
    errors, _ = mapping_errors(MIXTRAL, H100x128, TRAIN, mapping)
    assert any(message in e.message and (e.kind, e.field) == (kind, field) for e in errors), errors
    with pytest.raises(InvalidMapping) as info:
        resolve_mapping(MIXTRAL, H100x128, TRAIN, mapping)
    assert info.value.reasons == [e.message for e in errors]


def test_resolve_fills_dp_edp_and_sp():
    m = resolve_mapping(MIXTRAL, H100x128, TRAIN, Mapping(tp=2, ep=8, pp=8))
    assert (m.dp, m.edp, m.sequence_parallel) == (8, 2, True)
    assert m.tp * m.cp * m.dp * m.pp == m.ep * m.etp * m.edp * m.pp == 128


HF_MIXTRAL = {
    "model_type": "mixtral", "num_hidden_layers": 56, "hidden_size": 6144,
    "intermediate_size": 16384, "num_attention_heads": 48, "num_key_value_heads": 8,
    "vocab_size": 32768, "num_local_experts": 8, "num_experts_per_tok": 2,
    "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": None,
}
HF_QWEN2 = {
    "model_type": "qwen2_moe", "num_hidden_layers": 28, "hidden_size": 3584,
    "intermediate_size": 18944, "moe_intermediate_size": 2560,
    "shared_expert_intermediate_size": 20480, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 151936, "num_experts": 64,
    "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False,
}
HF_QWEN3 = {
    "model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "num_experts": 128,
    "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "hidden_act": "silu", "tie_word_embeddings": False,
}
HF_DSV3 = {
    "model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_attention_heads": 128,
    "num_key_value_heads": 128, "vocab_size": 129280, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "hidden_act": "silu",
    "tie_word_embeddings": False, "num_nextn_predict_layers": 1,
}
HF_LLAMA = {
    "model_type": "llama", "num_hidden_layers": 80, "hidden_size": 8192,
    "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
    "vocab_size": 128256, "hidden_act": "silu", "tie_word_embeddings": False,
}


def test_hf_import_matches_presets():
    spec, notes = import_hf_config(HF_QWEN2)
    preset = preset_model("qwen2-57b-a14b")
    for f in ("num_layers", "hidden_size", "num_query_groups", "num_experts",
              "moe_ffn_hidden_size", "moe_router_topk", "moe_shared_expert_intermediate_size"):
        assert getattr(spec, f) == getattr(preset, f), f
    assert any("moe_intermediate_size->moe_ffn_hidden_size" in n for n in notes)

    spec, _ = import_hf_config(HF_QWEN3)
    assert spec.kv_channels == 128 and spec.num_experts == 128 and spec.moe_layer_freq == 1

    spec, notes = import_hf_config(HF_DSV3)
    v3 = preset_model("deepseek-v3")
    assert spec.moe_layer_pattern() == v3.moe_layer_pattern()
    assert spec.multi_latent_attention and spec.q_lora_rank == 1536
    assert spec.moe_shared_expert_intermediate_size == 2048
    assert any("multi-token prediction" in n for n in notes)

    spec, _ = import_hf_config(HF_MIXTRAL)
    assert spec.num_experts == 8 and spec.moe_ffn_hidden_size == 16384

    spec, _ = import_hf_config(HF_LLAMA)
    assert not spec.is_moe and spec.num_query_groups == 8
    assert resolve_model(HFConfigRef(hf_config=HF_LLAMA)).num_layers == 80


def test_hf_import_refuses_what_it_cannot_model():
    with pytest.raises(UnsupportedConfig, match="hf_config.model_type='gpt2'"):
        import_hf_config({"model_type": "gpt2"})
    with pytest.raises(UnsupportedConfig, match="hf_config.hidden_act='gelu'"):
        import_hf_config(HF_LLAMA | {"hidden_act": "gelu"})
    with pytest.raises(UnsupportedConfig, match="sliding_window"):
        import_hf_config(HF_MIXTRAL | {"sliding_window": 4096})
    with pytest.raises(UnsupportedConfig, match="hf_config.num_experts is required"):
        import_hf_config({k: v for k, v in HF_QWEN2.items() if k != "num_experts"})
