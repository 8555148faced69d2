import dataclasses

import pytest
import torch

from qlora.attention import sequence_bounds
from qlora.batching import (DataOrder, collate, collate_packed, epoch_batches, pack, pack_length,
                            windows_per_epoch)
from qlora.config import DataConfig, TrainConfig
from qlora.distributed import World, share
from qlora.data import IGNORE, Encoded, Example


def rows(lengths):
    ex = Example(id="x", question="q", answer="a")
    return [Encoded(example=ex, input_ids=list(range(1, n + 1)), labels=[IGNORE] * (n - 2) + [7, 8],
                    truncated=False) for n in lengths]


def padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_every_row_once_per_epoch_and_deterministic():
    lengths = [(i * 37) % 200 + 5 for i in range(103)]
    for group in (False, True):
        a = epoch_batches(lengths, 4, seed=3, epoch=0, group_by_length=group)
        assert sorted(i for b in a for i in b) == list(range(103))
        assert a == epoch_batches(lengths, 4, seed=3, epoch=0, group_by_length=group)
        assert a != epoch_batches(lengths, 4, seed=3, epoch=1, group_by_length=group)
        assert a != epoch_batches(lengths, 4, seed=4, epoch=0, group_by_length=group)


def test_grouping_by_length_cuts_padding():
    lengths = [(i * 37) % 200 + 5 for i in range(400)]
    plain = padding(epoch_batches(lengths, 4, 0, 0, False), lengths)
    grouped = padding(epoch_batches(lengths, 4, 0, 0, True), lengths)
    assert grouped < plain / 4


def test_windows_cover_the_epoch_then_cycle():
    data = rows([5, 6, 7, 8, 9, 10, 11])  # 4 batches of 2 -> windows of 3 batches: 2 steps/epoch
    order = DataOrder(data, batch_size=2, grad_accum=3, seed=0, group_by_length=False, pad_id=0)
    assert windows_per_epoch(7, 2, 3) == order.per_epoch == 2
    epoch0 = [order.window(0), order.window(1)]
    assert [e for e, _ in epoch0] == [0, 0] and [len(m) for _, m in epoch0] == [3, 1]
    seen = [len(r.input_ids) for _, m in epoch0 for b in m for r in b]
    assert sorted(seen) == [5, 6, 7, 8, 9, 10, 11]
    assert order.window(2)[0] == 1
    fresh = DataOrder(data, batch_size=2, grad_accum=3, seed=0, group_by_length=False, pad_id=0)
    assert fresh.window(1) == epoch0[1]  # a resumed run finds step 1 without replaying step 0


def test_collate_pads_right_to_the_longest():
    batch = collate(rows([3, 5]), pad_id=0)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][0].tolist() == [IGNORE, 7, 8, IGNORE, IGNORE]
    assert batch["labels"].dtype == torch.long


