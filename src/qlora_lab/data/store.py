"""Tokenize once, at scale: the rows rendered and labelled by `tokenize.tokenize_row` through HF `datasets` (a
batched `map` over `num_proc` processes), saved under `<cache_dir>/tokenized/<key>/` and memory-mapped back by
every later run and sweep job whose inputs are the same.

The key changes whenever the result could: the rows, the tokenizer's whole serialized state, its chat template and
special tokens, model.max_seq_len, data.mask_prompt, data.system_prompt, data.num_rows, and the code of the
`tokenize_row` in use (looked up when the key is made, so a replaced or edited one never meets a store the old one
wrote). A store is built by one process at a time (core/paths.py `building`: others wait, then read it), written
into a temporary directory beside its place and renamed there whole; one without its `store.json` (a killed run's
leftovers, a damaged copy) is never read, and a killed builder's temporary directory is removed by the next.

Downstream nothing materialises every example: `ExampleView` builds one `Example` from its Arrow row on demand,
and `split_eval` and packing work on indices and the stored `length` column.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from qlora_lab.core.errors import DataError
from qlora_lab.core.paths import building, written_into_place
from qlora_lab.data import tokenize
from qlora_lab.data.tokenize import Example, Tokenized

FORMAT = 1  # bump when the stored columns change meaning
MARKER = "store.json"  # written last, inside the temporary directory: a store without it is not whole
# data.num_proc=auto: below this many rows one process; above, a process per ROWS_PER_PROCESS rows (measured on
# 2 cores with SmolLM2's tokenizer: a forked pool costs ~1 s to start and gather, ~600 rows of tokenizing)
AUTO_MIN_ROWS = 2_000
ROWS_PER_PROCESS = 1_000


@dataclass(frozen=True)
class Settings:
    """What the stored result depends on besides the rows and the tokenizer."""

    max_len: int
    mask_prompt: bool
    system_prompt: str | None
    num_rows: int


def _code_digest(fn: Any, h: Any, seen: set) -> None:
    """Feed `fn`'s bytecode, constants and names into `h`, and those of the functions of its module it calls
    (tokenize_row's helpers), so an edited helper changes the key too. Nested code objects are hashed by content:
    their repr holds a memory address."""
    code = getattr(fn, "__code__", None)
    if code is None or code in seen:
        return
    seen.add(code)
    h.update(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}".encode())

    def walk(c: types.CodeType) -> None:
        h.update(c.co_code)
        h.update(repr(c.co_names).encode())
        for const in c.co_consts:
            walk(const) if isinstance(const, types.CodeType) else h.update(repr(const).encode())

    walk(code)
    for name in code.co_names:
        called = getattr(fn, "__globals__", {}).get(name)
        if isinstance(called, types.FunctionType) and called.__module__ == fn.__module__:
            _code_digest(called, h, seen)


def code_digest(fn: Any) -> str:
    h = hashlib.sha256()
    _code_digest(fn, h, set())
    return h.hexdigest()[:16]


def tokenizer_digest(tokenizer) -> str:
    """The tokenizer's whole state: its serialized model (fast tokenizers) or its vocabulary, its chat template,
    special tokens and name."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({"class": type(tokenizer).__name__, "name": tokenizer.name_or_path,
                         "template": tokenizer.chat_template, "eos": tokenizer.eos_token_id,
                         "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
                         "added": {str(k): str(v) for k, v in tokenizer.added_tokens_decoder.items()}},
                        sort_keys=True).encode())
    return h.hexdigest()[:16]


