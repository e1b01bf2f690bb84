"""Rows are checked before any model loads, rendered with the chat template, and prompts masked."""

from __future__ import annotations

import json
import re

import pytest
from omegaconf import OmegaConf

from qlora_lab.core.errors import DataError
from qlora_lab.data import batching, rows, tokenize
from qlora_lab.data.tokenize import IGNORE_INDEX
from qlora_lab.model import source
from qlora_lab.runner.run import run


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read(compose, path):
    return rows.read_rows(OmegaConf.to_object(compose(["data=jsonl", f"data.path={path}"])).data)


def test_rows_missing_fields_are_named_by_row(compose, tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a"},
                                        {"question": "q", "answer": "a"}, {"prompt": 3, "response": "x"},
                                        {"prompt": "a", "response": ""}, ["not", "an", "object"]])
    with pytest.raises(DataError) as e:
        read(compose, path)
    msg = str(e.value)
    assert "5 bad row(s)" in msg
    assert "row 2 lacks 'response'" in msg
    assert "row 3 lacks 'prompt' and 'response'" in msg and "['answer', 'question']" in msg
    assert "row 4 has 'prompt' of type int" in msg
    assert "row 5 has an empty (or whitespace-only) 'response'" in msg
    assert "row 6 is a list" in msg


def test_messages_rows_are_checked(compose, tmp_path):
    path = write(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]},
                                        {"messages": [{"role": "user"}]}])
    with pytest.raises(DataError) as e:
        read(compose, path)
    assert "row 1 has no non-empty assistant message" in str(e.value)
    assert "row 2 message 0 is not an object" in str(e.value)


def test_invalid_json_and_encoding_name_the_line(compose, tmp_path):
    bad_json = tmp_path / "a.jsonl"
    bad_json.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read(compose, bad_json)
    bad_json.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "x\ty", "response": "b"}\n')  # a raw tab
    with pytest.raises(DataError, match=r"line 2 is not valid JSON \(Invalid control character at column 14\); each "
                                        r"line must be one object \(inside a string a tab is written \\t"):
        read(compose, bad_json)
    bad_utf8 = tmp_path / "b.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(DataError, match="line 2 is not valid UTF-8"):
        read(compose, bad_utf8)


def test_empty_dataset(compose, tmp_path):
    with pytest.raises(DataError, match="has no rows"):
        read(compose, write(tmp_path / "d.jsonl", ["", "  "]))


def _tokenizer(compose):
    cfg = OmegaConf.to_object(compose())
    return source.load_tokenizer(source.resolve_model_path(cfg.model, cfg.cache_dir, 0), cfg.model)


def test_prompt_masking_labels_only_the_response(compose):
    tok = _tokenizer(compose)
    ex = tokenize.tokenize_row({"prompt": "reverse abc", "response": "cba"}, 0, tok, 64, mask_prompt=True)
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tok.decode(labelled) == "cba<|end|>"
    assert tok.decode(ex.input_ids) == "<|user|>reverse abc<|end|><|assistant|>cba<|end|>"
    unmasked = tokenize.tokenize_row({"prompt": "reverse abc", "response": "cba"}, 0, tok, 64, mask_prompt=False)
    assert unmasked.labels == unmasked.input_ids


def test_multi_turn_masks_every_non_assistant_turn(compose):
    tok = _tokenizer(compose)
    row = {"messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "sort cab"},
                        {"role": "assistant", "content": "abc"}, {"role": "user", "content": "first cab"},
                        {"role": "assistant", "content": "c"}]}
    ex = tokenize.tokenize_row(row, 0, tok, 128, mask_prompt=True)
    spans, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    spans += [tok.decode(cur)] if cur else []
    assert spans == ["abc<|end|>", "c<|end|>"]


