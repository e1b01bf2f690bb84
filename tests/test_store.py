"""The tokenized store (data/store.py): the same examples as build_examples, built once and read back while its
inputs are unchanged, rebuilt when any of them changes, never read when it is not whole."""

from __future__ import annotations

import json
import shutil

import pytest
from omegaconf import OmegaConf

from qlora_lab.core.dist import Dist
from qlora_lab.data import rows as rows_mod
from qlora_lab.data import store, tokenize
from qlora_lab.data.packing import PackedRows, lengths_of, pack
from qlora_lab.model import source
from qlora_lab.data.prepare import batching, tokenized

MAX_LEN = 48


def _rows() -> list[dict]:
    """prompt/response and messages rows; row 3 is cut at MAX_LEN, row 4 loses its whole response to it."""
    return [{"prompt": "reverse abc", "response": "cba"},
            {"messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "sort cab"},
                          {"role": "assistant", "content": "abc"}, {"role": "user", "content": "first cab"},
                          {"role": "assistant", "content": "c"}]},
            {"prompt": "copy", "response": "x" * 80},
            {"prompt": "y" * 90, "response": "z"},
            {"messages": [{"role": "user", "content": "last abc"}, {"role": "assistant", "content": "c"}],
             "extra": 3},
            *({"prompt": f"length {'a' * (i % 7 + 1)}", "response": str(i % 7 + 1)} for i in range(20))]


@pytest.fixture
def tok(compose):
    cfg = OmegaConf.to_object(compose())
    return source.load_tokenizer(source.resolve_model_path(cfg.model, cfg.cache_dir, 0), cfg.model)


def _settings(mask=True, system=None, max_len=MAX_LEN) -> store.Settings:
    return store.Settings(max_len, mask, system, 0)


def _get(rows, tok, s, cache, num_proc=1) -> store.Outcome:
    return store.load_or_build(rows, rows_mod.fingerprint(rows), tok, s, str(cache) if cache else None, num_proc)


@pytest.mark.parametrize("mask,system", [(True, None), (False, None), (True, "be brief")])
def test_the_store_holds_what_build_examples_makes(tok, tmp_path, mask, system):
    rows = _rows()
    want = tokenize.build_examples(rows, tok, MAX_LEN, mask, system)
    got = store.tokenized_from(_get(rows, tok, _settings(mask, system), tmp_path).dataset, len(rows), MAX_LEN)
    assert isinstance(got.examples, store.ExampleView)
    assert list(got.examples) == want.examples  # ids, labels, row and truncated, row for row
    assert (got.dropped, got.truncated, got.rows) == (want.dropped, want.truncated, want.rows) \
        == (([3], [2]) if mask else ([], [2, 3])) + (25,)  # unmasked, the prompt alone is something to learn
    assert got.report() == want.report() and got.metrics() == want.metrics()
    assert list(got.examples.lengths()) == [len(e.input_ids) for e in want.examples]


def test_split_and_packing_work_on_indices_and_match_the_lists(tok, tmp_path, compose):
    rows = _rows()
    d = OmegaConf.to_object(compose(["data.eval_fraction=0.2"])).data
    view = store.tokenized_from(_get(rows, tok, _settings(), tmp_path).dataset, len(rows), MAX_LEN).examples
    listed = tokenize.build_examples(rows, tok, MAX_LEN, True).examples
    (train_v, eval_v), (train_l, eval_l) = rows_mod.split_eval(view, d, 3), rows_mod.split_eval(listed, d, 3)
    assert isinstance(train_v, store.ExampleView) and isinstance(eval_v, store.ExampleView)
    assert (list(train_v), list(eval_v)) == (train_l, eval_l) and eval_l
    assert list(eval_v[:2]) == eval_l[:2] and train_v[-1] == train_l[-1]
    plan = pack(lengths_of(train_v), MAX_LEN)
    assert plan == pack([len(e.input_ids) for e in train_l], MAX_LEN)
    packed = PackedRows(train_v, plan)
    assert [packed[j] for j in range(len(packed))] == [[train_l[i] for i in row] for row in plan]


