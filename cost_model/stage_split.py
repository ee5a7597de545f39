"""Which layers each pipeline rank holds: the one stage split every part of foldplan uses.

Megatron-Core's rule. Without interleaving, pipeline rank r holds one contiguous block; with
`decoder_first_pipeline_num_layers` / `decoder_last_pipeline_num_layers` the first / last
rank take that many layers and the other ranks split the rest evenly. With vpp > 1 virtual
stages, the L layers form pp * vpp chunks of n = L / (pp * vpp) layers and rank r holds
chunks r, r + pp, r + 2 pp, ...: chunk c of rank r is layers [(c*pp + r)*n, (c*pp + r + 1)*n).

Worked example: L = 8, pp = 2, vpp = 2 gives n = 2; rank 0 holds [0, 2) and [4, 6), rank 1
holds [2, 4) and [6, 8). L = 10, pp = 3, first = 2, last = 2: ranks hold [0, 2), [2, 8), [8, 10).
"""

from __future__ import annotations


class StageSplitError(ValueError):
    """The layers cannot be split over the pipeline as asked. `kind` is "stage_split" (the
    layer counts do not divide) or "pipeline" (options that do not go together), as in
    `validate.MappingError`; `field` the mapping field to change."""

    def __init__(self, message: str, field: str, kind: str = "stage_split"):
        super().__init__(message)
        self.field = field
        self.kind = kind


def stage_layer_counts(num_layers: int, pp: int, vpp: int = 1, first: int | None = None,
                       last: int | None = None) -> list[int]:
    """Layers of each pipeline rank (all its chunks together); raises StageSplitError."""
    if first is None and last is None:
        if num_layers % (pp * vpp):
            raise StageSplitError(
                f"pp*vpp = {pp}*{vpp} = {pp * vpp} does not divide num_layers={num_layers}; "
                f"set decoder_first/last_pipeline_num_layers", "pp")
        return [num_layers // pp] * pp
    if pp == 1 or vpp > 1:
        raise StageSplitError("decoder_first/last_pipeline_num_layers need pp > 1 and vpp == 1",
                              "decoder_first_pipeline_num_layers" if first is not None
                              else "decoder_last_pipeline_num_layers", "pipeline")
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers) or (
        middle_stages and (middle_layers <= 0 or middle_layers % middle_stages)
    ):
        raise StageSplitError(
            f"num_layers={num_layers} minus first={first} and last={last} stage layers does "
            f"not split evenly over the other {middle_stages} stages",
            "decoder_first_pipeline_num_layers" if first is not None
            else "decoder_last_pipeline_num_layers")
    counts = [middle_layers // middle_stages if middle_stages else 0] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def stage_chunks(num_layers: int, pp: int, vpp: int = 1, first: int | None = None,
                 last: int | None = None) -> list[list[range]]:
    """chunks[rank][virtual chunk]: the layer ranges of each pipeline rank (module docstring);
    raises StageSplitError."""
    counts = stage_layer_counts(num_layers, pp, vpp, first, last)
    if vpp > 1:
        n = num_layers // (pp * vpp)
        return [[range((c * pp + r) * n, (c * pp + r + 1) * n) for c in range(vpp)]
                for r in range(pp)]
    starts = [sum(counts[:r]) for r in range(pp)]
    return [[range(starts[r], starts[r] + counts[r])] for r in range(pp)]
