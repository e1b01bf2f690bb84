"""Serving a run's adapter as it is, unmerged: what vLLM's LoRA loader reads from adapter/, and the command.

vLLM (`vllm serve BASE --enable-lora --lora-modules NAME=RUN/adapter`) reads adapter_config.json into its
PEFTHelper (required: r, lora_alpha, target_modules; refused: use_dora, modules_to_save, a bias other than "none", a
rank above --max-lora-rank, 16 by default) and the LoRA tensors from adapter_model.safetensors, named
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`. The base it serves is the 16-bit one (the adapter on
the original weights, like `--merge-into original`); `--quantization bitsandbytes` serves it on a 4-bit base, as it
was trained.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qlora_lab.export.inputs import ADAPTER_WEIGHTS, adapter_shapes

VLLM_DEFAULT_MAX_RANK = 16
REQUIRED = ("r", "lora_alpha", "target_modules")


def vllm_problems(adapter_dir: Path) -> list[str]:
    """Why vLLM's LoRA loader would refuse this adapter dir ([] when it loads it as it is)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    problems = [f"adapter_config.json lacks {k}" for k in REQUIRED if k not in config]
    if config.get("use_dora"):
        problems.append("it is a DoRA adapter (lora.use_dora=true), which vLLM does not load; merge it instead "
                        "(qlora-lab export)")
    if config.get("modules_to_save"):
        problems.append(f"it saves whole modules ({config['modules_to_save']}), which vLLM does not load")
    if config.get("bias", "none") != "none":
        problems.append(f"it trains biases (bias={config['bias']}), which vLLM does not load")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        problems.append(f"{ADAPTER_WEIGHTS} is missing")
        return problems
    odd = [k for k in adapter_shapes(adapter_dir) if not k.startswith("base_model.model.")
           or not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))]
    if odd:
        problems.append(f"{len(odd)} tensor(s) are not LoRA A/B weights (first: {odd[0]}), which vLLM does not load")
    return problems


def vllm_command(base: str, adapter_dir: Path, name: str, rank: int) -> str:
    """`name` becomes the model name clients ask for; vLLM splits `--lora-modules` on `=`, so it is kept plain."""
    name = re.sub(r"[^\w.-]+", "-", f"{name}-lora").strip("-")
    extra = f" --max-lora-rank {rank}" if rank > VLLM_DEFAULT_MAX_RANK else ""
    return f"vllm serve {base} --enable-lora --lora-modules {name}={adapter_dir}{extra}"
