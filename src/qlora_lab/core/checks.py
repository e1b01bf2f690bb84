"""Checks on the composed config that types alone cannot express: ranges and combinations of values.

Pure functions of the config and two facts about the launch (the device the run will use and how many processes
the launcher started): no files, no network, no device probes; those are `runner.preflight`'s. Choices that are
not one of an Enum's members never get here: they fail at composition. Every problem is collected, each naming
its fix, so a user fixes their command once instead of once per crash.
"""

from __future__ import annotations

from qlora_lab.core.modes import parse_layers
from qlora_lab.core.schema import TrainConfig


def _model(cfg: TrainConfig, device: str) -> list[str]:
    m, p = cfg.model, []
    if m.kernels == "liger" and device != "cuda" and cfg.mode == "train":  # a plan describes a CUDA step anywhere
        p.append("model.kernels=liger runs Triton kernels that need a CUDA device; use model.kernels=none on the CPU")
    if m.max_seq_len <= 0:
        p.append(f"model.max_seq_len={m.max_seq_len} must be > 0")
    if m.build and m.path:
        p.append(f"model.path={m.path} names a checkpoint, but model={m.name} is built with random weights at run "
                 f"time (model.build), so the path would be ignored; for your own checkpoint use model=local "
                 f"model.path={m.path} (or a preset's settings with it, e.g. model=qwen2_5_0_5b model.path={m.path})")
    if not m.build and not m.path:
        p.append(f"model.path is empty; give a local checkpoint directory or a hub id (model={m.name})")
    if m.build and "model_type" not in m.build:
        p.append("model.build needs a model_type (e.g. llama) to build a random-init model")
    max_pos = m.build.get("max_position_embeddings") if m.build else None
    if max_pos is not None and m.max_seq_len > max_pos:
        p.append(f"model.max_seq_len={m.max_seq_len} exceeds the model's max_position_embeddings={max_pos}; "
                 f"set model.max_seq_len<={max_pos}")
    return p


def _lora(cfg: TrainConfig) -> list[str]:
    lo, p = cfg.lora, []
    if lo.r <= 0:
        p.append(f"lora.r={lo.r} must be a positive integer (e.g. lora.r=16)")
    if lo.alpha <= 0:
        p.append(f"lora.alpha={lo.alpha} must be > 0 (the update is scaled by alpha/r; try lora.alpha=2*r)")
    if not 0 <= lo.dropout < 1:
        p.append(f"lora.dropout={lo.dropout} must be in [0, 1)")
    if not lo.target_modules:
        p.append("lora.target_modules is empty; use [all-linear] or name modules, e.g. [q_proj,v_proj]")
    if lo.kernel == "fused" and lo.use_dora:
        p.append("lora.kernel=fused is plain LoRA; use lora.kernel=peft with DoRA")
    return p


