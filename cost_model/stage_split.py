"""Which layers each pipeline rank holds: the one stage split every part of foldplan uses.

Megatron-Core's rule (transformer/transformer_block.py `get_num_layers_to_build`,
transformer/transformer_layer.py `get_transformer_layer_offset`). Without interleaving,
pipeline rank r holds one contiguous block; with `decoder_first_pipeline_num_layers` /
`decoder_last_pipeline_num_layers` the first / last rank take that many layers and the other
ranks split the rest evenly. With vpp > 1 virtual stages, the L layers form pp * vpp chunks of
n = L / (pp * vpp) layers and rank r holds chunks r, r + pp, r + 2 pp, ...: chunk c of rank r
is layers [(c*pp + r)*n, (c*pp + r + 1)*n). With first / last counts and vpp > 1 each rank's
count splits evenly over its vpp chunks (first, last and each middle rank's count must divide
by vpp: transformer_config.py), and round c of the chunks holds, in rank order, first/vpp,
the middle ranks' share and last/vpp layers.

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

A custom layout (`pipeline_layout`, Megatron's --pipeline-model-parallel-layout) names every
stage instead: stages separated by '|', in stage order i = c * pp + r (virtual chunk c of
rank r), each a string of E (embedding), t (decoder layer), m (MTP layer), L (loss); `(..)*n`
and `x*n` repeat, commas are cosmetic (transformer/pipeline_parallel_layer_layout.py
`parse_str_to_list`). Decoder layers are numbered in stage order. NVIDIA's DeepSeek-V3
recipe, 61 layers + 1 MTP layer on pp 8 x vpp 4: "Et*3|(tt|)*29,m|L" (rank 0 holds the
embedding and layers [0, 3) in its first chunk; the MTP layer is alone in rank 6's last
chunk, the loss in rank 7's). Megatron refuses it together with first/last stage layer
counts or the account_for_* flags.

Worked examples: L = 8, pp = 2, vpp = 2 gives n = 2; rank 0 holds [0, 2) and [4, 6), rank 1
holds [2, 4) and [6, 8). L = 10, pp = 3, first = 2, last = 2: ranks hold [0, 2), [2, 8),
[8, 10). L = 94 with embedding and loss over pp = 8 (the public Qwen3-235B runs): S = 96,
n = 12, rank 0 holds [0, 11), rank 1 [11, 23), ..., rank 7 [83, 94); with vpp = 4: n = 3,
rank 0 holds [0, 2), [23, 26), [47, 50), [71, 74) (11 layers), rank 7 holds [20, 23),
[44, 47), [68, 71), [92, 94) (11 layers), ranks 1-6 hold 12 layers each.
"""

from __future__ import annotations