def test_a_second_run_reads_the_store_back_and_a_changed_input_misses_it(tok, tmp_path):
    rows, s = _rows(), _settings()
    first = _get(rows, tok, s, tmp_path)
    again = _get(rows, tok, s, tmp_path)
    assert (first.hit, again.hit) == (False, True) and first.path == again.path == tmp_path / "tokenized" / first.key
    assert "from cache" in again.line(len(rows)) and again.metrics()["data/tokenize_cache_hit"] == 1
    assert list(store.tokenized_from(again.dataset, len(rows), MAX_LEN).examples) == \
        list(store.tokenized_from(first.dataset, len(rows), MAX_LEN).examples)
    other_tok = tok.__class__.from_pretrained(tok.name_or_path)
    other_tok.add_tokens(["<new>"])
    changed = {"max_seq_len": _get(rows, tok, _settings(max_len=40), tmp_path),
               "system_prompt": _get(rows, tok, _settings(system="hi"), tmp_path),
               "mask_prompt": _get(rows, tok, _settings(mask=False), tmp_path),
               "data": _get(rows[:-1] + [{"prompt": "length ab", "response": "3"}], tok, s, tmp_path),
               "tokenizer": _get(rows, other_tok, s, tmp_path)}
    template = tok.__class__.from_pretrained(tok.name_or_path)
    template.chat_template = template.chat_template.replace("<|assistant|>", "<|assistant|> ")
    changed["chat_template"] = _get(rows, template, s, tmp_path)
    assert {k: o.hit for k, o in changed.items()} == dict.fromkeys(changed, False)
    assert len({first.key, *(o.key for o in changed.values())}) == 1 + len(changed)


def test_a_replaced_tokenize_row_changes_the_key_and_is_never_served_from_the_cache(tok, tmp_path, monkeypatch):
    rows, s = _rows(), _settings()
    clean = _get(rows, tok, s, tmp_path)
    seen = []

    def hooked(row, index, *args, **kwargs):  # what tests/faults/sitecustomize.py does: a side effect per row
        seen.append(index)
        return real(row, index, *args, **kwargs)

    real = tokenize.tokenize_row
    monkeypatch.setattr(tokenize, "tokenize_row", hooked)
    assert store.store_key(rows_mod.fingerprint(rows), tok, s) != clean.key
    for _ in range(2):  # every run calls the hook on every row, in this process, and writes nothing
        seen.clear()
        out = _get(rows, tok, s, tmp_path, num_proc=2)
        assert (out.hit, out.path, out.processes, out.hooked) == (False, None, 1, True)
        assert seen == list(range(len(rows)))
    assert [p.name for p in (tmp_path / "tokenized").iterdir()] == [clean.key]


def test_forked_workers_run_the_patched_tokenize_row(tok, monkeypatch):
    """datasets forks its map workers: a tokenize_row patched in this process is the one they call."""
    real = tokenize.tokenize_row

    def unmasked(row, index, tokenizer, max_len, mask_prompt, system_prompt=None):
        return real(row, index, tokenizer, max_len, False, system_prompt)

    monkeypatch.setattr(tokenize, "tokenize_row", unmasked)
    built = store.build(_rows(), tok, _settings(mask=True), num_proc=2)
    assert built["labels"] == built["input_ids"]


def test_two_processes_store_exactly_what_one_stores(tok, tmp_path):
    rows = _rows() * 40  # 1,000 rows: two shards
    one = _get(rows, tok, _settings(), None, num_proc=1)
    two = _get(rows, tok, _settings(), tmp_path, num_proc=2)
    assert two.processes == 2 and one.key == two.key
    assert one.dataset.to_dict() == two.dataset.to_dict()


