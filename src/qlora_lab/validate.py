"""Checks on the composed config that types alone cannot express, run before any model loads.

Every problem is collected and reported in one `ConfigError`, each line naming the fix, so a user fixes
their command once instead of once per crash.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import tempfile
from pathlib import Path

from qlora_lab.config import TrainConfig

DTYPES = ("bfloat16", "float16", "float32")
ATTN_IMPLS = ("sdpa", "eager", "flash_attention_2")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
SCHEDULERS = ("cosine", "linear", "constant")
LORA_INITS = ("default", "gaussian", "pissa", "loftq")


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem with its fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the config:\n{lines}")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@functools.lru_cache(maxsize=None)
def quant_backend_problem(device: str, bits: int, quant_type: str) -> str | None:
    """None if bitsandbytes can quantize to `bits` on `device`, else why not.

    Probed by quantizing a small tensor for real: a version check would miss a build without this
    device's library.
    """
    try:
        import bitsandbytes.functional as F  # noqa: F401  (lazy: the CPU-only path need not pay for it)
        import torch
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


def _model_max_positions(cfg: TrainConfig) -> int | None:
    if cfg.model.build:
        return cfg.model.build.get("max_position_embeddings")
    config_json = Path(cfg.model.path) / "config.json"
    if config_json.is_file():
        return json.loads(config_json.read_text()).get("max_position_embeddings")
    return None  # a hub id: known only after download


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or (os.sep in path and Path(path).exists())


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _not_writable(path: str) -> str | None:
    """None if `path` is (or can be made) a directory this process can write a file into, else why not."""
    target = Path(path).expanduser()
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".qlab-write-test-"):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
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


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError listing every problem in `cfg`; return None when it can run."""
    p: list[str] = []
    m, q, lo, ck, d, o, lg = cfg.model, cfg.quantization, cfg.lora, cfg.checkpointing, cfg.data, cfg.optim, cfg.logger

    if cfg.device not in ("auto", "cpu", "cuda"):
        p.append(f"device={cfg.device!r} is not one of auto, cpu, cuda")
        device = "cpu"
    else:
        device = resolve_device(cfg.device)
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                p.append("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
                device = "cpu"

    # model
    if m.dtype not in DTYPES:
        p.append(f"model.dtype={m.dtype!r} is not one of {', '.join(DTYPES)}")
    if m.attn_implementation not in ATTN_IMPLS:
        p.append(f"model.attn_implementation={m.attn_implementation!r} is not one of {', '.join(ATTN_IMPLS)}")
    if m.upcast not in ("none", "norms", "all"):
        p.append(f"model.upcast={m.upcast!r} is not one of none, norms, all")
    if m.compile not in ("none", "layers", "auto"):
        p.append(f"model.compile={m.compile!r} is not one of none, layers, auto")
    if m.kernels not in ("none", "liger", "auto"):
        p.append(f"model.kernels={m.kernels!r} is not one of none, liger, auto")
    elif m.kernels == "liger" and device != "cuda":
        p.append("model.kernels=liger runs Triton kernels that need a CUDA device; use model.kernels=none on the CPU")
    if m.max_seq_len <= 0:
        p.append(f"model.max_seq_len={m.max_seq_len} must be > 0")
    if m.build and "model_type" not in m.build:
        p.append("model.build needs a model_type (e.g. llama) to build a random-init model")
    if not m.build and _looks_local(m.path) and not (Path(m.path).expanduser() / "config.json").is_file():
        p.append(f"model.path={m.path!r} has no config.json; point it at a saved checkpoint directory")
    max_pos = _model_max_positions(cfg)
    if max_pos is not None and m.max_seq_len > max_pos:
        p.append(f"model.max_seq_len={m.max_seq_len} exceeds the model's max_position_embeddings={max_pos}; "
                 f"set model.max_seq_len<={max_pos}")

    # quantization
    if q.name not in ("nf4", "fp4", "int8", "none"):
        p.append(f"quantization.name={q.name!r} is not one of nf4, fp4, int8, none")
    if q.bits not in (4, 8, 16):
        p.append(f"quantization.bits={q.bits} must be 4, 8 or 16 (16 = no quantization)")
    if q.quant_type not in ("nf4", "fp4"):
        p.append(f"quantization.quant_type={q.quant_type!r} is not one of nf4, fp4")
    if q.compute_dtype not in DTYPES:
        p.append(f"quantization.compute_dtype={q.compute_dtype!r} is not one of {', '.join(DTYPES)}")
    if q.quant_storage not in ("uint8",) + DTYPES:
        p.append(f"quantization.quant_storage={q.quant_storage!r} is not one of uint8, {', '.join(DTYPES)}")
    if q.bits in (4, 8) and q.quant_type in ("nf4", "fp4"):  # a bad type is reported above, not as a backend gap
        why = quant_backend_problem(device, q.bits, q.quant_type)
        if why:
            p.append(f"quantization={q.name} needs a bitsandbytes backend for '{device}': {why}; "
                     "install bitsandbytes>=0.49 (CPU and CUDA backends) or choose quantization=none")

    # lora
    if lo.r <= 0:
        p.append(f"lora.r={lo.r} must be a positive integer (e.g. lora.r=16)")
    if lo.alpha <= 0:
        p.append(f"lora.alpha={lo.alpha} must be > 0 (the update is scaled by alpha/r; try lora.alpha=2*r)")
    if not 0 <= lo.dropout < 1:
        p.append(f"lora.dropout={lo.dropout} must be in [0, 1)")
    if lo.bias not in ("none", "all", "lora_only"):
        p.append(f"lora.bias={lo.bias!r} is not one of none, all, lora_only")
    if not lo.target_modules:
        p.append("lora.target_modules is empty; use [all-linear] or name modules, e.g. [q_proj,v_proj]")
    if lo.init not in LORA_INITS:
        p.append(f"lora.init={lo.init!r} is not one of {', '.join(LORA_INITS)}")
    elif lo.init in ("pissa", "loftq") and q.bits != 16:
        p.append(f"lora.init={lo.init} initializes from the full-precision weights; use quantization=none "
                 "(and quantize the residual model afterwards), or lora.init=default with a quantized base")
    if lo.adapter_dtype not in ("float32", "bfloat16"):
        p.append(f"lora.adapter_dtype={lo.adapter_dtype!r} is not one of float32, bfloat16")
    if lo.kernel not in ("peft", "fused"):
        p.append(f"lora.kernel={lo.kernel!r} is not one of peft, fused")
    elif lo.kernel == "fused":
        if q.bits != 4:
            p.append("lora.kernel=fused fuses LoRA into 4-bit layers; use lora.kernel=peft with "
                     f"quantization={q.name}")
        if lo.use_dora:
            p.append("lora.kernel=fused is plain LoRA; use lora.kernel=peft with DoRA")

    # checkpointing
    if ck.offload_to_cpu and not ck.enabled:
        p.append("checkpointing.offload_to_cpu=true needs checkpointing.enabled=true (or checkpointing=offload)")

    # data
    if d.source not in ("jsonl", "hf"):
        p.append(f"data.source={d.source!r} is not one of jsonl, hf")
    if not d.path:
        p.append(f"data.path is not set; give data.path=/path/to/train.jsonl (data={d.name})")
    elif d.source == "jsonl" and not Path(d.path).is_file():
        p.append(f"data.path={d.path!r} does not exist; give the path of a .jsonl file")
    if not 0 <= d.eval_fraction < 1:
        p.append(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
    mb = d.micro_batch_size
    if mb != "auto" and not (isinstance(mb, int) and not isinstance(mb, bool) and mb > 0):
        p.append(f"data.micro_batch_size={mb!r} must be a positive integer or auto")
    elif mb == "auto" and device != "cuda" and cfg.plan.gpu_memory_gib is None and cfg.mode == "train":
        p.append("data.micro_batch_size=auto sizes the batch for a GPU; on the CPU give an integer, "
                 "or plan.gpu_memory_gib=N to plan for a card")

    # optim
    if o.name not in OPTIMIZERS:
        p.append(f"optim.name={o.name!r} is not one of {', '.join(OPTIMIZERS)}")
    elif o.name == "paged_adamw_8bit" and device != "cuda":
        p.append("optim=paged_adamw_8bit pages optimizer state through CUDA unified memory; "
                 "use optim=adamw on the CPU")
    if o.lr <= 0:
        p.append(f"optim.lr={o.lr} must be > 0")
    if o.weight_decay < 0:
        p.append(f"optim.weight_decay={o.weight_decay} must be >= 0")
    if o.scheduler not in SCHEDULERS:
        p.append(f"optim.scheduler={o.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if o.warmup_steps < 0:
        p.append(f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    if o.grad_accum_steps < 1:
        p.append(f"optim.grad_accum_steps={o.grad_accum_steps} must be >= 1")
    if o.max_grad_norm < 0:
        p.append(f"optim.max_grad_norm={o.max_grad_norm} must be >= 0 (0 disables clipping)")
    if o.max_steps < 0 or (o.max_steps == 0 and o.epochs < 1):
        p.append("set optim.max_steps > 0, or optim.max_steps=0 with optim.epochs >= 1")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")

    # logger
    if lg.mode not in ("offline", "online", "disabled"):
        p.append(f"logger.mode={lg.mode!r} is not one of offline, online, disabled")
    elif lg.name == "wandb" and lg.mode == "online" and not _wandb_has_credentials():
        p.append("logger.mode=online but no W&B credentials were found; run `wandb login` "
                 "(or set WANDB_API_KEY), or keep logger.mode=offline and `wandb sync` later")
    if lg.log_every < 1:
        p.append(f"logger.log_every={lg.log_every} must be >= 1")
    if lg.eval_every < 0:
        p.append(f"logger.eval_every={lg.eval_every} must be >= 0")

    # checkpoints, resume, the NaN guard
    if cfg.save.every_steps < 0:
        p.append(f"save.every_steps={cfg.save.every_steps} must be >= 0 (0 = no periodic checkpoints)")
    if cfg.save.keep_last < 1:
        p.append(f"save.keep_last={cfg.save.keep_last} must be >= 1 (the checkpoint a resume needs)")
    if cfg.guard.nonfinite not in ("stop", "skip"):
        p.append(f"guard.nonfinite={cfg.guard.nonfinite!r} is not one of stop, skip")
    if cfg.guard.max_skips < 0:
        p.append(f"guard.max_skips={cfg.guard.max_skips} must be >= 0")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).expanduser().exists():
        p.append(f"resume={cfg.resume}: no such path; give a run dir or one of its checkpoints/step_* dirs, "
                 "or resume=auto")

    # where the run writes, and where the model comes from
    if cfg.mode == "train":
        for key in ("output_dir", "cache_dir"):
            why = _not_writable(getattr(cfg, key))
            if why:
                p.append(f"{key}={getattr(cfg, key)} is not writable ({why}); point it at a writable directory"
                         + (" (hydra.run.dir=... sets the run dir)" if key == "output_dir" else ""))
        if not m.build and not _looks_local(m.path) and not Path(m.path).expanduser().exists() \
                and not _hub_model_cached(m.path) and not hub_reachable():
            p.append(f"model.path={m.path} is not in the local Hugging Face cache and {_hub_host()[0]} cannot be "
                     f"reached; on a machine with access run `hf download {m.path}` and copy the "
                     "cache (HF_HOME), or set model.path to a local checkpoint directory")

    # several processes (torchrun / accelerate launch)
    p.extend(distributed_problems(cfg, device))

    # plan / mode
    if cfg.mode not in ("train", "plan"):
        p.append(f"mode={cfg.mode!r} is not one of train, plan")
    if not 0 <= cfg.plan.safety_margin < 1:
        p.append(f"plan.safety_margin={cfg.plan.safety_margin} must be in [0, 1)")
    if cfg.plan.gpu_memory_gib is not None and cfg.plan.gpu_memory_gib <= 0:
        p.append(f"plan.gpu_memory_gib={cfg.plan.gpu_memory_gib} must be > 0")
    if cfg.plan.max_micro_batch < 1:
        p.append(f"plan.max_micro_batch={cfg.plan.max_micro_batch} must be >= 1")
    if cfg.plan.processes is not None and cfg.plan.processes < 1:
        p.append(f"plan.processes={cfg.plan.processes} must be >= 1 (or null: the launcher's WORLD_SIZE)")

    if p:
        raise ConfigError(p)


def distributed_problems(cfg: TrainConfig, device: str) -> list[str]:
    """The `distributed` group against the launch (WORLD_SIZE), the device and the other groups."""
    from qlora_lab.distributed import launched_world_size

    dc, q, p = cfg.distributed, cfg.quantization, []
    world = launched_world_size()
    if dc.name not in ("none", "ddp", "fsdp"):
        return [f"distributed={dc.name!r} is not one of none, ddp, fsdp"]
    if dc.name == "none":
        if world > 1 and cfg.mode == "train":
            p.append(f"the launcher started {world} processes (WORLD_SIZE={world}) but distributed=none would train "
                     "the same run in each; add distributed=ddp (model fits one GPU) or distributed=fsdp (shard it)")
        return p
    if dc.backend not in ("auto", "nccl", "gloo"):
        p.append(f"distributed.backend={dc.backend!r} is not one of auto, nccl, gloo")
    elif dc.backend == "nccl" and device != "cuda":
        p.append("distributed.backend=nccl needs CUDA devices; use distributed.backend=gloo (or auto) on the CPU")
    for key in ("param_dtype", "reduce_dtype"):
        if getattr(dc, key) not in DTYPES:
            p.append(f"distributed.{key}={getattr(dc, key)!r} is not one of {', '.join(DTYPES)}")
    if device == "cuda" and cfg.mode == "train":
        import torch

        if world > torch.cuda.device_count():
            p.append(f"the launcher started {world} processes but {torch.cuda.device_count()} GPUs are visible; "
                     f"use --nproc_per_node={torch.cuda.device_count()} (one process per GPU)")
    if cfg.data.micro_batch_size == "auto":
        p.append(f"data.micro_batch_size=auto probes one process's memory; with distributed={dc.name} give an "
                 "integer (mode=plan shows what fits)")
    if dc.name == "fsdp":
        # (an unknown param_dtype is reported above; a storage fix naming it would be wrong)
        if q.bits == 4 and dc.param_dtype in DTYPES and q.quant_storage != dc.param_dtype:
            p.append(f"distributed=fsdp gathers weights as {dc.param_dtype}, but the 4-bit weights are packed as "
                     f"{q.quant_storage}; set quantization.quant_storage={dc.param_dtype} so they travel as stored")
        if q.bits == 8:
            p.append("distributed=fsdp cannot shard LLM.int8 weights (their scales live outside the tensor); use "
                     "quantization=nf4 with quantization.quant_storage=bfloat16, or distributed=ddp")
        if cfg.optim.name == "paged_adamw_8bit":
            p.append("distributed=fsdp shards the optimizer state already and bitsandbytes' paged optimizer does not "
                     "take sharded parameters; use optim=adamw")
    return p