def test_messages_without_chat_template_is_refused(compose):
    tok = _tokenizer(compose)
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize.tokenize_row({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
                          0, tok, 64, True)
    ex = tokenize.tokenize_row({"prompt": "ab", "response": "cd"}, 0, tok, 64, True)  # falls back to plain text
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "cd<|end|>"


def test_truncation_that_drops_every_response_is_an_error(compose):
    tok = _tokenizer(compose)
    with pytest.raises(DataError, match="raise it"):
        tokenize.build_examples([{"prompt": "reverse abcdef", "response": "fedcba"}], tok, 3, True)


def test_collate_pads_and_masks(compose):
    tok = _tokenizer(compose)
    exs = tokenize.build_examples([{"prompt": "sort ba", "response": "ab"},
                                   {"prompt": "reverse abcdef", "response": "fedcba"}], tok, 64, True).examples
    b = batching.collate(exs, tok.pad_token_id)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    short = len(exs[0].input_ids)
    assert (b["attention_mask"][0, short:] == 0).all() and (b["labels"][0, short:] == IGNORE_INDEX).all()
    assert (b["input_ids"][0, short:] == tok.pad_token_id).all()


def test_batch_order_is_a_function_of_seed_and_epoch(compose):
    tok = _tokenizer(compose)
    rows = [{"prompt": f"first {w}", "response": w[0]} for w in ("abc", "bcd", "cde", "def", "efg")]
    exs = tokenize.build_examples(rows, tok, 64, True).examples
    order = lambda s, e: [exs[i].row for i in batching.epoch_order(len(exs), True, s, e)]  # noqa: E731
    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 1)) == list(range(5))
    assert order(0, 0) != order(0, 1) or order(0, 0) != order(1, 0)


# ---- what truncation and the eval split do to the rows is said, never silent ----

def _long(i: int) -> dict:
    return {"prompt": "reverse " + " ".join(["abcdefgh"] * 40) + f" {i}", "response": "x"}


def test_rows_truncated_away_are_counted_named_and_refused_past_the_limit(compose):
    tok = _tokenizer(compose)
    rows_ = [{"prompt": f"first ab{i}", "response": "a"} for i in range(17)]
    for i in (2, 5, 11):
        rows_[i] = _long(i)
    rows_.append({"prompt": "sort dcba", "response": "abcd " * 20})  # kept, cut short
    data = tokenize.build_examples(rows_, tok, 64, True)
    assert (data.rows, data.dropped, data.truncated) == (18, [2, 5, 11], [17])
    assert data.metrics() == {"data/rows": 18, "data/dropped_rows": 3, "data/truncated_rows": 1}
    assert "3 of 18 rows dropped: no response token within model.max_seq_len=64 (rows 3, 6, 12)" in data.report()
    assert "1 of 18 rows truncated to model.max_seq_len=64 tokens (row 18)" in data.report()
    d = OmegaConf.to_object(compose()).data
    with pytest.raises(DataError, match=r"3 of 18 rows \(16.7%\) have no response token .* raise model.max_seq_len"):
        data.check(d)
    data.check(OmegaConf.to_object(compose(["data.max_dropped_fraction=0.2"])).data)


def test_one_huge_row_is_dropped_with_its_row_number(compose):
    tok = _tokenizer(compose)
    rows_ = [{"prompt": f"first ab{i}", "response": "a"} for i in range(40)]
    rows_.insert(7, {"prompt": "x" * 100_000, "response": "y"})
    data = tokenize.build_examples(rows_, tok, 64, True)
    assert data.dropped == [7] and "(row 8)" in data.report()
    data.check(OmegaConf.to_object(compose()).data)  # 1 of 41 is under data.max_dropped_fraction=0.05: a warning


def test_most_rows_truncated_away_refuses_the_run_before_loading(compose, tmp_path, capsys):
    """The reported case: 195 of 200 rows lose their response to truncation; it was '5 train / 0 eval rows', eval
    loss NaN, exit 0. Now refused after tokenizing, before the weights load, and with the limit lifted the empty
    eval split is refused too."""
    path = write(tmp_path / "d.jsonl", [_long(i) for i in range(195)] +
                 [{"prompt": f"first ab{i}", "response": "a"} for i in range(5)])
    base = ["data=jsonl", f"data.path={path}", "data.micro_batch_size=2", "logger=none"]
    with pytest.raises(DataError, match=r"195 of 200 rows \(97.5%\)"):
        run(compose(base, out=tmp_path / "a"))
    assert "195 of 200 rows dropped" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["summary/status"] == "failed_config"
    assert not (tmp_path / "a" / "metrics.jsonl").is_file() or not (tmp_path / "a" / "metrics.jsonl").read_text()
    with pytest.raises(DataError, match="5 rows left after truncation dropped 195.*holds out no row"):
        run(compose(base + ["data.max_dropped_fraction=1"], out=tmp_path / "b"))


