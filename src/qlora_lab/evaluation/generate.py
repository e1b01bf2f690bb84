"""Greedy, batched generation with the KV cache, for scoring what a model writes for held-out prompts.

Two traps peers fall into are handled here: prompts are padded on the left (right padding puts pad tokens between
the prompt and the first generated token, and the model then continues from padding), and generation stops at
every token that ends a turn in the chat template, not only the tokenizer's eos (SmolLM2 ends a turn with
<|im_end|>, Llama-3 with <|eot_id|>).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qlora_lab.data.tokenize import to_messages
from qlora_lab.model.layers import eager_layers

# Special tokens that end an assistant turn in common chat templates (the tiny model's template ends with <|end|>).
END_OF_TURN = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<end_of_turn>")


@dataclass
class Prompt:
    row: int  # index of the source row
    text: str  # what the model is given: the conversation up to the last assistant turn, that turn opened
    reference: str  # the last assistant message: what the model should write


def prompts_of(rows: list[dict[str, Any]], indices: list[int], tokenizer, system_prompt: str | None = None,
               ) -> list[Prompt]:
    """The generation prompt and reference of each row in `indices`, rendered as training renders them."""
    out = []
    for i in indices:
        messages = to_messages(rows[i], system_prompt)
        last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
        if tokenizer.chat_template is None:  # prompt/response rows trained as plain text: the prompt, then the answer
            text = rows[i]["prompt"]
        else:
            text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        out.append(Prompt(i, text, messages[last]["content"]))
    return out


def stop_token_ids(tokenizer, model) -> list[int]:
    """Every token id that ends a turn: the tokenizer's eos, the model's generation eos, the template's end marks."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    special = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    ids.update(tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN if t in special)
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


@torch.no_grad()
def generate(model, tokenizer, texts: list[str], *, batch_size: int, max_new_tokens: int, device: str,
             stop_ids: list[int], synced: bool = False) -> list[str]:
    """The greedy continuation of each text, cut at the first stop token, decoded without special tokens.

    `synced` keeps every process stepping until all are done (FSDP gathers weights in each forward, so one
    process stopping early would leave the others waiting on it).
    """
    ids = greedy_ids(model, tokenizer, texts, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device,
                     stop_ids=stop_ids, synced=synced)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]


@torch.no_grad()
def greedy_ids(model, tokenizer, texts: list[str], *, batch_size: int, max_new_tokens: int, device: str,
               stop_ids: list[int], synced: bool = False) -> list[list[int]]:
    """`generate`'s token ids before decoding (the stop token not included): what the export check teacher-forces
    two models on, so that it compares their logits along the exact greedy path."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        with eager_layers():
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
                ids = model.generate(**enc, generation_config=config, synced_gpus=synced)
                for row in ids[:, enc["input_ids"].shape[1]:].tolist():
                    cut = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
                    out.append(row[:cut])
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
