"""Micro-batches: which rows go together (seeded, optionally grouped by length) and how they are
padded. The order of epoch e depends only on (seed, e), so a resumed run finds its place from the
optimizer step alone."""

from __future__ import annotations

import math
import random

import torch

from qlora.config import DataConfig, TrainConfig
from qlora.data import IGNORE, Encoded

BUCKET_BATCHES = 16  # length groups span this many batches, so grouping still shuffles


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[list[int]]:
    """Row indices of each micro-batch of one epoch. With grouping, rows are shuffled, cut into
    buckets of BUCKET_BATCHES batches, sorted by length inside a bucket, batched, and the batches
    shuffled again: padding shrinks and the order stays random."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        size = batch_size * BUCKET_BATCHES
        buckets = [sorted(order[i:i + size], key=lambda j: -lengths[j]) for i in range(0, len(order), size)]
        order = [j for bucket in buckets for j in bucket]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def windows_per_epoch(n_rows: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch; the last window of an epoch may hold fewer micro-batches."""
    return math.ceil(math.ceil(n_rows / batch_size) / grad_accum)


def pack(rows: list[Encoded], max_length: int, multiple: int = 1) -> list[list[Encoded]]:
    """Groups of rows whose lengths add up to at most `max_length`: as few as first-fit decreasing
    finds; with `multiple` > 1, that count rounded up to a multiple (at most one group per row) and
    the rows spread evenly over them, so that any number of ranks dividing `multiple` gets the same
    share of tokens, while the groups stay the same whatever the number of ranks."""
    groups = first_fit(rows, max_length)
    if multiple == 1:
        return groups
    count = min(-(-len(groups) // multiple) * multiple, len(rows))
    while True:  # ends: one row per group always fits
        spread = spread_evenly(rows, count)
        if max(sum(len(r.input_ids) for r in g) for g in spread) <= max_length:
            return spread
        count = min(count + multiple, len(rows))


def spread_evenly(rows: list[Encoded], count: int) -> list[list[Encoded]]:
    """Longest first, each to the group with the fewest tokens so far (ties: the lowest index)."""
    groups: list[list[Encoded]] = [[] for _ in range(count)]
    load = [0] * count
    for r in sorted(rows, key=lambda r: -len(r.input_ids)):
        i = min(range(count), key=lambda g: (load[g], g))
        groups[i].append(r)
        load[i] += len(r.input_ids)
    return groups


def first_fit(rows: list[Encoded], max_length: int) -> list[list[Encoded]]:
    """First-fit decreasing."""
    groups: list[list[Encoded]] = []
    room: list[int] = []
    for r in sorted(rows, key=lambda r: -len(r.input_ids)):
        n = len(r.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            groups.append([r])
            room.append(max_length - n)
        else:
            groups[slot].append(r)
            room[slot] -= n
    return groups


class DataOrder:
    """Which micro-batches make up optimizer step s: a pure function of (rows, seed, s), with the
    current epoch's batches cached so a step costs no re-shuffle.

    With `pack_to`, the examples of a step's window are packed into as few rows of at most
    `pack_to` tokens as fit, one row per micro-batch: the same examples per optimizer step (and the
    same token-normalized gradient), no padding, fewer forward calls.

    `capacity`: the most tokens any micro-batch of the run holds (pack_to, or batch_size rows of the
    longest example), which flex attention pads every micro-batch to (qlora/attention.py)."""

    def __init__(self, rows: list[Encoded], batch_size: int, grad_accum: int, seed: int,
                 group_by_length: bool, pad_id: int, pack_to: int | None = None, rows_multiple: int = 1):
        self.rows, self.batch_size, self.grad_accum = rows, batch_size, grad_accum
        self.seed, self.group_by_length = seed, group_by_length
        self.pad_id, self.pack_to, self.rows_multiple = pad_id, pack_to, rows_multiple
        self.lengths = [len(r.input_ids) for r in rows]
        self.capacity = pack_to or batch_size * max(self.lengths, default=1)
        self.per_epoch = windows_per_epoch(len(rows), batch_size, grad_accum)
        self._cached: tuple[int, list[list[int]]] = (-1, [])

    def window(self, step: int) -> tuple[int, list[list[Encoded]]]:
        """(epoch, micro-batches of examples) of optimizer step `step` (0-based)."""
        epoch, index = divmod(step, self.per_epoch)
        if self._cached[0] != epoch:
            self._cached = (epoch, epoch_batches(self.lengths, self.batch_size, self.seed, epoch,
                                                 self.group_by_length))
        chosen = self._cached[1][index * self.grad_accum:(index + 1) * self.grad_accum]
        return epoch, [[self.rows[i] for i in batch] for batch in chosen]

    def batches(self, step: int) -> tuple[int, list[dict[str, torch.Tensor]]]:
        """(epoch, collated micro-batches) of optimizer step `step` (0-based). Each carries the seed
        of its dropout masks, so they do not depend on which process runs it, or after what."""
        epoch, micro = self.window(step)
        if self.pack_to is None:
            collated = [collate(b, self.pad_id) for b in micro]
        else:
            groups = pack([r for b in micro for r in b], self.pack_to, self.rows_multiple)
            collated = [collate_packed(group) for group in groups]
        for i, batch in enumerate(collated):
            batch["dropout_seed"] = (self.seed * 1_000_003 + step) * 1_009 + i
            batch["stream_capacity"] = self.capacity
        return epoch, collated


def data_order(rows: list[Encoded], data: DataConfig, train: TrainConfig, pad_id: int) -> DataOrder:
    """The DataOrder a config asks for."""
    return DataOrder(rows, train.batch_size, train.grad_accum, train.seed, data.group_by_length, pad_id,
                     pack_to=pack_length(data, train) if data.packing else None, rows_multiple=data.pack_rows_multiple)


def pack_length(data: DataConfig, train: TrainConfig) -> int:
    """Tokens per packed row: data.pack_length, else the token budget of one unpacked micro-batch
    (batch_size x max_length), so packing never needs more activation memory than padding."""
    return data.pack_length or train.batch_size * data.max_length


def total_steps(train: TrainConfig, n_rows: int) -> int:
    """Optimizer steps of the run: train.max_steps, else whole epochs."""
    return train.max_steps or train.epochs * windows_per_epoch(n_rows, train.batch_size, train.grad_accum)


def supervised_count(labels: torch.Tensor) -> int:
    """Tokens a batch learns: labels shifted by one, since position t predicts token t+1. Counted
    once, at collation, on the CPU tensors: no GPU sync."""
    return int((labels[:, 1:] != IGNORE).sum())


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row of this batch (not to max_length): padded positions get
    attention 0 and label IGNORE."""
    width = max(len(r.input_ids) for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r.input_ids)
        input_ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "n_tokens": int(attention_mask.sum()), "n_supervised": supervised_count(labels)}


def collate_packed(group: list[Encoded]) -> dict[str, torch.Tensor]:
    """One row holding the group's examples back to back, no padding. Positions restart at 0 for
    each example and no attention mask is passed: transformers then reads the restarts as sequence
    boundaries (SDPA: a dense block-diagonal causal mask; varlen: the boundaries themselves, see
    qlora/attention.py), so no token attends across examples."""
    input_ids = torch.tensor([t for r in group for t in r.input_ids]).unsqueeze(0)
    labels = torch.tensor([t for r in group for t in r.labels]).unsqueeze(0)
    position_ids = torch.cat([torch.arange(len(r.input_ids)) for r in group]).unsqueeze(0)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "n_tokens": input_ids.shape[1], "n_supervised": supervised_count(labels)}