import re
from functools import lru_cache

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
    if pp == 1:
        raise StageSplitError("decoder_first/last_pipeline_num_layers need pp > 1", field,
                              "pipeline")
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers) or (
        middle_stages and (middle_layers <= 0 or middle_layers % middle_stages)
    ):
        raise StageSplitError(
            f"num_layers={num_layers} minus first={first} and last={last} stage layers does "
            f"not split evenly over the other {middle_stages} stages", field)
    middle = middle_layers // middle_stages if middle_stages else 0  # each middle stage's
    counts = [middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    if vpp > 1:  # transformer_config.py: "must be divisible by virtual pipeline parallel degree"
        first_f, last_f = "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"
        for name, n, what in ((first_f, first, f"{first_f}={first}"),
                              (last_f, last, f"{last_f}={last}"),
                              (field, middle if middle_stages else None,
                               f"each middle stage's {middle} layers")):
            if n is not None and n % vpp:
                raise StageSplitError(f"{what} must divide by vpp={vpp} (each stage's layers "
                                      f"split evenly over its virtual stages)", name)
    return counts


_LAYOUT = "pipeline_layout"
_LAYOUT_CHARS = "EtmL"
_MAX_LAYOUT_LAYERS = 100_000  # repeats beyond any real model: refused before expanding


def parse_layout(layout: str) -> list[str]:
    """The stages of a layout string (module docstring), each a string of E, t, m, L.
    Raises StageSplitError naming `pipeline_layout`."""
    s = layout.replace(",", "").replace(" ", "")
    for pattern in (r"\(([^()]+)\)\*(\d+)", r"([^()|])\*(\d+)"):  # Megatron's two passes
        for found in re.finditer(pattern, s):
            if len(found.group(1)) * int(found.group(2)) > _MAX_LAYOUT_LAYERS:
                raise StageSplitError(f"{_LAYOUT}={layout!r}: {found.group(0)!r} repeats more "
                                      f"than {_MAX_LAYOUT_LAYERS} times", _LAYOUT, "pipeline")
        s = re.sub(pattern, lambda x: x.group(1) * int(x.group(2)), s)
        if len(s) > _MAX_LAYOUT_LAYERS:
            raise StageSplitError(f"{_LAYOUT}={layout!r} expands to more than "
                                  f"{_MAX_LAYOUT_LAYERS} characters", _LAYOUT, "pipeline")
    bad = sorted(set(s) - set(_LAYOUT_CHARS + "|"))
    if bad:
        raise StageSplitError(
            f"{_LAYOUT}={layout!r}: unknown character(s) {' '.join(map(repr, bad))} after "
            f"expanding repeats; a layout holds E (embedding), t (decoder layer), m (MTP "
            f"layer), L (loss), '|' between stages, (..)*n and x*n repeats and commas",
            _LAYOUT, "pipeline")
    return s.split("|")


def _layout_stages(layout: str, num_layers: int, pp: int, vpp: int) -> list[str]:
    """The parsed stages, checked as Megatron-Core checks them (transformer_config.py and
    `PipelineParallelLayerLayout.validate_layer_layout`), MTP rules aside."""
    stages = parse_layout(layout)
    n = len(stages)
    if n % pp:
        raise StageSplitError(f"{_LAYOUT} has {n} stages, not a multiple of pp={pp}",
                              _LAYOUT, "pipeline")
    if n // pp != vpp:
        raise StageSplitError(f"{_LAYOUT} has {n} stages = pp {pp} x vpp {n // pp}; set "
                              f"vpp={n // pp} (got vpp={vpp})", "vpp", "pipeline")
    flat = "".join(stages)
    for char, name, where in (("E", "embedding", 0), ("L", "loss", -1)):
        if flat.count(char) != 1 or flat[where] != char:
            raise StageSplitError(
                f"{_LAYOUT} must hold the {name} ({char}) exactly once, as its "
                f"{'first' if where == 0 else 'last'} layer (got {flat.count(char)})",
                _LAYOUT, "pipeline")
    if flat.count("t") != num_layers:
        raise StageSplitError(f"{_LAYOUT} holds {flat.count('t')} decoder layers (t); the "
                              f"model has num_layers={num_layers}", _LAYOUT, "stage_split")
    return stages


def layout_mtp_rank(layout: str, num_layers: int, pp: int, vpp: int,
                    mtp_num_layers: int | None) -> int:
    """The pipeline rank that runs the multi-token-prediction layers: the last one without
    a layout; with one, the rank of the stage holding them, checked as Megatron-Core checks
    it (the m count equals `mtp_num_layers`, all in one stage, after every decoder layer,
    in a rank's last virtual chunk). Raises StageSplitError."""
    stages = _layout_stages(layout, num_layers, pp, vpp)
    flat = "".join(stages)
    want = mtp_num_layers or 0
    if flat.count("m") != want:
        raise StageSplitError(f"{_LAYOUT} holds {flat.count('m')} MTP layers (m); the model "
                              f"has mtp_num_layers={mtp_num_layers}", _LAYOUT, "stage_split")
    if not want:
        return pp - 1
    if "t" in flat[flat.index("m"):]:
        raise StageSplitError(f"{_LAYOUT}: decoder layers (t) must come before the MTP "
                              f"layers (m)", _LAYOUT, "pipeline")
    holding = [i for i, st in enumerate(stages) if "m" in st]
    if len(holding) > 1 or stages[holding[0]].count("m") != want:
        raise StageSplitError(f"{_LAYOUT}: all MTP layers (m) must be in one stage",
                              _LAYOUT, "pipeline")
    if holding[0] // pp != vpp - 1:
        raise StageSplitError(f"{_LAYOUT}: the MTP layers (m) must be in a rank's last "
                              f"virtual stage (stage {holding[0]} is virtual stage "
                              f"{holding[0] // pp} of {vpp})", _LAYOUT, "pipeline")
    return holding[0] % pp


def _layout_chunks(layout: str, num_layers: int, pp: int, vpp: int) -> list[list[range]]:
    stages = _layout_stages(layout, num_layers, pp, vpp)
    starts = [0]
    for st in stages:
        starts.append(starts[-1] + st.count("t"))
    return [[range(starts[c * pp + r], starts[c * pp + r + 1]) for c in range(vpp)]
            for r in range(pp)]


def stage_chunks(num_layers: int, pp: int, vpp: int = 1, first: int | None = None,
                 last: int | None = None, *, embedding: bool = False,
                 loss: bool = False, layout: str | None = None) -> list[list[range]]:
    """chunks[rank][virtual chunk]: the decoder layer ranges of each pipeline rank (module
    docstring); `embedding` / `loss` are the mapping's account_for_*_in_pipeline_split flags,
    `layout` its pipeline_layout. Raises StageSplitError."""
    if layout is not None:
        if first is not None or last is not None or embedding or loss:
            other = next(f for f, on in (
                ("decoder_first_pipeline_num_layers", first is not None),
                ("decoder_last_pipeline_num_layers", last is not None),
                (_EMBED, embedding), (_LOSS, loss)) if on)
            raise StageSplitError(f"{_LAYOUT} cannot be combined with {other} (Megatron-Core: "
                                  f"'pipeline_model_parallel_layout cannot be set with other "
                                  f"pipeline layout arguments')", _LAYOUT, "pipeline")
        return _layout_chunks(layout, num_layers, pp, vpp)
    if first is None and last is None:
        n = _check_slots(num_layers, pp, vpp, embedding, loss)
        e = int(embedding)
        return [[range(max(0, (c * pp + r) * n - e), min(num_layers, (c * pp + r + 1) * n - e))
                 for c in range(vpp)] for r in range(pp)]
    counts = _uneven_counts(num_layers, pp, vpp, first, last, embedding, loss)
    per = [n // vpp for n in counts]  # each rank's layers in one virtual chunk
    starts = [sum(per[:r]) for r in range(pp)]
    return [[range(c * sum(per) + starts[r], c * sum(per) + starts[r] + per[r])
             for c in range(vpp)] for r in range(pp)]


def stage_layer_counts(num_layers: int, pp: int, vpp: int = 1, first: int | None = None,
                       last: int | None = None, *, embedding: bool = False,
                       loss: bool = False, layout: str | None = None) -> list[int]:
    """Decoder layers of each pipeline rank (all its chunks together); raises StageSplitError."""
    return list(_stage_layer_counts(num_layers, pp, vpp, first, last, embedding, loss, layout))


@lru_cache(maxsize=65_536)
def _stage_layer_counts(num_layers: int, pp: int, vpp: int, first: int | None,
                        last: int | None, embedding: bool, loss: bool,
                        layout: str | None) -> tuple[int, ...]:
    """`stage_layer_counts`, kept (the planner asks for the same splits many times); an
    error is raised again each time (lru_cache keeps answers only)."""
    if first is None and last is None and not (embedding or loss) and layout is None:
        _check_slots(num_layers, pp, vpp, False, False)
        return (num_layers // pp,) * pp
    return tuple(sum(len(c) for c in chunks) for chunks in
                 stage_chunks(num_layers, pp, vpp, first, last, embedding=embedding,
                              loss=loss, layout=layout))
