"""Stage 7 (save): the adapter in PEFT format, the tokenizer, and what it takes to re-create the run."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers",
            "hydra-core", "omegaconf", "wandb", "qlora-lab")


def save_adapter(model, tokenizer, out_dir: Path) -> Path:
    """`PeftModel.from_pretrained(base, out_dir / "adapter")` loads what this writes."""
    target = out_dir / "adapter"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device, "platform": platform.platform(), "python": platform.python_version()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 1024**3,
                    cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def write_run_info(out_dir: Path, *, config: dict[str, Any], overrides: list[str], device: str,
                   dataset_fingerprint: str, model_path: str) -> None:
    """run_info.json (+ git_diff.patch when the tree is dirty): enough to re-create this run."""
    commit = _git("rev-parse", "HEAD")
    diff = _git("diff", "HEAD")
    if diff:
        (out_dir / "git_diff.patch").write_text(diff)
    info = {
        "command": "python train.py " + " ".join(overrides),
        "overrides": overrides,
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(diff),
        "packages": _versions(),
        "device": device_info(device),
        "dataset_fingerprint": dataset_fingerprint,
        "model_path": model_path,
        "config": config,
    }
    (out_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