def test_eval_split_that_holds_no_row_is_refused(compose, tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(12)])
    d = OmegaConf.to_object(compose(["data=jsonl", f"data.path={path}"])).data
    with pytest.raises(DataError, match="data.eval_fraction=0.05 of them holds out no row.*data.eval_fraction=0 "):
        rows.check_size(12, d, 4)
    rows.check_size(12, OmegaConf.to_object(compose(["data=jsonl", f"data.path={path}",
                                                     "data.eval_fraction=0"])).data, 4)


def test_a_one_row_dataset_gets_both_problems_at_once(compose, tmp_path):
    """Too few rows for a micro-batch and for an eval row: both named in one refusal (the second used to appear
    only once the first was fixed), and no fix that cannot work (raising eval_fraction of 1 row leaves none)."""
    path = write(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    d = OmegaConf.to_object(compose(["data=jsonl", f"data.path={path}"])).data
    with pytest.raises(DataError) as e:
        rows.check_size(1, d, 16)
    msg = str(e.value)
    assert msg.startswith("the dataset has 1 row, ") and "set data.micro_batch_size<=1 or add rows" in msg
    assert "holds out no row" in msg and "set data.eval_fraction=0" in msg and "raise data.eval_fraction" not in msg


def test_num_rows_takes_the_first_rows(compose):
    d = OmegaConf.to_object(compose(["data.num_rows=50"])).data
    taken = rows.read_rows(d)
    assert len(taken) == 50 and taken == rows.read_rows(OmegaConf.to_object(compose()).data)[:50]


def test_utf8_bom_and_tilde_path_are_read(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "d.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\n')
    # Quoted (Hydra's grammar refuses a bare ~), and the shell leaves ~ after key= alone: expanded here
    assert read(compose, '"~/d.jsonl"') == [{"prompt": "a", "response": "b"}]


def test_json_array_file_names_the_conversion(compose, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "a", "response": "b"}], indent=1))
    with pytest.raises(DataError, match=r"looks like a JSON array: convert it to JSON lines with jq -c '\.\[\]'"):
        read(compose, path)
    path.write_text(json.dumps([{"prompt": "a", "response": "b"}]))  # the array on one line
    with pytest.raises(DataError, match=r"row 1 is a list, not a JSON object \(a JSON array file\?"):
        read(compose, path)


def test_chat_template_that_refuses_a_row_names_it(compose):
    tok = _tokenizer(compose)
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(DataError, match="row 4: the tokenizer's chat template refuses it .Conversation roles must"):
        tokenize.tokenize_row({"messages": [{"role": "assistant", "content": "y"}]}, 3, tok, 64, True)


def test_whitespace_only_answers_are_bad_rows(compose, tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "a", "response": "  \n"},
                                        {"messages": [{"role": "user", "content": "a"},
                                                      {"role": "assistant", "content": " "}]}])
    with pytest.raises(DataError) as e:
        read(compose, path)
    assert "row 1 has an empty (or whitespace-only) 'response'" in str(e.value)
    assert "row 2 has no non-empty assistant message" in str(e.value)


@pytest.mark.parametrize("head,needle", [(b"\x1f\x8b\x08\x00", "is gzip-compressed; decompress it first (gunzip -k"),
                                         (b"PAR1", "is a Parquet file; write its rows as JSON lines"),
                                         (b"PK\x03\x04", "is a zip archive")], ids=["gzip", "parquet", "zip"])
def test_compressed_or_binary_files_are_named(compose, tmp_path, head, needle):
    path = tmp_path / "train.jsonl"
    path.write_bytes(head + bytes(range(256)))
    with pytest.raises(DataError, match=re.escape(needle)):  # not "line 1 is not valid UTF-8; re-encode"
        read(compose, path)
