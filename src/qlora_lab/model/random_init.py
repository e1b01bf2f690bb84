"""Random-init models built from a config (model=tiny, the benchmark shapes), with a tokenizer trained on the
shipped task: nothing is downloaded.

The tokenizer is a byte-level BPE trained on the shipped rows, so it can encode any text (a user's jsonl too). The
model is built from a transformers config with random weights, saved once into the cache, and then loaded through
the same `from_pretrained` path as any hub checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from qlora_lab.core.paths import TINY_DATA, building, model_whole, rebuild, written_into_place

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Each message is "<|role|>content<|end|>"; a generation prompt opens an assistant turn. Because every turn
# ends the same way, the template of a prefix of the conversation is a prefix of the whole: the data stage
# relies on this to mask prompt tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def build_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE on `texts` and save it as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def ensure_built(build: dict[str, Any], cache_dir: str | os.PathLike, name: str, seed: int = 0,
                 device: str = "cpu") -> Path:
    """Build (once) a random-init model of the config `build` with a tokenizer, and return its directory.

    On CUDA the weights are drawn on the GPU in bf16 (a 8B-parameter shape in seconds, no host copy in fp32);
    on the CPU in fp32, as the tests pin.

    The directory name carries a fingerprint of the recipe, so changing the shape builds a new one; it is built by
    one process at a time (core/paths.py `building`), under a temporary name renamed into place, so concurrent
    sweep jobs build it once and never see half a model.
    """
    import torch

    build = dict(build)
    vocab_size = int(build.get("vocab_size", 512))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    recipe = {"build": build, "seed": seed, "data": _fingerprint(TINY_DATA.read_text(encoding="utf-8"))}
    if device != "cpu":
        recipe["device"] = device
    target = Path(cache_dir) / f"{name}-{_fingerprint(recipe)}"
    if model_whole(target):
        return target
    with building(target):
        if not model_whole(target):  # (another process may have built it while this one waited)
            rebuild(target)
            _build(target, build, vocab_size, seed, device, dtype)
    return target


def _build(target: Path, build: dict[str, Any], vocab_size: int, seed: int, device: str, dtype) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with written_into_place(target) as tmp:
        rows = [json.loads(line) for line in TINY_DATA.read_text(encoding="utf-8").splitlines() if line]
        # The tokenizer never needs more entries than the model has rows; large shapes get a small one
        # (benchmarks feed random ids), which is fine for anything that does not read its text.
        build_tokenizer((r["prompt"] + " " + r["response"] for r in rows), min(vocab_size, 4096), tmp)
        model_type = build.pop("model_type")
        config = AutoConfig.for_model(model_type, **build)
        # A private RNG stream: whether the cache already existed must not change the run's random numbers.
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
            torch.manual_seed(seed)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(tmp)
        del model
        if device == "cuda":  # hand the build's blocks back: the run that follows measures its own memory
            torch.cuda.empty_cache()
