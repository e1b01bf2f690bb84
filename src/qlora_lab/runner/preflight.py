"""Checks against the machine, before any model loads: the device, bitsandbytes' backend, files and directories,
credentials, the hub. Together with the pure config checks (`core.checks`) they make `validate`, which reports
every problem at once, each with its fix.

Nothing here changes the machine: directories are checked for writability without being created.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path

import torch

from qlora_lab.core.checks import config_problems
from qlora_lab.core.dist import launched_world_size
from qlora_lab.core.errors import ConfigError
from qlora_lab.core.schema import TrainConfig
from qlora_lab.model.gguf import locate


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


@functools.lru_cache(maxsize=None)
def quant_backend_problem(device: str, bits: int, quant_type: str) -> str | None:
    """None if bitsandbytes can quantize to `bits` on `device`, else why not.

    Probed by quantizing a small tensor for real: a version check would miss a build without this device's library.
    """
    try:
        import bitsandbytes.functional as F  # lazy: the CPU-only path need not pay for it
    except Exception as e:  # ImportError, or a broken native library
        return f"bitsandbytes is not importable ({type(e).__name__}: {e})"
    try:
        x = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
        if bits == 4:
            F.quantize_4bit(x, quant_type=quant_type)
        else:
            F.int8_vectorwise_quant(x.half())
    except Exception as e:
        return f"bitsandbytes has no {bits}-bit backend for device '{device}' ({type(e).__name__}: {str(e)[:120]})"
    return None


def looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or (os.sep in path and Path(path).exists())


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def not_writable(path: str) -> str | None:
    """None if `path` is a directory this process can write into, or can be created as one; else why not.

    Nothing is created: the nearest existing ancestor must be a writable directory.
    """
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _hub_host() -> tuple[str, int]:
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(_hub_host(), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_model_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library rejects: let from_pretrained say why
        return True


def _device(cfg: TrainConfig) -> tuple[str, list[str]]:
    device = resolve_device(cfg.device)
    if device == "cuda" and not torch.cuda.is_available():
        return "cpu", ["device=cuda but no CUDA device is visible; use device=cpu or device=auto"]
    return device, []


def _model(cfg: TrainConfig) -> list[str]:
    m, p = cfg.model, []
    if m.build:
        return p
    if m.gguf:  # converted from the GGUF file into the cache; model.path is not read
        try:
            locate(m.gguf)
        except FileNotFoundError as e:
            p.append(str(e))
        return p
    local = Path(m.path).expanduser()
    config_json = local / "config.json"
    if looks_local(m.path) and not config_json.is_file():
        p.append(f"model.path={m.path!r} has no config.json; point it at a saved checkpoint directory")
    if config_json.is_file():
        max_pos = json.loads(config_json.read_text()).get("max_position_embeddings")
        if max_pos is not None and m.max_seq_len > max_pos:
            p.append(f"model.max_seq_len={m.max_seq_len} exceeds the model's max_position_embeddings={max_pos}; "
                     f"set model.max_seq_len<={max_pos}")
    if cfg.mode == "train" and not looks_local(m.path) and not local.exists() and not _hub_model_cached(m.path) \
            and not hub_reachable():
        p.append(f"model.path={m.path} is not in the local Hugging Face cache and {_hub_host()[0]} cannot be "
                 f"reached; on a machine with access run `hf download {m.path}` and copy the cache (HF_HOME), or "
                 "set model.path to a local checkpoint directory")
    return p


def _quantization(cfg: TrainConfig, device: str) -> list[str]:
    q = cfg.quantization
    if q.bits not in (4, 8):
        return []
    why = quant_backend_problem(device, q.bits, str(q.quant_type))
    return [f"quantization={q.name} needs a bitsandbytes backend for '{device}': {why}; install bitsandbytes>=0.49 "
            "(CPU and CUDA backends) or choose quantization=none"] if why else []


def _files(cfg: TrainConfig) -> list[str]:
    p, d = [], cfg.data
    if d.path and d.source == "jsonl" and not Path(d.path).is_file():
        p.append(f"data.path={d.path!r} does not exist; give the path of a .jsonl file")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).expanduser().exists():
        p.append(f"resume={cfg.resume}: no such path; give a run dir or one of its checkpoints/step_* dirs, "
                 "or resume=auto")
    if cfg.mode == "train":
        for key in ("output_dir", "cache_dir"):
            why = not_writable(getattr(cfg, key))
            if why:
                p.append(f"{key}={getattr(cfg, key)} is not writable ({why}); point it at a writable directory"
                         + (" (hydra.run.dir=... sets the run dir)" if key == "output_dir" else ""))
    return p


def _logger(cfg: TrainConfig) -> list[str]:
    lg = cfg.logger
    if lg.name == "wandb" and lg.mode == "online" and not _wandb_has_credentials():
        return ["logger.mode=online but no W&B credentials were found; run `wandb login` (or set WANDB_API_KEY), "
                "or keep logger.mode=offline and `wandb sync` later"]
    return []


def _launch(cfg: TrainConfig, device: str, world: int) -> list[str]:
    if cfg.distributed.name != "none" and device == "cuda" and cfg.mode == "train" \
            and world > torch.cuda.device_count():
        return [f"the launcher started {world} processes but {torch.cuda.device_count()} GPUs are visible; use "
                f"--nproc_per_node={torch.cuda.device_count()} (one process per GPU)"]
    return []


def validate(cfg: TrainConfig) -> str:
    """Raise ConfigError listing every problem of `cfg` on this machine; returns the device the run will use."""
    world = launched_world_size()
    device, problems = _device(cfg)
    problems += config_problems(cfg, device, world)
    problems += _model(cfg) + _quantization(cfg, device) + _files(cfg) + _logger(cfg) + _launch(cfg, device, world)
    if problems:
        raise ConfigError(problems)
    return device
