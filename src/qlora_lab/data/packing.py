"""Padding-free packing (`data.packing=true`): tokenized rows ("documents") packed into rows of model.max_seq_len
tokens, `data.micro_batch_size` such rows per micro-batch, so every micro-batch has the same shape and almost no
padding, and no token attends across a document boundary.

- `pack`: best-fit decreasing, once per run, from the documents' lengths alone; the packed rows are then shuffled
  per epoch (a function of seed and epoch, like the unpacked sample order), so a resumed run replays them.
- `collate_packed`: input ids, labels, position ids restarting at 0 for each document (RoPE sees each document as
  if alone), and the boundaries as cumulative lengths (`cu_seq_lens_q/k`, int32, a fixed length for every batch so
  compiled layers never recompile) that model/attention.py turns into document-isolated attention. The first
  token of every document gets no label: the logit before it belongs to the previous document. No attention_mask.

The loss is unchanged: a packed document contributes exactly the label tokens it contributes alone, and the step
still divides by the label tokens of the whole accumulation window.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from qlora_lab.data.tokenize import IGNORE_INDEX, Example


class _Fenwick:
    """Counts of open rows per remaining capacity 0..n; finds the k-th smallest capacity in O(log n)."""

    def __init__(self, n: int):
        self.n, self.tree = n + 1, [0] * (n + 2)

    def add(self, capacity: int, delta: int) -> None:
        i = capacity + 1
        while i <= self.n:
            self.tree[i] += delta
            i += i & -i

    def prefix(self, capacity: int) -> int:  # rows with remaining capacity <= `capacity`
        i, s = min(capacity + 1, self.n), 0
        while i > 0:
            s += self.tree[i]
            i -= i & -i
        return s

    def kth(self, k: int) -> int:  # the capacity of the k-th row (1-based) in capacity order
        pos, step = 0, 1 << self.n.bit_length()
        while step:
            if pos + step <= self.n and self.tree[pos + step] < k:
                pos += step
                k -= self.tree[pos]
            step >>= 1
        return pos  # (pos + 1) - 1: tree index back to capacity


def pack(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of `lengths` grouped into rows whose lengths sum to at most `capacity`.

    Longest first; each goes into the open row it fills most tightly (the smallest remaining capacity that holds
    it), else a new row. Deterministic (ties by index). O(n log capacity).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a document of {lengths.max()} tokens does not fit a row of {capacity}")
    rows: list[list[int]] = []
    by_capacity: dict[int, list[int]] = {}  # remaining capacity -> open rows with it (last opened last)
    fen = _Fenwick(capacity)
    # longest first, ties by index (a stable sort of the negated lengths)
    for i, n in ((int(i), int(lengths[i])) for i in np.argsort(-lengths, kind="stable")):
        smaller = fen.prefix(n - 1) if n > 0 else 0
        if smaller < fen.prefix(capacity):  # some open row has >= n left: take the tightest
            cap = fen.kth(smaller + 1)
            row = by_capacity[cap].pop()
            fen.add(cap, -1)
        else:
            cap, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        left = cap - n
        by_capacity.setdefault(left, []).append(row)
        fen.add(left, 1)
    return rows


def max_segments(rows: int, length: int) -> int:
    """The most segments `rows` packed rows of `length` can hold: every document has >= 2 tokens (it needs a label
    after its first), and each row may end in one padding segment."""
    return rows * (length // 2 + 1)


def segment_slots(segments: int, rows: int, length: int) -> int:
    """How many segments cu_seq_lens describes: `segments` rounded up to a power of two (at least 16), at most
    max_segments. Few distinct shapes, so compiled layers see 2-3 of them, not one per batch; and not the maximum
    either: flash varlen's backward allocates a float32 buffer of 128 rows per segment (dq_accum), which at
    max_segments (4 x 2048 tokens: 4,100 segments) measured +5.3 GiB on Phi-4-mini against ~20 real documents."""
    return min(max(16, 1 << max(segments - 1, 0).bit_length()), max_segments(rows, length))


def collate_packed(bins: list[list[Example]], rows: int, length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """`rows` packed rows of `length` tokens from `bins` (each a row's documents); missing rows are all padding.

    The padded tail of each row is a segment of its own, so padding neither sees nor is seen by a document.
    """
    if len(bins) > rows:
        raise ValueError(f"{len(bins)} packed rows for a micro-batch of {rows}")
    ids = torch.full((rows, length), pad_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((rows, length), dtype=torch.long)
    real = torch.zeros((rows, length), dtype=torch.bool)
    cu, source = [0], []
    for r in range(rows):
        o = 0
        for doc in bins[r] if r < len(bins) else []:
            n = len(doc.input_ids)
            if o + n > length:
                raise ValueError(f"documents of {o + n} tokens overflow a row of {length}")
            ids[r, o:o + n] = torch.tensor(doc.input_ids)
            labels[r, o + 1:o + n] = torch.tensor(doc.labels[1:])  # the first token is no target of the previous
            positions[r, o:o + n] = torch.arange(n)
            real[r, o:o + n] = True
            o += n
            cu.append(r * length + o)
            source.append(doc.row)
        if o < length:
            positions[r, o:] = torch.arange(length - o)
            cu.append((r + 1) * length)
    total = segment_slots(len(cu) - 1, rows, length)
    cu += [rows * length] * (total + 1 - len(cu))  # empty trailing segments: a few shapes for every batch
    cu_t = torch.tensor(cu, dtype=torch.int32)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "cu_seq_lens_q": cu_t,
            "cu_seq_lens_k": cu_t, "max_length_q": length, "max_length_k": length, "real_tokens": real,
            "row": torch.tensor(source, dtype=torch.long)}


def fill_fraction(bins: list[list[Example]], length: int) -> float:
    """Real tokens over the rows' capacity."""
    return sum(len(d.input_ids) for b in bins for d in b) / max(len(bins) * length, 1)


class PackedRows(Sequence):
    """The packed rows of `examples` as `plan` (pack's output) groups them: row j is built when it is drawn, so a
    run never holds every example (`examples` may be a lazy view over the tokenized store)."""

    def __init__(self, examples: Sequence[Example], plan: list[list[int]]):
        self.examples, self.plan = examples, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        return [self.examples[i] for i in self.plan[j]]


def lengths_of(examples: Sequence[Example]) -> np.ndarray:
    """Token counts of `examples`: the store's `length` column when the view has one, else counted."""
    if hasattr(examples, "lengths"):
        return examples.lengths()
    return np.array([len(e.input_ids) for e in examples], dtype=np.int64)