def store_key(rows_fingerprint: str, tokenizer, s: Settings) -> str:
    """The cache key: changes whenever the stored result could."""
    parts = {"format": FORMAT, "rows": rows_fingerprint, "tokenizer": tokenizer_digest(tokenizer),
             "code": code_digest(tokenize.tokenize_row), "max_len": s.max_len, "mask_prompt": s.mask_prompt,
             "system_prompt": s.system_prompt, "num_rows": s.num_rows}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def auto_num_proc(n_rows: int) -> int:
    """data.num_proc=auto: one process for a small set (starting workers would cost more than they save), else
    one per ROWS_PER_PROCESS rows, at most one fewer than the CPUs this process may use (on 2 vCPUs a second
    process made 20k rows slower, 112 s against 85 s: bench/results/2026-12-02_cpu_tokenize_store.md)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if n_rows < AUTO_MIN_ROWS else max(1, min(cpus - 1, n_rows // ROWS_PER_PROCESS))


def _tokenize_batch(batch: dict[str, list], tokenizer, s: Settings) -> dict[str, list]:
    """The map function: `tokenize.tokenize_row` per row, looked up at call time (the seam tests patch; forked
    workers inherit a patched module)."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "truncated": [], "kept": [], "row": []}
    for text, index in zip(batch["json"], batch["row"]):
        e = tokenize.tokenize_row(json.loads(text), index, tokenizer, s.max_len, s.mask_prompt, s.system_prompt)
        out["input_ids"].append(e.input_ids)
        out["labels"].append(e.labels)
        out["length"].append(len(e.input_ids))
        out["truncated"].append(e.truncated)
        out["kept"].append(tokenize.learns(e))  # as build_examples decides
        out["row"].append(e.row)
    return out


