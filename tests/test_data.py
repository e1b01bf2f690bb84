"""Rows are checked before any model loads, rendered with the chat template, and prompts masked."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from qlora_lab.core.errors import DataError
from qlora_lab.data import batching, rows, tokenize
from qlora_lab.data.tokenize import IGNORE_INDEX
from qlora_lab.model import source


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
    assert "row 5 has an empty 'response'" in msg
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
                               {"prompt": "reverse abcdef", "response": "fedcba"}], tok, 64, True)
    b = batching.collate(exs, tok.pad_token_id)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    short = len(exs[0].input_ids)
    assert (b["attention_mask"][0, short:] == 0).all() and (b["labels"][0, short:] == IGNORE_INDEX).all()
    assert (b["input_ids"][0, short:] == tok.pad_token_id).all()


def test_batch_order_is_a_function_of_seed_and_epoch(compose):
    tok = _tokenizer(compose)
    rows = [{"prompt": f"first {w}", "response": w[0]} for w in ("abc", "bcd", "cde", "def", "efg")]
    exs = tokenize.build_examples(rows, tok, 64, True)
    order = lambda s, e: [exs[i].row for i in batching.epoch_order(len(exs), True, s, e)]  # noqa: E731
    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 1)) == list(range(5))
    assert order(0, 0) != order(0, 1) or order(0, 0) != order(1, 0)
