"""From a pipeline configuration to the full mappings the search evaluates.

Pass 1 (`expand`) takes every rank order and optimizer choice of a (layer configuration, pp,
vpp) with the even stage split (or the pinned one); pass 2 (`stage_bases`) hands the same
configurations, stage split left open, to the CP-SAT stage solver (`stages.py`).
"""

from __future__ import annotations

from itertools import product

from cost_model.specs import Mapping
from cost_model.validate import data_parallel_sizes, mapping_errors

from .bounds import LayerConfig
from .space import CONTRACT_FIELDS, pinned_split

_STAGE_FIELDS = {"decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                 "recompute_num_layers", "pipeline_layout", "offload_modules"}


def check_fixed(fixed: dict) -> dict:
    """Validate a partial mapping: known field names, values a Mapping accepts."""
    unknown = sorted(set(fixed) - set(Mapping.model_fields))
    if unknown:
        raise ValueError(f"fixed: unknown mapping field(s) {', '.join(unknown)}")
    return Mapping(**fixed).model_dump(include=set(fixed))


def stages_free(fixed: dict) -> bool:
    """Whether the stage split and recompute depth are the planner's to choose."""
    return not (_STAGE_FIELDS & set(fixed)) and not all(f in fixed for f in CONTRACT_FIELDS)


def _sizes(cluster, fixed, lc: LayerConfig, pp: int) -> tuple[int, int] | None:
    dp, edp = data_parallel_sizes(cluster.world_size, lc.tp, lc.cp, lc.ep, lc.etp, pp)
    if fixed.get("dp", dp) != dp or fixed.get("edp", edp) != edp:
        return None
    return dp, edp


def _orders(values, fixed, pp: int, dp: int, edp: int) -> list[str]:
    """Both rank orders place the same groups unless pp > 1 and dp == edp."""
    return values["order"] if (pp > 1 and edp == dp) else [fixed.get("order", "tp-cp-ep-dp-pp")]


_ACCOUNT_FIELDS = ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split")


def _accounts(fixed, pp: int, vpp: int) -> list[tuple[bool, bool]]:
    """Whether the embedding / the loss count as a layer in the split: pinned, else every
    choice with interleaving (without it the stage solver already moves layers off the
    first and last stages)."""
    if any(f in fixed for f in _ACCOUNT_FIELDS) or fixed.get("pipeline_layout") is not None:
        return [tuple(fixed.get(f, False) for f in _ACCOUNT_FIELDS)]
    if pp > 1 and vpp > 1:
        return [(False, False), (True, True), (True, False), (False, True)]
    return [(False, False)]


def expand(model, cluster, training, values, fixed, lc: LayerConfig, pp: int, vpp: int):
    """All full mappings of one layer and pipeline configuration, resolved."""
    sizes = _sizes(cluster, fixed, lc, pp)
    if sizes is None:
        return
    dp, edp = sizes
    for (first, last), (emb, loss) in product(pinned_split(fixed), _accounts(fixed, pp, vpp)):
        for order in _orders(values, fixed, pp, dp, edp):
            for dist in values["distributed_optimizer"]:
                m = lc.probe.model_copy(update=dict(
                    pp=pp, vpp=vpp, dp=dp, edp=edp, distributed_optimizer=dist, order=order,
                    decoder_first_pipeline_num_layers=first,
                    decoder_last_pipeline_num_layers=last,
                    account_for_embedding_in_pipeline_split=emb,
                    account_for_loss_in_pipeline_split=loss,
                    pipeline_layout=fixed.get("pipeline_layout"),
                    offload_modules=fixed.get("offload_modules", ()),
                    recompute_num_layers=fixed.get("recompute_num_layers"),
                    # the probe's resolved value unless pinned (the same rule resolved it)
                    sequence_parallel=fixed.get("sequence_parallel",
                                                lc.probe.sequence_parallel)))
                errors, resolved = mapping_errors(model, cluster, training, m)
                if not errors:
                    yield resolved


def stage_bases(model, cluster, training, values, fixed, lc: LayerConfig, pp: int):
    """The configurations of (layer config, pp, vpp=1) for the stage solver: every rank order
    and optimizer choice, stage split left open (validity of the split is the solver's)."""
    sizes = _sizes(cluster, fixed, lc, pp)
    if sizes is None:
        return
    dp, edp = sizes
    for order in _orders(values, fixed, pp, dp, edp):
        for dist in values["distributed_optimizer"]:
            base = lc.probe.model_copy(update=dict(
                pp=pp, dp=dp, edp=edp, distributed_optimizer=dist, order=order,
                sequence_parallel=fixed.get("sequence_parallel")))
            # Every check but the layer split (the solver picks a valid one).
            probe = base.model_copy(update={"decoder_first_pipeline_num_layers": 1,
                                            "decoder_last_pipeline_num_layers": 1})
            errors, resolved = mapping_errors(model, cluster, training, probe)
            if all(e.kind == "stage_split" for e in errors):
                yield base.model_copy(update={"sequence_parallel": resolved.sequence_parallel})