def build(rows: list[dict[str, Any]], tokenizer, s: Settings, num_proc: int, work_dir: Path | None = None):
    """The tokenized rows as a `datasets.Dataset` (columns input_ids, labels, length, truncated, kept, row), in
    row order whatever `num_proc`; its Arrow data goes to files under `work_dir` (None: held in memory)."""
    import datasets

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32")),
                                  "length": datasets.Value("int32"), "truncated": datasets.Value("bool"),
                                  "kept": datasets.Value("bool"), "row": datasets.Value("int64")})
    # JSON text, not Arrow structs: rows of other shapes (messages vs prompt/response, extra keys) share a column
    source = datasets.Dataset.from_dict({"json": [json.dumps(r) for r in rows], "row": list(range(len(rows)))})
    with _quiet():
        return source.map(_tokenize_batch, batched=True, batch_size=256, fn_kwargs={"tokenizer": tokenizer, "s": s},
                          remove_columns=["json"], features=features, num_proc=num_proc if num_proc > 1 else None,
                          keep_in_memory=work_dir is None, new_fingerprint="qlora-lab-tokenize",
                          cache_file_name=str(work_dir / "map.arrow") if work_dir is not None else None)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """datasets' progress bars off: the run prints one line saying what happened."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            datasets.enable_progress_bars()


def _valid(path: Path, key: str, n_rows: int):
    """The store at `path` if it is whole and holds `n_rows` rows for `key`, else None."""
    import datasets

    try:
        meta = json.loads((path / MARKER).read_text())
        if meta.get("key") != key or meta.get("rows") != n_rows:
            return None
        ds = datasets.load_from_disk(str(path / "data"))
        return ds if ds.num_rows == n_rows and {"input_ids", "labels", "length", "kept"} <= set(ds.column_names) \
            else None
    except (OSError, ValueError, KeyError, FileNotFoundError):
        return None


@dataclass
class Outcome:
    """What happened: the store, and how it was come by (for the console line and the run's metrics)."""

    dataset: Any
    key: str
    path: Path | None  # None: not cached
    hit: bool
    seconds: float
    processes: int
    hooked: bool  # tokenize.tokenize_row was replaced at run time: tokenized in this process, not cached

    def line(self, n_rows: int) -> str:
        if self.hit:
            return f"tokenized rows from cache {self.path} (key {self.key}, {self.seconds:.1f} s)"
        where = f" -> {self.path}" if self.path else \
            " (tokenize_row is replaced by a hook: not cached)" if self.hooked else " (not cached)"
        return (f"tokenized {n_rows:,} rows in {self.seconds:.1f} s ({self.processes} process"
                f"{'es' if self.processes > 1 else ''}){where}")

    def metrics(self) -> dict[str, Any]:
        return {"data/tokenize_cache_hit": int(self.hit), "data/tokenize_s": self.seconds,
                "data/tokenize_processes": self.processes, "data/tokenize_key": self.key}


def load_or_build(rows: list[dict[str, Any]], rows_fingerprint: str, tokenizer, s: Settings, cache_dir: str | None,
                  num_proc: int | str) -> Outcome:
    """The store for these rows: from `<cache_dir>/tokenized/<key>/` when it is there and whole, else built (and
    written there, when `cache_dir` is given)."""
    t0 = time.perf_counter()
    key = store_key(rows_fingerprint, tokenizer, s)
    procs = auto_num_proc(len(rows)) if num_proc == "auto" else int(num_proc)
    hooked = tokenize.tokenize_row is not tokenize.OWN_TOKENIZE_ROW
    if hooked:  # a hook's side effects happen in this process, on every run: no cache, no workers
        cache_dir, procs = None, 1
    if cache_dir is None:
        built = build(rows, tokenizer, s, procs)
        return Outcome(built, key, None, False, time.perf_counter() - t0, procs, hooked)
    target = Path(cache_dir).expanduser().resolve() / "tokenized" / key
    ds = _valid(target, key, len(rows)) if target.exists() else None
    if ds is not None:
        return Outcome(ds, key, target, True, time.perf_counter() - t0, 0, False)
    with building(target):  # one process builds it; another that waited finds it whole
        ds = _valid(target, key, len(rows)) if target.exists() else None
        if ds is not None:
            return Outcome(ds, key, target, True, time.perf_counter() - t0, 0, False)
        shutil.rmtree(target, ignore_errors=True)  # only a whole store is renamed into place: this one broke later
        _write(rows, tokenizer, s, procs, target, key)
    ds = _valid(target, key, len(rows))
    if ds is None:
        raise DataError(f"the tokenized store {target} could not be read back after writing it; remove it and "
                        "run again, or set data.tokenize_cache=false")
    return Outcome(ds, key, target, False, time.perf_counter() - t0, procs, False)


def _write(rows: list[dict[str, Any]], tokenizer, s: Settings, procs: int, target: Path, key: str) -> None:
    with written_into_place(target, whole=MARKER) as tmp:
        built = build(rows, tokenizer, s, procs, work_dir=tmp / "work")
        with _quiet():
            built.save_to_disk(str(tmp / "data"))
        del built
        shutil.rmtree(tmp / "work", ignore_errors=True)
        (tmp / MARKER).write_text(json.dumps({"key": key, "rows": len(rows), "format": FORMAT}))


class ExampleView(Sequence):
    """A read-only sequence of `Example`s over rows `indices` of a store: each built on demand from its Arrow row."""

    def __init__(self, dataset, indices: np.ndarray, all_lengths: np.ndarray | None = None):
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        table = dataset.data  # the Arrow table (memory-mapped when loaded from disk); rows in stored order
        self._ids, self._labels = table.column("input_ids"), table.column("labels")
        self._row, self._truncated = table.column("row"), table.column("truncated")
        self._all_lengths = table.column("length").to_numpy() if all_lengths is None else all_lengths

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ExampleView(self.dataset, self.indices[i], self._all_lengths)
        j = int(self.indices[i])
        return Example(self._ids[j].as_py(), self._labels[j].as_py(), self._row[j].as_py(),
                       truncated=self._truncated[j].as_py())

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def select(self, positions: Sequence[int]) -> "ExampleView":
        """The examples at `positions` of this view, as a view."""
        return ExampleView(self.dataset, self.indices[np.asarray(positions, dtype=np.int64)], self._all_lengths)

    def lengths(self) -> np.ndarray:
        """Token counts of the examples, from the stored `length` column (nothing decoded)."""
        return self._all_lengths[self.indices]


def tokenized_from(dataset, n_rows: int, max_len: int) -> Tokenized:
    """A `Tokenized` over the store: the kept rows as a lazy view; dropped and truncated rows from the columns, as
    build_examples reports them."""
    table = dataset.data
    kept = table.column("kept").to_numpy(zero_copy_only=False)
    truncated = table.column("truncated").to_numpy(zero_copy_only=False)
    row = table.column("row").to_numpy()
    if not kept.any():
        raise tokenize.nothing_to_learn(max_len)
    return Tokenized(ExampleView(dataset, np.flatnonzero(kept)), n_rows, row[~kept].tolist(),
                     row[kept & truncated].tolist(), max_len)
