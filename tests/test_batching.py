import torch

from qlora.batching import DataOrder, collate, epoch_batches, windows_per_epoch
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
    order = DataOrder(data, batch_size=2, grad_accum=3, seed=0, group_by_length=False)
    assert windows_per_epoch(7, 2, 3) == order.per_epoch == 2
    epoch0 = [order.window(0), order.window(1)]
    assert [e for e, _ in epoch0] == [0, 0] and [len(m) for _, m in epoch0] == [3, 1]
    seen = [len(r.input_ids) for _, m in epoch0 for b in m for r in b]
    assert sorted(seen) == [5, 6, 7, 8, 9, 10, 11]
    assert order.window(2)[0] == 1
    fresh = DataOrder(data, batch_size=2, grad_accum=3, seed=0, group_by_length=False)
    assert fresh.window(1) == epoch0[1]  # a resumed run finds step 1 without replaying step 0


def test_collate_pads_right_to_the_longest():
    batch = collate(rows([3, 5]), pad_id=0)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][0].tolist() == [IGNORE, 7, 8, IGNORE, IGNORE]
    assert batch["labels"].dtype == torch.long