def test_pack_fits_every_row_once_within_the_limit():
    lengths = [(i * 37) % 90 + 5 for i in range(50)]
    groups = pack(rows(lengths), 128)
    assert all(sum(len(r.input_ids) for r in g) <= 128 for g in groups)
    assert sorted(len(r.input_ids) for g in groups for r in g) == sorted(lengths)
    assert len(groups) <= -(-sum(lengths) // 128) + 2  # first-fit decreasing is near the minimum


@pytest.mark.parametrize("multiple", [2, 4])
def test_rows_of_a_multiple_give_every_dividing_number_of_ranks_an_even_share(multiple):
    """data.pack_rows_multiple: the rows are the same on any number of ranks (no rank count goes
    in), a multiple of `multiple`, each within the limit, and every count of ranks that divides it
    gets shares within one example of each other; first-fit rows on 2 ranks do not."""
    lengths = [(i * 37) % 90 + 5 for i in range(50)]
    groups = pack(rows(lengths), 128, multiple)
    assert len(groups) % multiple == 0 and all(sum(len(r.input_ids) for r in g) <= 128 for g in groups)
    assert sorted(len(r.input_ids) for g in groups for r in g) == sorted(lengths)
    batches = [collate_packed(g) for g in groups]
    for size in [n for n in (1, 2, 4) if multiple % n == 0]:
        loads = [sum(b["n_tokens"] for b in share(batches, World(rank, size))) for rank in range(size)]
        assert max(loads) - min(loads) <= max(lengths), (size, loads)
    few = rows([100, 100, 100, 20, 20, 20])
    first_fit = [collate_packed(g) for g in pack(few, 128)]  # 3 rows of 120: two on one rank
    even = [collate_packed(g) for g in pack(few, 128, 2)]  # 4 rows: 100, 100, 100, 60
    loads = lambda batches: [sum(b["n_tokens"] for b in share(batches, World(r, 2))) for r in range(2)]  # noqa: E731
    assert sorted(loads(first_fit)) == [120, 240] and sorted(loads(even)) == [160, 200]


def test_packed_window_keeps_the_examples_and_restarts_positions():
    data = rows([5, 6, 7, 8, 9, 10, 11, 12])
    plain = DataOrder(data, batch_size=2, grad_accum=2, seed=0, group_by_length=False, pad_id=0)
    packed = DataOrder(data, batch_size=2, grad_accum=2, seed=0, group_by_length=False, pad_id=0, pack_to=24)
    for step in range(2):
        (_, a), (_, b) = plain.batches(step), packed.batches(step)
        assert sum(x["n_tokens"] for x in a) == sum(x["n_tokens"] for x in b)
        assert all(x["input_ids"].shape == (1, x["n_tokens"]) and x["n_tokens"] <= 24 for x in b)  # no padding
        supervised = lambda bs: sorted(l for x in bs for l in x["labels"].flatten().tolist() if l != IGNORE)  # noqa: E731
        assert supervised(a) == supervised(b)
        assert "attention_mask" not in b[0]
    one_row = DataOrder(data, batch_size=2, grad_accum=2, seed=0, group_by_length=False, pad_id=0, pack_to=48)
    assert len(one_row.batches(0)[1]) == 1 < len(plain.batches(0)[1])  # fewer forward calls


def test_collate_packed_positions():
    batch = collate_packed(rows([3, 2, 4]))
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 1, 2, 1, 2, 3, 4]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert batch["labels"][0].tolist() == [IGNORE, 7, 8, 7, 8, IGNORE, IGNORE, 7, 8] and batch["n_tokens"] == 9
    assert batch["n_supervised"] == 6  # position 0 predicts nothing: labels shift by one


def test_sequence_bounds_of_packed_and_padded_batches():
    packed = sequence_bounds(collate_packed(rows([3, 2, 4])))
    assert packed["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and packed["max_length_q"] == 4
    padded = sequence_bounds(collate(rows([3, 5]), 0))  # a row is one sequence, its padding included
    assert padded["cu_seq_lens_q"].tolist() == [0, 5, 10] and padded["max_length_q"] == 5
    assert packed["cu_seq_lens_q"].dtype == torch.int32  # what the flash kernel takes


def test_every_micro_batch_carries_the_runs_capacity():
    """What flex attention pads a micro-batch to (qlora/attention.py): the most tokens any holds."""
    data = rows([3, 5, 2, 7, 4, 2])
    plain = DataOrder(data, batch_size=2, grad_accum=2, seed=0, group_by_length=False, pad_id=0)
    packed = DataOrder(data, batch_size=2, grad_accum=2, seed=0, group_by_length=False, pad_id=0, pack_to=24)
    for order, capacity in ((plain, 2 * 7), (packed, 24)):
        batches = [b for step in range(order.per_epoch) for b in order.batches(step)[1]]
        assert all(b["input_ids"].numel() <= capacity for b in batches)
        assert {sequence_bounds(b)["stream_capacity"] for b in batches} == {capacity}


def test_pack_length_defaults_to_one_unpacked_micro_batch():
    data = DataConfig(source="x", max_length=512, packing=True)
    assert pack_length(data, TrainConfig(output_dir="x", batch_size=4)) == 2048
    assert pack_length(dataclasses.replace(data, pack_length=4096), TrainConfig(output_dir="x")) == 4096