def test_auto_num_proc_is_one_for_a_small_set_and_at_most_the_cpus():
    assert store.auto_num_proc(100) == 1
    assert store.auto_num_proc(10_000_000) == max(1, len(__import__("os").sched_getaffinity(0)) - 1)


@pytest.mark.parametrize("damage", ["lost_data_file", "truncated_data_file", "no_marker", "other_key"])
def test_a_store_that_is_not_whole_is_rebuilt_not_read(tok, tmp_path, damage):
    rows, s = _rows(), _settings()
    first = _get(rows, tok, s, tmp_path)
    want = first.dataset.to_dict()
    arrow = next((first.path / "data").glob("*.arrow"))
    del first
    if damage == "lost_data_file":
        arrow.unlink()
    elif damage == "truncated_data_file":
        arrow.write_bytes(arrow.read_bytes()[:200])
    elif damage == "no_marker":  # e.g. a directory copied in by hand, half way
        (tmp_path / "tokenized" / store.store_key(rows_mod.fingerprint(rows), tok, s) / store.MARKER).unlink()
    else:
        marker = next((tmp_path / "tokenized").glob(f"*/{store.MARKER}"))
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "key": "0" * 16}))
    again = _get(rows, tok, s, tmp_path)
    assert not again.hit and again.dataset.to_dict() == want
    assert _get(rows, tok, s, tmp_path).hit  # and the rebuilt one is whole


def test_a_killed_runs_temporary_dir_is_never_read(tok, tmp_path):
    rows, s = _rows(), _settings()
    first = _get(rows, tok, s, tmp_path)
    leftover = first.path.parent / f".{first.key}-killed"  # what written_into_place leaves if the process dies
    shutil.copytree(first.path, leftover)
    shutil.rmtree(first.path)
    again = _get(rows, tok, s, tmp_path)
    assert not again.hit and again.path == first.path and (first.path / store.MARKER).is_file()


def _spec(spec_of, tmp_path, overrides):
    spec = spec_of(["model.max_seq_len=48", *overrides])
    return spec.evolve("cache_dir", str(tmp_path / "cache"))


def test_the_runner_prints_and_records_what_happened(spec_of, tok, tmp_path, capsys):
    rows = _rows()
    spec = _spec(spec_of, tmp_path, ["data.micro_batch_size=2", "data.eval_fraction=0.1"])
    data, metrics = tokenized(spec, rows, rows_mod.fingerprint(rows), tok, Dist())
    out = capsys.readouterr().out
    assert "qlora-lab: data: tokenized 25 rows in " in out and "(1 process) -> " in out
    assert "1 of 25 rows dropped" in out and "1 of 25 rows truncated" in out  # the report, as before
    assert metrics["data/tokenize_cache_hit"] == 0 and metrics["data/tokenize_s"] > 0
    again, metrics = tokenized(spec, rows, rows_mod.fingerprint(rows), tok, Dist())
    assert "qlora-lab: data: tokenized rows from cache " in capsys.readouterr().out
    assert metrics["data/tokenize_cache_hit"] == 1 and metrics["data/tokenize_key"] in out
    assert list(again.examples) == list(data.examples)
    items, collator = batching(spec.evolve("data.packing", True), again.examples, tok.pad_token_id, False)
    assert isinstance(items, PackedRows) and collator.packed
    assert sorted(e.row for j in range(len(items)) for e in items[j]) == [e.row for e in data.examples]


def test_tokenize_cache_false_never_writes_the_store(spec_of, tok, tmp_path, capsys):
    rows = _rows()
    spec = _spec(spec_of, tmp_path, ["data.tokenize_cache=false", "data.micro_batch_size=2"])
    for _ in range(2):
        data, metrics = tokenized(spec, rows, rows_mod.fingerprint(rows), tok, Dist())
        assert metrics["data/tokenize_cache_hit"] == 0 and "(not cached)" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()
    assert list(data.examples) == tokenize.build_examples(rows, tok, MAX_LEN, True).examples
