"""Typed config schemas, one dataclass per Hydra group, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` fill these schemas. Because the top-level ``train.yaml`` starts from the
registered ``train_schema``, an unknown key or a value of the wrong type fails at composition time, before
anything is loaded. Defaults live here only when no YAML sets them; every group option YAML sets its
own values so that a reader sees the whole group in one file.

``validate`` then checks the values that types alone cannot (ranges, combinations, files, backends) and
reports every problem at once, each with the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class ModelConfig:
    """Which causal LM to fine-tune and how to load it."""

    name: str = MISSING  # short name used in run names and W&B (e.g. "tiny", "phi4_mini")
    path: str = MISSING  # hub id or local directory; for "tiny", where the built model is cached
    # For model=tiny (and the random-init shapes used by benchmarks): a transformers config dict to build the
    # model from instead of downloading it. Empty for hub/local checkpoints.
    build: dict[str, Any] = field(default_factory=dict)
    tokenizer: Optional[str] = None  # defaults to `path`
    dtype: str = "bfloat16"  # dtype of the non-quantized weights (embeddings, norms, head)
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    max_seq_len: int = 512  # sequences are truncated to this many tokens
    trust_remote_code: bool = False
    # fp32 upcast after loading: none (fastest; HF norms already reduce in fp32), norms (layer norms only),
    # all (every non-quantized parameter, what peft's prepare_model_for_kbit_training does: most memory).
    upcast: str = "none"
    # none | liger | auto: liger-kernel's Triton RMSNorm, SwiGLU, RoPE and fused linear cross-entropy (the full
    # vocab x tokens logits are never materialized: GiBs less at large vocabularies). CUDA only; auto = liger
    # on CUDA when liger-kernel is installed and has kernels for the model type, else none.
    kernels: str = "none"
    # none | layers | auto: torch.compile each decoder layer (one graph shared by all layers): norms, RoPE,
    # SiLU-mul, residual adds and the LoRA glue fuse into a few Triton kernels. The first step pays the compile
    # (tens of seconds); with kernels=liger only liger's fused loss is kept (its norm and SwiGLU would split the
    # graph). auto = layers on CUDA, none on the CPU.
    compile: str = "none"


@dataclass
class QuantizationConfig:
    """bitsandbytes quantization of the frozen base weights (maps 1:1 onto BitsAndBytesConfig)."""

    name: str = MISSING  # nf4 | fp4 | int8 | none
    bits: int = 4  # 4, 8, or 16 (no quantization)
    quant_type: str = "nf4"  # 4-bit data type: nf4 | fp4
    double_quant: bool = True  # quantize the absmax constants too (~0.37 bit/param saved)
    compute_dtype: str = "bfloat16"  # dtype the dequantized weights are multiplied in
    quant_storage: str = "uint8"  # packing dtype of 4-bit weights; set = compute_dtype for FSDP sharding
    skip_modules: list[str] = field(default_factory=list)  # module names left in model.dtype
    int8_threshold: float = 6.0  # LLM.int8 outlier threshold


@dataclass
class LoraConfig:
    """The low-rank adapter (maps onto peft.LoraConfig)."""

    name: str = MISSING  # default | dora
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    bias: str = "none"  # none | all | lora_only
    use_dora: bool = False
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    init: str = "default"  # default (kaiming A, zero B) | gaussian | pissa | loftq
    adapter_dtype: str = "float32"  # float32 (PEFT's default upcast) | bfloat16 (less memory, faster)
    # peft (PEFT's modules) | fused (one autograd function per 4-bit layer: the LoRA add and scale ride on the
    # base GEMM, no output copy; needs a 4-bit base and adapter_dtype = quantization.compute_dtype)
    kernel: str = "peft"


@dataclass
class CheckpointingConfig:
    """Activation checkpointing: trade recompute time for activation memory."""

    name: str = MISSING  # none | reentrant | non_reentrant | offload
    enabled: bool = True
    use_reentrant: bool = False
    offload_to_cpu: bool = False  # keep the saved layer inputs in host memory between forward and backward


@dataclass
class DataConfig:
    """The fine-tuning dataset."""

    name: str = MISSING  # tiny | jsonl | hf
    source: str = "jsonl"  # jsonl (a local file) | hf (datasets.load_dataset)
    path: Optional[str] = None  # jsonl file (source=jsonl) or dataset name/dir (source=hf)
    config_name: Optional[str] = None  # datasets config name (source=hf)
    split: str = "train"
    eval_fraction: float = 0.05  # share of rows held out for eval loss
    max_eval_rows: int = 256
    mask_prompt: bool = True  # compute the loss on response tokens only
    # an int, or "auto": the largest micro-batch the memory ledger predicts to fit plan.gpu_memory_gib (less
    # plan.safety_margin), verified with one real step and halved on OOM
    micro_batch_size: Any = 8
    shuffle: bool = True
    num_rows: int = 0  # for the tiny dataset: how many rows to generate (0 = use the shipped file as is)


@dataclass
class OptimConfig:
    """Optimizer, schedule and loop length."""

    name: str = MISSING  # adamw | paged_adamw_8bit
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 10
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_steps: int = 100  # optimizer steps; 0 = run `epochs` epochs
    epochs: int = 1


@dataclass
class DistributedConfig:
    """Data-parallel training over the processes `torchrun` / `accelerate launch` start (one per GPU)."""

    name: str = MISSING  # none (one process) | ddp (replicated base, averaged LoRA grads) | fsdp (FSDP2 shards)
    backend: str = "auto"  # auto (nccl on CUDA, gloo on the CPU) | nccl | gloo
    # fsdp: the dtype layers are all-gathered and computed in. With a 4-bit base it must equal
    # quantization.quant_storage, so the packed weights travel as they are stored (no lossy cast).
    param_dtype: str = "bfloat16"
    reduce_dtype: str = "float32"  # fsdp: dtype gradients are reduce-scattered in
    reshard_after_forward: bool = True  # fsdp: free each layer's gathered weights after its forward (ZeRO-3)


@dataclass
class LoggerConfig:
    """Where metrics go besides the run dir's metrics.jsonl."""

    name: str = MISSING  # wandb | none
    project: str = "qlora-lab"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    log_every: int = 1  # steps between metric records
    eval_every: int = 50  # steps between eval-loss passes (0 = only at the end)
    progress_bar: bool = True


