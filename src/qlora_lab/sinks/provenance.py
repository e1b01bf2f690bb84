"""run_info.json: what it takes to re-create a run (command, resolved config, code, environment, data); never a
credential (core/scrub.py: redacted, so a re-created run takes it from the environment again)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from qlora_lab.core.files import read_json
from qlora_lab.core.scrub import scrub, scrub_text
from qlora_lab.core.spec import RunSpec

CHECKOUT = Path(__file__).resolve().parents[3]  # src/qlora_lab/sinks/ -> the repository (an editable install)

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "torchao", "accelerate", "datasets", "tokenizers",
            "hydra-core", "omegaconf", "wandb", "mlflow-skinny", "qlora-lab")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True, timeout=10,
                             check=True)
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


def lock_info(root: Path = CHECKOUT) -> dict[str, Any] | None:
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
        info.update(cpu=cpu_name(), cpu_threads=torch.get_num_threads())
    return info


def cpu_name() -> str:
    """The CPU's model name (what a CPU-measured number was measured on): /proc/cpuinfo's, else the platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_run_info(out_dir: Path, spec: RunSpec, *, dataset_fingerprint: str, model_path: str,
                   sink_ids: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
    """run_info.json (+ git_diff.patch when the tree is dirty): enough to re-create this run. The config is the
    resolved one (what ran); `resolved` says which values were `auto` and what they became; `sink_ids` (each
    sink's run id) let a restart before the first checkpoint continue the same runs. A restart keeps the earlier `resumes`."""
    path = out_dir / "run_info.json"
    earlier = _read(path).get("resumes", []) if path.is_file() else []
    overrides = list(spec.overrides)
    commit = _git("rev-parse", "HEAD")
    diff = _git("diff", "HEAD")
    if diff:  # credentials in an uncommitted change are redacted too (the patch then may not apply there)
        (out_dir / "git_diff.patch").write_text(scrub_text(diff))
    info = {
        "command": "python train.py " + " ".join(overrides),
        "overrides": overrides,
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(diff),
        "packages": _versions(),
        "uv_lock": lock_info(),
        "device": device_info(spec.device),
        "processes": spec.processes,
        "dataset_fingerprint": dataset_fingerprint,
        "model_path": model_path,
        "resolved": spec.resolved,
        "config": spec.config(),
        "sink_ids": dict(sink_ids or {}),
    }
    info.update(extra or {})
    if earlier:
        info["resumes"] = earlier
    path.write_text(json.dumps(scrub(info), indent=2, default=str))


def _read(path: Path) -> dict[str, Any]:
    return read_json(path, f"it is not a run_info.json qlora-lab wrote whole; move it out of {path.parent} and run "
                           "the command again (its resumes are then no longer listed)")


def recorded_sink_ids(out_dir: Path) -> dict[str, str]:
    """Each sink's run id that run_info.json recorded for the run in `out_dir` (empty without one)."""
    path = out_dir / "run_info.json"
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:  # a run_info.json cut short
        return {}
    if "sink_ids" in info:
        return dict(info["sink_ids"])
    return {"wandb": info["wandb_id"]} if info.get("wandb_id") else {}  # recorded before sinks were plug-ins


def record_resume(out_dir: Path, *, checkpoint: Path | None, step: int, overrides: list[str],
                  differences: list[str], previous: dict[str, Any] | None = None) -> None:
    """Add this resume to run_info.json's `resumes`: from where (checkpoint None: a restart from step 0), with which
    command and config differences, and how the attempt before it ended (`previous`: its summary.json)."""
    path = out_dir / "run_info.json"
    info = _read(path) if path.is_file() else {}
    commit = _git("rev-parse", "HEAD")
    info.setdefault("resumes", []).append({
        "checkpoint": str(checkpoint) if checkpoint else None, "step": step, "overrides": overrides,
        "config_differences": differences, "previous_status": (previous or {}).get("summary/status"),
        "previous_reason": (previous or {}).get("summary/reason"),
        "git_commit": commit.strip() if commit else None, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    path.write_text(json.dumps(scrub(info), indent=2, default=str))
