"""Which layers each pipeline rank holds: the one stage split every part of foldplan uses.

Megatron-Core's rule (transformer/transformer_block.py `get_num_layers_to_build`,
transformer/transformer_layer.py `get_transformer_layer_offset`). Without interleaving,
pipeline rank r holds one contiguous block; with `decoder_first_pipeline_num_layers` /
`decoder_last_pipeline_num_layers` the first / last rank take that many layers and the other
ranks split the rest evenly. With vpp > 1 virtual stages, the L layers form pp * vpp chunks of
n = L / (pp * vpp) layers and rank r holds chunks r, r + pp, r + 2 pp, ...: chunk c of rank r
is layers [(c*pp + r)*n, (c*pp + r + 1)*n).

With `account_for_embedding_in_pipeline_split` (e = 1) and/or
`account_for_loss_in_pipeline_split` (l = 1) the embedding and the output layer + loss count
as one layer each: S = L + e + l slots split as above (S must divide by pp * vpp, n = S /
(pp * vpp)), slot 0 is the embedding, slot S - 1 the loss, and slot s is decoder layer s - e.
So chunk k = c*pp + r holds decoder layers [max(0, k*n - e), min(L, (k+1)*n - e)): the first
chunk of rank 0 and the last chunk of the last rank hold one decoder layer fewer (none when
n = 1). Megatron refuses the flags together with first/last stage layer counts.

Multi-token-prediction layers (`ModelSpec.mtp_num_layers`) are not part of this split: without
a custom pipeline layout Megatron-Core puts them all after the decoder on the last rank's last
chunk (transformer/multi_token_prediction.py `get_mtp_num_layers_to_build`).

Worked examples: L = 8, pp = 2, vpp = 2 gives n = 2; rank 0 holds [0, 2) and [4, 6), rank 1
holds [2, 4) and [6, 8). L = 10, pp = 3, first = 2, last = 2: ranks hold [0, 2), [2, 8),
[8, 10). L = 94 with embedding and loss over pp = 8 (the public Qwen3-235B runs): S = 96,
n = 12, rank 0 holds [0, 11), rank 1 [11, 23), ..., rank 7 [83, 94); with vpp = 4: n = 3,
rank 0 holds [0, 2), [23, 26), [47, 50), [71, 74) (11 layers), rank 7 holds [20, 23),
[44, 47), [68, 71), [92, 94) (11 layers), ranks 1-6 hold 12 layers each.
"""

from __future__ import annotations

_EMBED = "account_for_embedding_in_pipeline_split"
_LOSS = "account_for_loss_in_pipeline_split"


class StageSplitError(ValueError):
    """The layers cannot be split over the pipeline as asked. `kind` is "stage_split" (the
    layer counts do not divide) or "pipeline" (options that do not go together), as in
    `validate.MappingError`; `field` the mapping field to change."""

    def __init__(self, message: str, field: str, kind: str = "stage_split"):
        super().__init__(message)
        self.field = field
        self.kind = kind


def _check_slots(num_layers: int, pp: int, vpp: int, embedding: bool, loss: bool) -> int:
    """Layers per chunk n of the even split of S = L + e + l slots; raises StageSplitError."""
    slots = num_layers + embedding + loss
    if not slots % (pp * vpp):
        return slots // (pp * vpp)
    head = f"pp*vpp = {pp}*{vpp} = {pp * vpp} does not divide"
    if not (embedding or loss):
        raise StageSplitError(f"{head} num_layers={num_layers}; set "
                              f"decoder_first/last_pipeline_num_layers", "pp")
    flags = " and ".join(f"{f}=true" for f, on in ((_EMBED, embedding), (_LOSS, loss)) if on)
    raise StageSplitError(f"{head} num_layers={num_layers} + {int(embedding) + int(loss)} = "
                          f"{slots} layers of the pipeline split ({flags}: the embedding / "
                          f"loss count as one layer each)", "pp")


def _uneven_counts(num_layers: int, pp: int, vpp: int, first: int | None, last: int | None,
                   embedding: bool, loss: bool) -> list[int]:
    field = "decoder_first_pipeline_num_layers" if first is not None \
        else "decoder_last_pipeline_num_layers"
    if embedding or loss:  # transformer_config.py __post_init__: "cannot be set at the same time"
        raise StageSplitError(
            f"{_EMBED if embedding else _LOSS}=true cannot be combined with {field}="
            f"{first if first is not None else last} (Megatron-Core refuses first/last stage "
            f"layer counts together with the embedding/loss in the pipeline split)",
            _EMBED if embedding else _LOSS, "pipeline")
    if pp == 1 or vpp > 1:
        raise StageSplitError("decoder_first/last_pipeline_num_layers need pp > 1 and vpp == 1",
                              field, "pipeline")
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers) or (
        middle_stages and (middle_layers <= 0 or middle_layers % middle_stages)
    ):
        raise StageSplitError(
            f"num_layers={num_layers} minus first={first} and last={last} stage layers does "
            f"not split evenly over the other {middle_stages} stages", field)
    counts = [middle_layers // middle_stages if middle_stages else 0] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def stage_chunks(num_layers: int, pp: int, vpp: int = 1, first: int | None = None,
                 last: int | None = None, *, embedding: bool = False,
                 loss: bool = False) -> list[list[range]]:
    """chunks[rank][virtual chunk]: the decoder layer ranges of each pipeline rank (module
    docstring); `embedding` / `loss` are the mapping's account_for_*_in_pipeline_split flags.
    Raises StageSplitError."""
    if first is None and last is None:
        n = _check_slots(num_layers, pp, vpp, embedding, loss)
        e = int(embedding)
        return [[range(max(0, (c * pp + r) * n - e), min(num_layers, (c * pp + r + 1) * n - e))
                 for c in range(vpp)] for r in range(pp)]
    counts = _uneven_counts(num_layers, pp, vpp, first, last, embedding, loss)
    starts = [sum(counts[:r]) for r in range(pp)]
    return [[range(starts[r], starts[r] + counts[r])] for r in range(pp)]


def stage_layer_counts(num_layers: int, pp: int, vpp: int = 1, first: int | None = None,
                       last: int | None = None, *, embedding: bool = False,
                       loss: bool = False) -> list[int]:
    """Decoder layers of each pipeline rank (all its chunks together); raises StageSplitError."""
    if first is None and last is None and not (embedding or loss):
        _check_slots(num_layers, pp, vpp, False, False)
        return [num_layers // pp] * pp
    return [sum(len(c) for c in chunks) for chunks in
            stage_chunks(num_layers, pp, vpp, first, last, embedding=embedding, loss=loss)]
