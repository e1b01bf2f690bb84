"""The embedded default: a synthetic task, a tokenizer trained on it, and a small random-init model.

Nothing here downloads anything. The task is a set of string transforms (reverse, sort, repeat, ...) on short
random words: every response is a deterministic function of its prompt, so a tiny model can learn it in a few
hundred steps and the loss visibly falls. The tokenizer is a byte-level BPE trained on the shipped rows, so it
can encode any text (a user's jsonl too). The model is built from a transformers config with random weights,
saved once, and then loaded through the same `from_pretrained` path as any hub checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

ASSET_DIR = Path(__file__).parent / "assets"
TINY_DATA = ASSET_DIR / "tiny_tasks.jsonl"

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Each message is "<|role|>content<|end|>"; a generation prompt opens an assistant turn. Because every turn
# ends the same way, the template of a prefix of the conversation is a prefix of the whole: the data stage
# relies on this to mask prompt tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_OPS = {
    "reverse": lambda w: w[::-1],
    "sort": lambda w: "".join(sorted(w)),
    "repeat": lambda w: w + w,
    "first": lambda w: w[0],
    "last": lambda w: w[-1],
    "length": lambda w: str(len(w)),
}


def generate_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` prompt/response rows of the string-transform task, the same for the same seed."""
    rng = random.Random(seed)
    letters = "abcdefghij"  # a small alphabet keeps the task learnable by a tiny model
    rows = []
    for _ in range(n):
        op = rng.choice(sorted(_OPS))
        word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
        rows.append({"prompt": f"{op} {word}", "response": _OPS[op](word)})
    return rows


def write_tiny_data(path: Path = TINY_DATA, n: int = 4000, seed: int = 0) -> None:
    """Regenerate the shipped dataset (run `python -m qlora_lab.tiny` after changing the task)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in generate_rows(n, seed):
            f.write(json.dumps(row) + "\n")


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

    The directory name carries a fingerprint of the recipe, so changing the shape builds a new one; it is
    written under a temporary name and renamed into place, so concurrent sweep jobs never see half a model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    build = dict(build)
    vocab_size = int(build.get("vocab_size", 512))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    recipe = {"build": build, "seed": seed, "data": _fingerprint(TINY_DATA.read_text(encoding="utf-8"))}
    if device != "cpu":
        recipe["device"] = device
    target = Path(cache_dir) / f"{name}-{_fingerprint(recipe)}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
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
        try:
            os.rename(tmp, target)
        except OSError:  # another job built it first: theirs is as good as ours
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    write_tiny_data()
    print(f"wrote {TINY_DATA}")
