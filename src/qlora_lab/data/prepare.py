"""Stage 5 (data), as a run calls it: the rows tokenized (once, through the store), checked against what
truncation did, split into training and held-out rows, and arranged into what the loop draws micro-batches of.

Ordering: this runs after the tokenizer loads and before the weights do, so a dataset the tokenizer cannot render
fails in seconds, not after a model load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from qlora_lab.core.dist import Dist
from qlora_lab.core.errors import DataError
from qlora_lab.core.spec import RunSpec
from qlora_lab.data import store
from qlora_lab.data.batching import Collator
from qlora_lab.data.packing import PackedRows, lengths_of, pack
from qlora_lab.data.rows import check_size, split_eval
from qlora_lab.data.tokenize import Example, Tokenized, check_roles

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    data: Tokenized  # every row rendered and labelled (views over the store)
    train_set: Sequence[Example]
    eval_set: Sequence[Example]
    items: Sequence  # what the loop draws micro-batches of: examples, or packed rows of them
    collator: Collator
    metrics: dict[str, Any]  # what tokenizing and truncation did, logged with step 1 and in the summary


def prepare_data(spec: RunSpec, rows: list[dict[str, Any]], rows_fingerprint: str, tokenizer, dist: Dist,
                 attention: str = "") -> Prepared:
    """`attention`: how packed rows attend (said beside the packing line)."""
    data, store_metrics = tokenized(spec, rows, rows_fingerprint, tokenizer, dist)
    train_set, eval_set = split_eval(data.examples, spec.cfg.data, spec.cfg.seed)
    items, collator = batching(spec, train_set, tokenizer.pad_token_id, dist.main, attention)
    return Prepared(data, train_set, eval_set, items, collator, {**data.metrics(), **store_metrics})


def tokenized(spec: RunSpec, rows: list[dict[str, Any]], rows_fingerprint: str, tokenizer, dist: Dist
              ) -> tuple[Tokenized, dict[str, Any]]:
    """The rows rendered and labelled, from the tokenized store (built once, or read back from data.tokenize_cache);
    what truncation did is said, and a run it would leave with too few rows (data.max_dropped_fraction, or too
    few to split and batch) is refused here, before the weights load. Returns it with the store's metrics."""
    cfg = spec.cfg
    check_roles(rows, tokenizer)
    settings = store.Settings(cfg.model.max_seq_len, cfg.data.mask_prompt, cfg.data.system_prompt, cfg.data.num_rows)
    cache = cfg.cache_dir if cfg.data.tokenize_cache else None

    def load() -> store.Outcome:
        return store.load_or_build(rows, rows_fingerprint, tokenizer, settings, cache, cfg.data.num_proc)

    if cache is None or dist.world == 1:
        outcome = load()
    else:  # rank 0 builds the store while the others wait, then they read it back: tokenized once, not N times
        outcome, failure = None, None
        if dist.main:
            try:
                outcome = load()
            except Exception as e:  # the others raise too, instead of waiting for a store that never comes
                failure = e
        why = dist.broadcast(f"{type(failure).__name__}: {failure}" if failure else None)
        if failure is not None:
            raise failure
        if why is not None:
            raise DataError(f"rank 0 could not tokenize the rows ({why})")
        outcome = outcome or load()
    if dist.main:
        log.info("data: " + outcome.line(len(rows)))
    data = store.tokenized_from(outcome.dataset, len(rows), cfg.model.max_seq_len)
    report = data.report()
    if report and dist.main:
        for line in report.splitlines():
            log.info("data: " + line)
    data.check(cfg.data)
    if data.dropped:
        check_size(len(data.examples), cfg.data, int(cfg.data.micro_batch_size), dist.world,
                   after=f" left after truncation dropped {len(data.dropped)}")
    return data, outcome.metrics()


def batching(spec: RunSpec, train_set: Sequence[Example], pad_id: int, verbose: bool, attention: str = ""
             ) -> tuple[Sequence, Collator]:
    """What the loop draws micro-batches of: the examples themselves, padded per micro-batch; or, with
    data.packing, rows of model.max_seq_len tokens packed with whole examples, micro_batch_size rows a batch,
    planned from the stored lengths and built when drawn."""
    if not spec.cfg.data.packing:
        return train_set, Collator(pad_id)
    length = spec.cfg.model.max_seq_len
    lengths = lengths_of(train_set)
    bins = pack(lengths, length)
    if verbose:
        log.info(f"packed {len(train_set)} rows into {len(bins)} rows of {length} tokens "
                 f"(fill {int(lengths.sum()) / max(len(bins) * length, 1):.1%})"
                 + (f"; attention: {attention}" if attention else ""))
        asked = spec.cfg.model.attn_implementation
        if attention and asked != "sdpa":
            log.warning(f"model.attn_implementation={asked} is not used with data.packing=true: packed rows attend "
                        f"with {attention}, which keeps documents apart; drop the key, or data.packing=false to "
                        f"run {asked}")
    return PackedRows(train_set, bins), Collator(pad_id, rows=int(spec.cfg.data.micro_batch_size), length=length)
