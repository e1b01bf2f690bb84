"""Stage 7 (save): the adapter in PEFT format, the tokenizer, and what it takes to re-create the run."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import hashlib
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from qlora_lab.distributed import Dist, adapter_state

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers",
            "hydra-core", "omegaconf", "wandb", "qlora-lab")


def save_adapter(model, tokenizer, out_dir: Path, dist: Dist = Dist()) -> Path:
    """`PeftModel.from_pretrained(base, out_dir / "adapter")` loads what this writes.

    Written next to its final place and renamed into it, so a failed write (a full disk) leaves any earlier
    adapter whole and no half-written one. Every process calls it (FSDP gathers the shards); rank 0 writes.
    """
    target, tmp, old = out_dir / "adapter", out_dir / ".adapter.tmp", out_dir / ".adapter.old"
    tensors = adapter_state(model, dist) if dist.fsdp else None  # gathered whole: shards cannot be saved as such
    if not dist.main:
        return target
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=tensors)
        tokenizer.save_pretrained(tmp)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        from qlora_lab.checkpoint import CheckpointError, valid_checkpoints

        kept = valid_checkpoints(out_dir)
        raise CheckpointError(f"writing the adapter to {target} failed ({type(e).__name__}: {e}); free space and "
                              + (f"rerun with resume=auto (checkpoint {kept[-1].name} is whole)" if kept else
                                 "rerun")) from e
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
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


def lock_info(root: Path = Path(__file__).resolve().parents[2]) -> dict[str, Any] | None:
    """The uv.lock of the checkout this code runs from: its sha256, and the installed packages whose version is not
    the one it pins (none when the environment was made with `uv sync --locked`). None outside a checkout."""
    lock = root / "uv.lock"
    if not lock.is_file():
        return None
    raw = lock.read_bytes()
    pinned: dict[str, set[str]] = {}
    for pkg in tomllib.loads(raw.decode()).get("package", []):
        if "version" in pkg:  # a platform or Python fork may pin several versions of one package
            pinned.setdefault(pkg["name"], set()).add(pkg["version"])
    differ = {name: {"installed": v, "locked": sorted(pinned[name])} for name, v in _versions().items()
              if v is not None and name in pinned and v not in pinned[name]}
    return {"sha256": hashlib.sha256(raw).hexdigest(), "matches_installed": not differ, "differences": differ}


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
                   dataset_fingerprint: str, model_path: str, processes: int = 1) -> None:
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
        "uv_lock": lock_info(),
        "device": device_info(device),
        "processes": processes,
        "dataset_fingerprint": dataset_fingerprint,
        "model_path": model_path,
        "config": config,
    }
    (out_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str))


def record_resume(out_dir: Path, *, checkpoint: Path, step: int, overrides: list[str],
                  differences: list[str]) -> None:
    """Add this resume to run_info.json's `resumes`: from where, with which command and config differences."""
    path = out_dir / "run_info.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    commit = _git("rev-parse", "HEAD")
    info.setdefault("resumes", []).append({
        "checkpoint": str(checkpoint), "step": step, "overrides": overrides, "config_differences": differences,
        "git_commit": commit.strip() if commit else None, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    path.write_text(json.dumps(info, indent=2, default=str))
