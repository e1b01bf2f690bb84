"""Evaluation: task metrics on hand-made cases, generation that pads and stops right, prompts rendered as trained."""

from __future__ import annotations

import pytest
import torch

from qlora_lab.core.schema import Metric
from qlora_lab.evaluation.generate import generate, prompts_of, stop_token_ids
from qlora_lab.evaluation import metrics as metrics_mod
from qlora_lab.evaluation.metrics import METRICS, better, char_f1, exact_match, goal, rouge_l, score, token_f1


@pytest.mark.parametrize("name", sorted(n for n, m in METRICS.items() if m.score is not None))
def test_a_perfect_answer_scores_one_and_a_wrong_one_zero(name):
    fn = METRICS[name].score
    assert fn("Paris", "Paris") == 1.0 and fn("  Paris \n", "Paris") == 1.0  # surrounding whitespace is no error
    assert fn("xyz", "Paris") == 0.0


def test_partial_answers_score_what_they_share():
    assert exact_match("the cat sat", "the cat") == 0.0
    assert token_f1("a b c", "a b d") == pytest.approx(2 / 3)  # 2 shared tokens: precision = recall = 2/3
    assert token_f1("c b a", "a b c") == 1.0  # order-free
    assert rouge_l("a b c d", "a c d") == pytest.approx(6 / 7)  # LCS 3: precision 3/4, recall 1
    assert rouge_l("c b a", "a b c") == pytest.approx(1 / 3)  # order matters: LCS 1
    assert char_f1("abd", "abc") == pytest.approx(2 / 3)
    assert score(["a", "b"], ["a", "c"], ["exact_match", "token_f1"]) == {"exact_match": 0.5, "token_f1": 0.5}


def test_every_configurable_metric_is_implemented_with_its_direction():
    assert {m.value for m in Metric} == set(METRICS)
    assert {n: m.goal for n, m in METRICS.items()} == {"loss": "min", "exact_match": "max", "token_f1": "max",
                                                       "rouge_l": "max", "char_f1": "max"}
    assert goal("summary/best_eval_token_f1") == "max" and goal("summary/final_loss") == "min"
    assert goal("eval/loss") == "min" and goal("memory/peak_allocated_gib") is None


def test_a_metric_that_falls_ranks_by_its_declaration_not_its_name(monkeypatch):
    """A perplexity declared with goal min is ranked lower-is-better though its name does not say so."""
    monkeypatch.setitem(METRICS, "perplexity", metrics_mod.Metric("min"))
    assert goal("summary/eval_perplexity") == "min" and better("eval/perplexity", 3.0, 4.0)
    assert not better("eval/exact_match", 0.3, 0.4)


def test_prompts_are_the_conversation_up_to_the_answer(tiny):
    _, _, tok, _ = tiny()
    rows = [{"prompt": "first abc", "response": "a"},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "last abc"},
                          {"role": "assistant", "content": "c"}]}]
    p = prompts_of(rows, [0, 1], tok)
    assert p[0].text == "<|user|>first abc<|end|><|assistant|>" and p[0].reference == "a"
    assert p[1].text == "<|system|>be brief<|end|><|user|>last abc<|end|><|assistant|>" and p[1].reference == "c"
    assert tok.convert_tokens_to_ids("<|end|>") in stop_token_ids(tok, None)


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    """Left padding: a short prompt batched with long ones generates what it generates alone (right padding would
    put pad tokens between the prompt and its answer)."""
    _, model, tok, _ = tiny(["lora.dropout=0"])
    for name, p in model.named_parameters():  # a model that writes something, so the comparison has content
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.3
    texts = [p.text for p in prompts_of([{"prompt": w, "response": "x"} for w in
                                         ("first a", "length abcdefghij", "last abcdef ghij abc")], [0, 1, 2], tok)]
    stops = stop_token_ids(tok, model)
    together = generate(model, tok, texts, batch_size=3, max_new_tokens=6, device="cpu", stop_ids=stops)
    alone = [generate(model, tok, [t], batch_size=1, max_new_tokens=6, device="cpu", stop_ids=stops)[0] for t in texts]
    assert together == alone
    assert tok.padding_side == "right"  # restored for training