@dataclass
class PlanConfig:
    """The memory ledger: prediction before loading, fit checks, automatic micro-batch size."""

    gpu_memory_gib: Optional[float] = None  # the card to plan for; None = the current GPU's (no verdict on CPU)
    safety_margin: float = 0.1  # share of the card kept free when judging fit and picking micro_batch_size=auto
    skip_unfit: bool = False  # a run predicted not to fit is recorded as skipped instead of started
    max_micro_batch: int = 64  # the largest micro-batch `auto` considers
    # processes the run is planned for (distributed=fsdp shards the weights over them); None = the launcher's
    # WORLD_SIZE (1 without torchrun). mode=plan distributed=fsdp plan.processes=2 plans a 2-GPU run anywhere.
    processes: Optional[int] = None


@dataclass
class SweepConfig:
    """How the jobs of a multirun (-m) run."""

    isolate: bool = True  # train each job in a fresh process: no memory statistics or allocations leak between jobs
    resume: bool = False  # rerunning a sweep into the same hydra.sweep.dir skips jobs that already finished
    gpus: Optional[list[int]] = None  # GPUs jobs may take, one job per GPU at a time; None = all visible


@dataclass
class SaveConfig:
    """Resumable checkpoints of the training state (not to be confused with activation `checkpointing`)."""

    every_steps: int = 0  # steps between checkpoints (0 = none, except on Ctrl-C/SIGTERM when on_signal)
    keep_last: int = 2  # checkpoints kept in <run dir>/checkpoints; older ones are deleted once a newer one is whole
    on_signal: bool = True  # Ctrl-C (SIGINT) or SIGTERM: finish the step, write a checkpoint, exit with status 130


@dataclass
class GuardConfig:
    """What a non-finite (NaN/inf) loss or gradient norm does; either way a diagnostic file is written."""

    nonfinite: str = "stop"  # stop (end the run, status failed_nan) | skip (drop the update and go on)
    max_skips: int = 10  # with skip: stop anyway once this many steps were skipped


@dataclass
class TrainConfig:
    """The whole run: one field per config group, plus run-level settings."""

    model: ModelConfig = MISSING
    quantization: QuantizationConfig = MISSING
    lora: LoraConfig = MISSING
    checkpointing: CheckpointingConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    logger: LoggerConfig = MISSING
    distributed: DistributedConfig = MISSING
    plan: PlanConfig = field(default_factory=PlanConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    # null (start fresh) | auto (the latest valid checkpoint in the run dir, else start fresh) | a path (a run dir
    # or one of its checkpoints/step_* dirs: training continues in that run dir, in the same W&B run)
    resume: Optional[str] = None
    mode: str = "train"  # train | plan (print the memory ledger and exit, without loading weights)
    seed: int = 0
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda
    output_dir: str = "."  # the run dir; train.yaml points it at Hydra's job output dir
    cache_dir: str = "outputs/cache"  # built tiny models/tokenizers; shared between runs
    run_name: str = "run"
    sweep_id: Optional[str] = None  # set for multirun jobs: the W&B group that ties a sweep together
    tags: list[str] = field(default_factory=list)


def register_configs() -> None:
    """Register the schemas so that `conf/train.yaml` can start from `train_schema`."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
