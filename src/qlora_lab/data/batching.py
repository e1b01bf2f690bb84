"""Micro-batches: padding, the per-epoch sample order, the stream a run draws from, a process's share."""

from __future__ import annotations

import random
from typing import Any, Iterator

import torch

from qlora_lab.core.dist import Dist
from qlora_lab.core.errors import CheckpointError
from qlora_lab.data.tokenize import IGNORE_INDEX, Example


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch; padding is masked from attention and loss."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "row": torch.tensor([e.row for e in batch])}


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a function of (seed, epoch) only, so a resumed run replays it."""
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def batches(examples: list[Example], batch_size: int, pad_id: int, shuffle: bool = False, seed: int = 0,
            epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of micro-batches in `epoch_order`."""
    order = epoch_order(len(examples), shuffle, seed, epoch)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]], pad_id)


class BatchStream:
    """Micro-batches epoch after epoch; its position (epoch, offset into that epoch's order) goes into checkpoints.

    With N processes each global micro-batch is N x `micro_batch` rows (every process draws the same ones, then
    trains on its share, `shard_batch`), so the rows of every optimizer step do not depend on N.
    """

    def __init__(self, examples: list[Example], micro_batch: int, pad_id: int, *, shuffle: bool, seed: int,
                 world: int = 1):
        self.examples, self.micro_batch, self.pad_id = examples, micro_batch, pad_id
        self.shuffle, self.seed, self.world = shuffle, seed, world
        self.epoch, self.offset = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.examples), self.shuffle, self.seed, epoch)

    def __next__(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(the epoch it belongs to, the next global micro-batch)."""
        if self.offset >= len(self.order):
            self.epoch, self.offset = self.epoch + 1, 0
            self.order = self._order(self.epoch)
        idx = self.order[self.offset:self.offset + self.micro_batch * self.world]
        self.offset += len(idx)
        return self.epoch, collate([self.examples[i] for i in idx], self.pad_id)

    def take(self, n: int) -> list[tuple[int, dict[str, torch.Tensor]]]:
        return [next(self) for _ in range(n)]

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "order": self.order}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self.order = self._order(self.epoch)
        if self.order != state["order"]:
            raise CheckpointError("the checkpoint's sample order differs from this run's (other rows, seed or "
                                  "shuffle); resume with the dataset and seed it was trained on")


def shard_batch(batch: dict[str, torch.Tensor], d: Dist) -> dict[str, torch.Tensor]:
    """This process's share of one global micro-batch: a contiguous block of rows, rank 0 first, cut to the width of
    its own longest row (so each process pads only what it needs, and its share is exactly the micro-batch a
    one-process run would collate from the same rows).

    The short last batch of an epoch can leave a process without a row; it then runs the last row with every
    label ignored (row id -1), which adds nothing to loss or gradients but keeps the collectives in step.
    """
    if d.world == 1:
        return batch
    n = batch["input_ids"].shape[0]
    lo, hi = n * d.rank // d.world, n * (d.rank + 1) // d.world
    if hi > lo:
        out = {k: v[lo:hi] for k, v in batch.items()}
    else:
        out = {k: v[n - 1:n].clone() for k, v in batch.items()}
        out["labels"].fill_(IGNORE_INDEX)
        out["row"].fill_(-1)
    width = int(out["attention_mask"].sum(1).max())  # rows are right-padded: the columns after it are all padding
    return {k: (v[:, :width] if v.dim() == 2 else v) for k, v in out.items()}
