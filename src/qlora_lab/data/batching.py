"""Micro-batches: the per-epoch order, the stream a run draws from, a process's share, and how items become a
batch (padded rows, or packed rows: data/packing.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from qlora_lab.core.dist import Dist
from qlora_lab.core.errors import CheckpointError
from qlora_lab.data.packing import collate_packed
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


def label_count(example: Example) -> int:
    """The label tokens an example contributes to the loss (labels are shifted by one inside the model)."""
    return sum(t != IGNORE_INDEX for t in example.labels[1:])


@dataclass(frozen=True)
class Collator:
    """Turns the items of one process's micro-batch into tensors. Unpacked, an item is an example and the batch is
    right-padded to its longest; packed (`rows` > 0), an item is a packed row (a list of examples) and the batch
    is always `rows` x `length` tokens."""

    pad_id: int
    rows: int = 0  # packed: rows per micro-batch
    length: int = 0  # packed: tokens per row

    @property
    def packed(self) -> bool:
        return self.rows > 0

    def __call__(self, items: Sequence) -> dict[str, torch.Tensor]:
        return collate_packed(list(items), self.rows, self.length, self.pad_id) if self.packed \
            else collate(list(items), self.pad_id)

    def examples(self, items: Sequence) -> list[Example]:
        return [e for b in items for e in b] if self.packed else list(items)

    def labels(self, items: Sequence) -> int:
        return sum(label_count(e) for e in self.examples(items))

    def stand_in(self, items: Sequence) -> dict[str, torch.Tensor]:
        """A batch that adds nothing to loss or gradients (no labels, row id -1), for a process left without items
        at the short end of an epoch: it still runs forward and backward, so the collectives stay in step."""
        if self.packed:
            return collate_packed([], self.rows, self.length, self.pad_id)
        out = collate([items[-1]], self.pad_id)
        out["labels"].fill_(IGNORE_INDEX)
        out["row"].fill_(-1)
        return out


def batches(items: Sequence, batch_size: int, collator: Collator) -> Iterator[dict[str, torch.Tensor]]:
    """Every item once, in order, `batch_size` at a time."""
    for start in range(0, len(items), batch_size):
        yield collator(items[start:start + batch_size])


class BatchStream:
    """Global micro-batches of items, epoch after epoch; its position (epoch, offset into that epoch's order) goes
    into checkpoints.

    With N processes each global micro-batch is N x `micro_batch` items (every process draws the same ones, then
    trains on its share, `share`), so the rows of every optimizer step do not depend on N.
    """

    def __init__(self, items: Sequence, micro_batch: int, *, shuffle: bool, seed: int, world: int = 1):
        self.items, self.micro_batch = items, micro_batch
        self.shuffle, self.seed, self.world = shuffle, seed, world
        self.epoch, self.offset = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.items), self.shuffle, self.seed, epoch)

    def __next__(self) -> tuple[int, list]:
        """(the epoch it belongs to, the items of the next global micro-batch)."""
        if self.offset >= len(self.order):
            self.epoch, self.offset = self.epoch + 1, 0
            self.order = self._order(self.epoch)
        idx = self.order[self.offset:self.offset + self.micro_batch * self.world]
        self.offset += len(idx)
        return self.epoch, [self.items[i] for i in idx]

    def take(self, n: int) -> list[tuple[int, list]]:
        return [next(self) for _ in range(n)]

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "order": self.order}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self.order = self._order(self.epoch)
        if self.order != state["order"]:
            raise CheckpointError("the checkpoint's sample order differs from this run's (other rows, seed, shuffle "
                                  "or packing); resume with the dataset and seed it was trained on")


def share(items: Sequence, d: Dist) -> list:
    """This process's share of one global micro-batch: a contiguous block of items, rank 0 first (possibly empty at
    the short end of an epoch). Collated alone, it is exactly the micro-batch a one-process run would collate from
    the same items."""
    n = len(items)
    return list(items[n * d.rank // d.world:n * (d.rank + 1) // d.world])