def _data(cfg: TrainConfig, device: str) -> list[str]:
    d, p = cfg.data, []
    if not d.path:
        p.append(f"data.path is not set; give data.path=/path/to/train.jsonl (data={d.name})")
    if d.num_rows < 0:
        p.append(f"data.num_rows={d.num_rows} must be >= 0 (0 = every row)")
    if not 0 <= d.eval_fraction < 1:
        p.append(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
    if d.max_eval_rows < 0:
        p.append(f"data.max_eval_rows={d.max_eval_rows} must be >= 0 (0 = no held-out rows)")
    if not 0 <= d.max_dropped_fraction <= 1:
        p.append(f"data.max_dropped_fraction={d.max_dropped_fraction} must be in [0, 1] (the share of rows truncation "
                 "may drop; 0 = none)")
    if d.source == "jsonl" and d.config_name is not None:
        p.append(f"data.config_name={d.config_name} applies to data=hf; a .jsonl file has no configs (remove it)")
    if d.source == "jsonl" and d.split != "train":
        p.append(f"data.split={d.split} applies to data=hf; a .jsonl file is one split (remove it, or give that "
                 "split's file as data.path)")
    if d.num_proc != "auto" and not (isinstance(d.num_proc, int) and not isinstance(d.num_proc, bool)
                                     and d.num_proc >= 1):
        p.append(f"data.num_proc={d.num_proc!r} must be an integer >= 1 (processes that tokenize) or auto")
    mb = d.micro_batch_size
    if mb != "auto" and not (isinstance(mb, int) and not isinstance(mb, bool) and mb > 0):
        p.append(f"data.micro_batch_size={mb!r} must be a positive integer or auto")
    elif mb == "auto" and device != "cuda" and cfg.plan.gpu_memory_gib is None and cfg.mode == "train":
        p.append("data.micro_batch_size=auto sizes the batch for a GPU; on the CPU give an integer, "
                 "or plan.gpu_memory_gib=N to plan for a card")
    return p


def _optim(cfg: TrainConfig, device: str) -> list[str]:
    o, p = cfg.optim, []
    if o.name == "paged_adamw_8bit" and device != "cuda":
        p.append("optim=paged_adamw_8bit pages optimizer state through CUDA unified memory; "
                 "use optim=adamw on the CPU")
    if o.lr <= 0:
        p.append(f"optim.lr={o.lr} must be > 0")
    if o.weight_decay < 0:
        p.append(f"optim.weight_decay={o.weight_decay} must be >= 0")
    if o.eps <= 0:
        p.append(f"optim.eps={o.eps} must be > 0 (AdamW divides by sqrt(v) + eps; e.g. optim.eps=1e-8)")
    if o.warmup_steps < 0:
        p.append(f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    if o.grad_accum_steps < 1:
        p.append(f"optim.grad_accum_steps={o.grad_accum_steps} must be >= 1")
    if o.max_grad_norm < 0:
        p.append(f"optim.max_grad_norm={o.max_grad_norm} must be >= 0 (0 disables clipping)")
    if o.epochs < 0:
        p.append(f"optim.epochs={o.epochs} must be >= 0 (used when optim.max_steps=0)")
    if o.max_steps < 0 or (o.max_steps == 0 and o.epochs < 1):
        p.append("set optim.max_steps > 0, or optim.max_steps=0 with optim.epochs >= 1")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    return p


def _eval(cfg: TrainConfig) -> list[str]:
    ev, p = cfg.eval, []
    if ev.every_steps < 0:
        p.append(f"eval.every_steps={ev.every_steps} must be >= 0 (0 = only at the end)")
    for key in ("max_rows", "samples"):
        if getattr(ev, key) < 0:
            p.append(f"eval.{key}={getattr(ev, key)} must be >= 0")
    for key in ("batch_size", "max_new_tokens"):
        if getattr(ev, key) < 1:
            p.append(f"eval.{key}={getattr(ev, key)} must be >= 1")
    return p


def _run(cfg: TrainConfig) -> list[str]:
    p = []
    if cfg.checkpointing.offload_to_cpu and not cfg.checkpointing.enabled:
        p.append("checkpointing.offload_to_cpu=true needs checkpointing.enabled=true (or checkpointing=offload)")
    if cfg.log.every_steps < 1:
        p.append(f"log.every_steps={cfg.log.every_steps} must be >= 1")
    if cfg.log.adapter_artifact and not cfg.logger:
        p.append("log.adapter_artifact=true needs a sink to attach the adapter to; use logger=wandb (or mlflow), or "
                 "drop it (the adapter is saved in <run dir>/adapter either way)")
    if str(cfg.sweep.fuse).lower() not in ("auto", "true", "false"):
        p.append(f"sweep.fuse={cfg.sweep.fuse} must be auto, true or false")
    mp = cfg.sweep.max_parallel
    if str(mp) != "auto" and not (isinstance(mp, int) and not isinstance(mp, bool) and mp >= 1):
        p.append(f"sweep.max_parallel={mp} must be auto or an integer >= 1")
    if cfg.checkpointing.layers not in ("all", "auto"):
        try:
            parse_layers(str(cfg.checkpointing.layers))
        except ValueError as e:
            p.append(f"{e} (or checkpointing.layers=all | auto)")
    if cfg.save.every_steps < 0:
        p.append(f"save.every_steps={cfg.save.every_steps} must be >= 0 (0 = no periodic checkpoints)")
    if cfg.save.keep_last < 1:
        p.append(f"save.keep_last={cfg.save.keep_last} must be >= 1 (the checkpoint a resume needs)")
    if cfg.guard.max_skips < 0:
        p.append(f"guard.max_skips={cfg.guard.max_skips} must be >= 0")
    if cfg.overwrite and cfg.resume is not None:
        p.append(f"overwrite=true starts a new run but resume={cfg.resume} continues one; drop one of the two")
    if cfg.seed < 0:
        p.append(f"seed={cfg.seed} must be >= 0 (numpy seeds only take non-negative integers)")
    if not 0 <= cfg.plan.safety_margin < 1:
        p.append(f"plan.safety_margin={cfg.plan.safety_margin} must be in [0, 1)")
    if cfg.plan.gpu_memory_gib is not None and cfg.plan.gpu_memory_gib <= 0:
        p.append(f"plan.gpu_memory_gib={cfg.plan.gpu_memory_gib} must be > 0")
    if cfg.plan.max_micro_batch < 1:
        p.append(f"plan.max_micro_batch={cfg.plan.max_micro_batch} must be >= 1")
    if cfg.plan.processes is not None and cfg.plan.processes < 1:
        p.append(f"plan.processes={cfg.plan.processes} must be >= 1 (or null: the launcher's WORLD_SIZE)")
    return p


def _distributed(cfg: TrainConfig, device: str, world: int) -> list[str]:
    """The `distributed` group against the launch (`world` processes), the device and the other groups."""
    dc, p = cfg.distributed, []
    if dc.name == "none":
        if world > 1 and cfg.mode == "train":
            p.append(f"the launcher started {world} processes (WORLD_SIZE={world}) but distributed=none would train "
                     "the same run in each; add distributed=ddp (model fits one GPU) or distributed=fsdp (shard it)")
        return p
    if dc.backend == "nccl" and device != "cuda":
        p.append("distributed.backend=nccl needs CUDA devices; use distributed.backend=gloo (or auto) on the CPU")
    if cfg.data.micro_batch_size == "auto":
        p.append(f"data.micro_batch_size=auto probes one process's memory; with distributed={dc.name} give an "
                 "integer (mode=plan shows what fits)")
    if dc.name == "fsdp":  # what FSDP asks of the quantized weights, each backend says (model/quantize)
        if cfg.optim.name == "paged_adamw_8bit":
            p.append("distributed=fsdp shards the optimizer state already and bitsandbytes' paged optimizer does not "
                     "take sharded parameters; use optim=adamw")
    return p


# What to write for a key the composed config leaves unset (`???` in its YAML).
MISSING_HINTS = {
    "data.path": "give data.path=/path/to/train.jsonl (data=jsonl) or a dataset name or dir (data=hf)",
    "model.path": "give model.path=/path/to/checkpoint_dir (a directory with config.json, tokenizer and weights)",
}


def missing_problems(keys: list[str]) -> list[str]:
    """One problem per unset key, each with what to give."""
    return [f"{k} is not set; {MISSING_HINTS.get(k, f'give {k}=<value>')}" for k in keys]


def config_problems(cfg: TrainConfig, device: str, world: int = 1) -> list[str]:
    """Every problem of `cfg` for a run on `device` with `world` processes; empty when the values can run."""
    return [*_model(cfg, device), *_lora(cfg), *_data(cfg, device), *_optim(cfg, device),
            *_eval(cfg), *_run(cfg), *_distributed(cfg, device, world)]
