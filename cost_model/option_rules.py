"""Megatron-Core's rules for its newer options, as typed errors (kind "option"; "pipeline" for
the two that depend on pp / vpp).

Each rule names the field to change and cites where Megatron-Core 0.16 (megatron/core) asserts
it; "foldplan rule" marks the few that Megatron would accept but that cannot do anything (an
option set where it has no effect), refused so that a request means what it says and the
planner keeps one value per effective configuration. Rules on the layer split (the embedding
and the loss in the pipeline split) live with the split in `stage_split.py`; rules on a model
alone (group-limited routing, expert bias, interleaved RoPE with MLA) live in `ModelSpec`.

Precision: foldplan's `precision='fp8'` is Megatron's `--bf16 --fp8-format ...` (bf16
parameters, fp8 GEMMs through Transformer Engine), so what Megatron asks of a "bf16 or fp16
model" holds for `bf16` and `fp8`; only `fp32` is refused there.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from .errors import MappingError
from .presets import resolve_gpu
from .specs import ClusterSpec, GPUSpec, Mapping, ModelSpec, TrainingSpec
from .specs.mapping import DEFAULT_RECOMPUTE_MODULES

Err = Callable[..., None]  # err(field, message, kind="option") records one error


def _show(modules: tuple[str, ...]) -> str:
    return "[" + ", ".join(modules) + "]"


def _a2a_overlap_errors(model: ModelSpec, training: TrainingSpec, m: Mapping, err: Err) -> None:
    """transformer_config.py `__post_init__`, `if self.overlap_moe_expert_parallel_comm:`."""
    if not m.moe_a2a_overlap:
        return
    on = "moe_a2a_overlap=true"
    if m.ep == 1:  # 'only supported with expert model parallelism'
        err("moe_a2a_overlap", f"{on} needs ep > 1 (got ep=1): the overlap hides the expert "
                               "all-to-all, which needs expert parallelism")
    if m.dispatcher not in ("alltoall", "flex"):  # 'supported with alltoall/flex dispatcher'
        err("moe_a2a_overlap", f"{on} needs dispatcher 'alltoall' or 'flex' (got "
                               f"{m.dispatcher!r})")
    if m.recompute == "full":  # 'disable full recomputation when enabling ...'
        err("moe_a2a_overlap", f"{on} cannot be combined with recompute='full' (Megatron-Core "
                               "refuses full recomputation with the overlap)")
    if m.pp > 1 and m.vpp == 1:  # 'virtual_pipeline_model_parallel_size must be specified'
        err("moe_a2a_overlap", f"{on} with pp={m.pp} needs vpp > 1 (Megatron-Core's overlap "
                               "schedule interleaves virtual pipeline stages when pp > 1)",
            kind="pipeline")
    if training.precision == "fp32":  # 'only supported with bf16 or fp16 model'
        err("moe_a2a_overlap", f"{on} needs a bf16 model: precision='fp32' is refused "
                               "(bf16 and fp8 are accepted)")
    mtp = model.mtp_num_layers
    if mtp is not None and mtp > 1:  # 'MTP layernum only supports 1 when enabling ...'
        err("moe_a2a_overlap", f"{on} supports at most one MTP layer (got mtp_num_layers={mtp})")
    elif mtp == 1 and m.pp == 1:  # 'Pipeline model parallel size must be larger than 1 ...'
        err("moe_a2a_overlap", f"{on} with an MTP layer (mtp_num_layers=1) needs pp > 1",
            kind="pipeline")
    if m.recompute == "selective" and "moe" in m.recompute_modules:
        # foldplan rule: with the overlap the MoE layer runs as separate callables
        # (models/gpt/fine_grained_callables.py: route, dispatch, experts, combine), so
        # MoELayer's 'moe' checkpoint (transformer/moe/moe_layer.py `moe_layer_recompute`)
        # never applies: Megatron would silently keep the activations.
        err("recompute_modules", f"recompute_modules={_show(m.recompute_modules)} with {on}: "
                                 "'moe' recompute does not apply under the overlap (the MoE "
                                 "layer runs as separate dispatch/expert/combine steps)")


def _dispatcher_errors(model: ModelSpec, m: Mapping, err: Err) -> None:
    """transformer/moe/token_dispatcher.py `MoEFlexTokenDispatcher.__init__`."""
    if m.dispatcher == "flex":
        if not model.is_moe:  # foldplan rule: the dispatcher of a dense model does nothing
            err("dispatcher", "dispatcher='flex' needs a MoE model (num_experts is 0)")
        elif m.etp * m.ep == 1:  # 'Flex token dispatcher requires TPxEP > 1'
            err("dispatcher", f"dispatcher='flex' needs etp*ep > 1 (got etp={m.etp}, ep={m.ep}): "
                              "Megatron-Core's flex dispatcher communicates over the etp x ep "
                              "group")
    elif m.flex_backend != "deepep":
        # foldplan rule: the backend only selects the flex dispatcher's library
        # (transformer_config.py: 'DeepEP backend is only supported with flex token dispatcher').
        err("flex_backend", f"flex_backend={m.flex_backend!r} needs dispatcher='flex' (got "
                            f"{m.dispatcher!r})")


def _recompute_module_errors(model: ModelSpec, training: TrainingSpec, m: Mapping,
                             err: Err) -> None:
    """transformer_config.py `__post_init__`, `if self.recompute_granularity == "selective":`
    and where each module is read (transformer_layer.py, moe/moe_layer.py, moe/experts.py)."""
    modules = m.recompute_modules
    shown = f"recompute_modules={_show(modules)}"
    if m.recompute != "selective":
        if modules != DEFAULT_RECOMPUTE_MODULES:  # foldplan rule: read only when selective
            err("recompute_modules", f"{shown} needs recompute='selective' (got "
                                     f"{m.recompute!r}); the modules choose what selective "
                                     "recompute recomputes")
        return
    if "mla_up_proj" in modules and not model.multi_latent_attention:
        # 'mla_up_proj in recompute_modules is only supported with multi_latent_attention.'
        err("recompute_modules", f"{shown}: 'mla_up_proj' needs multi_latent_attention")
    if not model.is_moe:
        # 'moe_act in recompute_modules is only supported with moe_grouped_gemm.' (foldplan
        # writes --moe-grouped-gemm for MoE models only); 'moe' and 'shared_experts' act on
        # MoE layers only (moe_layer.py): foldplan rule.
        for name in ("moe_act", "moe", "shared_experts"):
            if name in modules:
                err("recompute_modules", f"{shown}: '{name}' needs a MoE model (num_experts "
                                         "is 0)")
    elif "shared_experts" in modules and not model.shared_ffn:
        # foldplan rule: shared_experts.py reads it only when the model has shared experts.
        err("recompute_modules", f"{shown}: 'shared_experts' needs "
                                 "moe_shared_expert_intermediate_size (the model has no "
                                 "shared experts)")
    if "mlp" in modules and model.num_moe_layers == model.num_layers:
        # foldplan rule: transformer_layer.py recomputes 'mlp' only in dense (non-MoE) layers.
        err("recompute_modules", f"{shown}: 'mlp' recomputes dense MLP layers, but every "
                                 "layer of the model is MoE")
    if training.precision == "fp8" and training.fp8_recipe == "delayed":
        for name in ("moe_act", "layernorm"):
            if name in modules:
                # 'Delayed scaling does not support moe_act and layernorm recompute for fp8.'
                err("recompute_modules", f"{shown}: '{name}' recompute with precision='fp8' "
                                         "needs an fp8_recipe other than 'delayed'")


def _offload_errors(model: ModelSpec, cluster: ClusterSpec, m: Mapping, err: Err) -> None:
    """transformer_config.py `__post_init__`, `if self.fine_grained_activation_offloading:`."""
    mods = m.offload_modules
    if not mods:
        return
    shown = f"offload_modules={_show(mods)}"
    if "attn_proj" in mods and "core_attn" not in mods:
        # 'attn_proj cannot be set to offload_modules alone without core_attn ...'
        err("offload_modules", f"{shown}: 'attn_proj' needs 'core_attn' too (the projection's "
                               "input is core attention's output, which its backward needs)")
    if not model.is_moe:  # foldplan rule: MoE modules of a dense model offload nothing
        for name in ("expert_fc1", "moe_act"):
            if name in mods:
                err("offload_modules", f"{shown}: '{name}' needs a MoE model (num_experts is 0)")
    if len(set(mods)) != len(mods):
        err("offload_modules", f"{shown}: a module is listed twice")
    gpu = _gpu(cluster.gpu)
    if gpu is not None and not gpu.host_GBps:
        err("offload_modules", f"{shown} needs a GPU with a link to host memory ({gpu.name} "
                               "has none: host_GBps is not set)")


@lru_cache(maxsize=64)
def _gpu(gpu: str | GPUSpec) -> GPUSpec | None:
    try:
        return resolve_gpu(gpu)
    except ValueError:  # an unknown preset is the cluster's own error, reported elsewhere
        return None


def _fp8_errors(cluster: ClusterSpec, training: TrainingSpec, err: Err) -> None:
    """fp8_utils.py `get_fp8_recipe` hands the recipe to Transformer Engine, which checks the
    GPU: fp8 needs compute capability >= 8.9 (`check_fp8_support`), blockwise >= 9.0
    (`check_fp8_block_scaling_support`), mxfp8 10.x, Blackwell (`check_mxfp8_support`; the
    TransformerConfig docstring: "'mxfp8' for Blackwell architecture only")."""
    recipe = training.fp8_recipe
    if training.precision != "fp8":
        if recipe != "delayed":  # foldplan rule: Megatron reads --fp8-recipe only with fp8
            err("fp8_recipe", f"fp8_recipe={recipe!r} needs precision='fp8' (got "
                              f"{training.precision!r})")
        return
    gpu = _gpu(cluster.gpu)
    cc = gpu.compute_capability if gpu else None
    if gpu is None or cc is None:  # unknown: a custom GPU object without it, CPU ranks
        return
    if cc < 8.9:
        err("precision", f"precision='fp8' needs compute capability >= 8.9 (Ada, Hopper or "
                         f"newer); {gpu.name} has {cc}")
    elif recipe == "mxfp8" and not 10.0 <= cc < 12.0:
        err("fp8_recipe", f"fp8_recipe='mxfp8' needs a Blackwell GPU (compute capability "
                          f"10.x); {gpu.name} has {cc}")
    elif recipe == "blockwise" and cc < 9.0:
        err("fp8_recipe", f"fp8_recipe='blockwise' needs compute capability >= 9.0 (Hopper or "
                          f"newer); {gpu.name} has {cc}")


def option_errors(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
                  m: Mapping) -> list[MappingError]:
    """Every rule above that `m` breaks, in a fixed order: kind "option", or "pipeline" for the
    rules that depend on pp / vpp (the planner settles those with the pipeline)."""
    errors: list[MappingError] = []

    def err(field: str, message: str, kind: str = "option") -> None:
        errors.append(MappingError(kind, field, message))

    _a2a_overlap_errors(model, training, m, err)
    _dispatcher_errors(model, m, err)
    _recompute_module_errors(model, training, m, err)
    _offload_errors(model, cluster, m, err)
    _fp8_errors(cluster, training, err)
    return errors
