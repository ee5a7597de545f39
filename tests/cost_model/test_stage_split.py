"""The layer split over pipeline stages (cost_model/stage_split.py), with the embedding and the
loss counted as layers (Megatron-Core's account_for_*_in_pipeline_split), worked by hand."""

from __future__ import annotations

import pytest

from cost_model.memory import rank_chunks
from cost_model.presets import preset_model
from cost_model.specs import Mapping
from cost_model.stage_split import StageSplitError, stage_chunks, stage_layer_counts


def _ranges(chunks):
    return [[(r.start, r.stop) for r in rank] for rank in chunks]


def test_qwen3_235b_public_run_split():
    """94 layers + embedding + loss = 96 slots over pp 8 x vpp 4: chunks of 3 slots; chunk
    k = c*8 + r holds decoder layers [3k - 1, 3k + 2) clipped to [0, 94)."""
    chunks = stage_chunks(94, 8, 4, embedding=True, loss=True)
    assert _ranges(chunks)[0] == [(0, 2), (23, 26), (47, 50), (71, 74)]
    assert _ranges(chunks)[1] == [(2, 5), (26, 29), (50, 53), (74, 77)]
    assert _ranges(chunks)[7] == [(20, 23), (44, 47), (68, 71), (92, 94)]
    assert stage_layer_counts(94, 8, 4, embedding=True, loss=True) == [11] + [12] * 6 + [11]
    # every layer exactly once, in model order c*pp + r
    flat = [i for c in range(4) for r in range(8) for i in chunks[r][c]]
    assert flat == list(range(94))


def test_split_without_interleaving():
    """pp 8: 96 slots of 12; rank 0 loses the embedding slot, rank 7 the loss slot."""
    assert _ranges(stage_chunks(94, 8, embedding=True, loss=True)) == [
        [(0, 11)], [(11, 23)], [(23, 35)], [(35, 47)], [(47, 59)], [(59, 71)], [(71, 83)],
        [(83, 94)]]
    # one flag: 9 layers + 1 = 10 slots of 5 over pp 2
    assert _ranges(stage_chunks(9, 2, embedding=True)) == [[(0, 4)], [(4, 9)]]
    assert _ranges(stage_chunks(9, 2, loss=True)) == [[(0, 5)], [(5, 9)]]


def test_one_slot_chunks_can_hold_no_decoder_layer():
    """4 layers + 2 = 6 slots over pp 2 x vpp 3: slot 0 (embedding) is rank 0's first chunk,
    slot 5 (loss) rank 1's last; Megatron builds zero decoder layers there."""
    assert _ranges(stage_chunks(4, 2, 3, embedding=True, loss=True)) == [
        [(0, 0), (1, 2), (3, 4)], [(0, 1), (2, 3), (4, 4)]]
    assert stage_layer_counts(4, 2, 3, embedding=True, loss=True) == [2, 2]


def test_plain_split_unchanged():
    assert _ranges(stage_chunks(8, 2, 2)) == [[(0, 2), (4, 6)], [(2, 4), (6, 8)]]
    assert _ranges(stage_chunks(10, 3, 1, 2, 2)) == [[(0, 2)], [(2, 8)], [(8, 10)]]
    assert stage_layer_counts(56, 8) == [7] * 8


@pytest.mark.parametrize("args, kwargs, kind, field, message", [
    ((94, 8, 4), dict(embedding=True), "stage_split", "pp",
     ("pp*vpp = 8*4 = 32 does not divide num_layers=94 + 1 = 95 layers of the pipeline split "
      "(account_for_embedding_in_pipeline_split=true")),
    ((94, 8, 5), dict(embedding=True, loss=True), "stage_split", "pp",
     "account_for_embedding_in_pipeline_split=true and account_for_loss_in_pipeline_split=true"),
    ((10, 3, 1, 2), dict(loss=True), "pipeline", "account_for_loss_in_pipeline_split",
     ("account_for_loss_in_pipeline_split=true cannot be combined with "
      "decoder_first_pipeline_num_layers=2")),
    ((10, 3, 1, None, 2), dict(embedding=True), "pipeline",
     "account_for_embedding_in_pipeline_split", "decoder_last_pipeline_num_layers=2"),
    ((94, 8, 4), {}, "stage_split", "pp", "pp*vpp = 8*4 = 32 does not divide num_layers=94; set"),
])
def test_split_errors_name_the_fields(args, kwargs, kind, field, message):
    with pytest.raises(StageSplitError) as info:
        stage_layer_counts(*args, **kwargs)
    assert (info.value.kind, info.value.field) == (kind, field)
    assert message in str(info.value)


def test_memory_model_uses_the_same_split():
    """cost_model.memory.rank_chunks passes the mapping's flags to the one split."""
    model = preset_model("qwen3-235b-a22b")
    m = Mapping(tp=2, ep=32, pp=8, vpp=4, account_for_embedding_in_pipeline_split=True,
                account_for_loss_in_pipeline_split=True)
    assert rank_chunks(model, m, 0) == [range(2), range(23, 26), range(47, 50), range(71, 74)]
    assert rank_chunks(model, m, 7)[-1] == range(92, 94)
