"""Typed config schemas, one dataclass per Hydra group, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` fill these schemas, and they are the only place defaults live: every field here
is MISSING, so a group option YAML that forgets a key fails at start ("Missing mandatory value"), and a value
never silently comes from a second, disagreeing default. Because `conf/train.yaml` starts from the registered
``train_schema``, an unknown key, a value of the wrong type or a choice that is not one of an Enum's members
fails at composition, before anything is loaded, with the valid choices in the message.

The checks that types cannot express (ranges, combinations) are in `core.checks`; the ones that look at the
machine (devices, files, backends, the network) in `runner.preflight`.

After composition a run works on a *resolved* copy (`core.spec.RunSpec`): every `auto` replaced by what runs,
then frozen (`freeze`), so what is recorded is what ran.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Optional

from omegaconf import MISSING


class DType(StrEnum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Precision(StrEnum):
    """The dtype weights are kept and computed in. auto: bfloat16 on CUDA, float32 on the CPU (CPUs without
    AVX512-BF16/AMX emulate bf16 matmuls: ~15x slower than fp32 on an AVX2 machine)."""

    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Storage(StrEnum):
    """How 4-bit weights are packed: uint8, or a float dtype that FSDP can shard as it is stored."""

    uint8 = "uint8"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class AdapterDType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class Attention(StrEnum):
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class Upcast(StrEnum):
    none = "none"
    norms = "norms"
    all = "all"


class Kernels(StrEnum):
    none = "none"
    liger = "liger"
    auto = "auto"


class Compile(StrEnum):
    none = "none"
    layers = "layers"
    auto = "auto"


class QuantType(StrEnum):
    nf4 = "nf4"
    fp4 = "fp4"


class LoraBias(StrEnum):
    none = "none"
    all = "all"
    lora_only = "lora_only"


class LoraInit(StrEnum):
    default = "default"
    gaussian = "gaussian"
    pissa = "pissa"
    loftq = "loftq"


class LoraKernel(StrEnum):
    peft = "peft"
    fused = "fused"


class DataSource(StrEnum):
    jsonl = "jsonl"
    hf = "hf"


class Optimizer(StrEnum):
    adamw = "adamw"
    paged_adamw_8bit = "paged_adamw_8bit"


class Scheduler(StrEnum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class Strategy(StrEnum):
    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"


class Backend(StrEnum):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class LoggerName(StrEnum):
    wandb = "wandb"
    none = "none"


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class NonFinite(StrEnum):
    stop = "stop"
    skip = "skip"


class Metric(StrEnum):
    """What an evaluation measures: the loss, or a score of greedy generations (evaluation/metrics.py)."""

    loss = "loss"
    exact_match = "exact_match"
    token_f1 = "token_f1"
    rouge_l = "rouge_l"
    char_f1 = "char_f1"


class Mode(StrEnum):
    train = "train"
    plan = "plan"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Frozen:
    """Mutable while Hydra composes and the runner resolves it; read-only once `freeze` has run."""

    _frozen = False

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise dataclasses.FrozenInstanceError(
                f"cannot set {type(self).__name__}.{name}: a resolved run spec is read-only (use core.spec.evolve)")
        super().__setattr__(name, value)


@dataclass
class ModelConfig(Frozen):
    """Which causal LM to fine-tune and how to load it."""

    name: str = MISSING  # short name used in run names and W&B (e.g. "tiny", "phi4_mini")
    path: Optional[str] = MISSING  # hub id or local checkpoint directory; null for built models (model.build)
    # A transformers config dict to build a random-init model from (model=tiny, the benchmark shapes) instead of
    # loading a checkpoint. Empty for hub/local checkpoints.
    build: dict[str, Any] = MISSING
    # A GGUF file (a path, or pkg:<python package>/<file>) converted once into the cache and loaded from there
    # instead of `path`: how a real pretrained model is had offline (model=smollm2_135m). null for the others.
    gguf: Optional[str] = MISSING
    tokenizer: Optional[str] = MISSING  # null = `path`
    dtype: Precision = MISSING  # dtype of the non-quantized weights (embeddings, norms, head)
    attn_implementation: Attention = MISSING
    max_seq_len: int = MISSING  # sequences are truncated to this many tokens
    trust_remote_code: bool = MISSING
    upcast: Upcast = MISSING  # fp32 after loading: none | norms | all (peft's prepare_model_for_kbit_training)
    kernels: Kernels = MISSING  # liger-kernel's Triton kernels (CUDA); auto = liger where it runs
    compile: Compile = MISSING  # torch.compile each decoder layer; auto = layers on CUDA


@dataclass
class QuantizationConfig(Frozen):
    """bitsandbytes quantization of the frozen base weights (maps 1:1 onto BitsAndBytesConfig)."""

    name: str = MISSING  # nf4 | fp4 | int8 | none
    bits: int = MISSING  # 4, 8, or 16 (no quantization)
    quant_type: QuantType = MISSING  # 4-bit data type
    double_quant: bool = MISSING  # quantize the absmax constants too (~0.37 bit/param saved)
    compute_dtype: Precision = MISSING  # dtype the dequantized weights are multiplied in
    quant_storage: Storage = MISSING  # packing dtype of 4-bit weights; = compute_dtype for FSDP sharding
    skip_modules: list[str] = MISSING  # module names left in model.dtype
    int8_threshold: float = MISSING  # LLM.int8 outlier threshold


@dataclass
class LoraConfig(Frozen):
    """The low-rank adapter (maps onto peft.LoraConfig)."""

    name: str = MISSING  # default | dora
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: list[str] = MISSING  # [all-linear] or module names
    bias: LoraBias = MISSING
    use_dora: bool = MISSING
    use_rslora: bool = MISSING  # scale by alpha/sqrt(r) instead of alpha/r
    init: LoraInit = MISSING
    adapter_dtype: AdapterDType = MISSING
    kernel: LoraKernel = MISSING  # peft (PEFT's modules) | fused (one autograd function per 4-bit layer)


@dataclass
class CheckpointingConfig(Frozen):
    """Activation checkpointing: trade recompute time for activation memory."""

    name: str = MISSING  # none | reentrant | non_reentrant | offload
    enabled: bool = MISSING
    use_reentrant: bool = MISSING
    offload_to_cpu: bool = MISSING  # keep the saved layer inputs in host memory between forward and backward


@dataclass
class DataConfig(Frozen):
    """The fine-tuning dataset."""

    name: str = MISSING  # tiny | jsonl | hf
    source: DataSource = MISSING
    path: Optional[str] = MISSING  # jsonl file (source=jsonl) or dataset name/dir (source=hf)
    config_name: Optional[str] = MISSING  # datasets config name (source=hf)
    split: str = MISSING
    num_rows: int = MISSING  # use the first N rows of the dataset (0 = all)
    eval_fraction: float = MISSING  # share of rows held out for evaluation
    max_eval_rows: int = MISSING
    # share of rows that truncation at model.max_seq_len may drop (their response falls beyond it) before the run
    # refuses to start; every dropped or truncated row is counted and reported either way
    max_dropped_fraction: float = MISSING
    mask_prompt: bool = MISSING  # compute the loss on response tokens only
    # A system message for rows that have none; null = none added (a chat template may then insert its own default)
    system_prompt: Optional[str] = MISSING
    # an int, or "auto": the largest micro-batch the memory ledger predicts to fit; resolved before training
    micro_batch_size: Any = MISSING
    shuffle: bool = MISSING
    # Pack rows into micro_batch_size rows of model.max_seq_len tokens each, documents isolated in attention
    packing: bool = MISSING
    metrics: list[Metric] = MISSING  # metrics this dataset's task declares, measured beside eval.metrics
    # Keep the tokenized rows under <cache_dir>/tokenized/<key>/ and memory-map them back in every later run whose
    # rows, tokenizer, chat template, max_seq_len, mask_prompt and system_prompt are the same (data/store.py)
    tokenize_cache: bool = MISSING
    # processes that tokenize: an int >= 1, or "auto" (1 for a small set, more for a large one, at most the CPUs)
    num_proc: Any = MISSING


@dataclass
class OptimConfig(Frozen):
    """Optimizer, schedule and loop length."""

    name: Optimizer = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    scheduler: Scheduler = MISSING  # each after warmup
    warmup_steps: int = MISSING
    grad_accum_steps: int = MISSING
    max_grad_norm: float = MISSING  # 0 disables clipping
    max_steps: int = MISSING  # optimizer steps; 0 = run `epochs` epochs
    epochs: int = MISSING


@dataclass
class DistributedConfig(Frozen):
    """Data-parallel training over the processes `torchrun` / `accelerate launch` start (one per GPU)."""

    name: Strategy = MISSING
    backend: Backend = MISSING
    param_dtype: DType = MISSING  # fsdp: all-gather and compute dtype (= quantization.quant_storage at 4 bits)
    reduce_dtype: DType = MISSING  # fsdp: dtype gradients are reduce-scattered in
    reshard_after_forward: bool = MISSING  # fsdp: free each layer's gathered weights after its forward


@dataclass
class LoggerConfig(Frozen):
    """Where metrics go besides the run dir's metrics.jsonl."""

    name: LoggerName = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING
    mode: WandbMode = MISSING
    log_every: int = MISSING  # steps between metric records
    progress_bar: bool = MISSING
    log_adapter: bool = MISSING  # the saved adapter as a W&B artifact (type model) of the run


@dataclass
class EvalConfig(Frozen):
    """Evaluation on the held-out rows: the loss, and task metrics of greedy generations."""

    name: str = MISSING  # default | loss
    every_steps: int = MISSING  # steps between evaluations (0 = only at the end)
    at_start: bool = MISSING  # also evaluate before the first step: the baseline the run is judged against
    metrics: list[Metric] = MISSING
    max_rows: int = MISSING  # held-out rows generated on at each evaluation (0 = all of them)
    batch_size: int = MISSING  # prompts generated together
    max_new_tokens: int = MISSING  # generation stops here or at the end of the assistant turn
    samples: int = MISSING  # rows (prompt, reference, prediction) of the sample table per evaluation


@dataclass
class PlanConfig(Frozen):
    """The memory ledger: prediction before loading, fit checks, automatic micro-batch size."""

    gpu_memory_gib: Optional[float] = MISSING  # the card to plan for; null = the current GPU's
    safety_margin: float = MISSING  # share of the card kept free when judging fit and sizing `auto`
    skip_unfit: bool = MISSING  # a run predicted not to fit is recorded as skipped instead of started
    max_micro_batch: int = MISSING  # the largest micro-batch `auto` considers
    processes: Optional[int] = MISSING  # plan for N processes; null = the launcher's WORLD_SIZE


@dataclass
class SweepConfig(Frozen):
    """How the jobs of a multirun (-m) run."""

    isolate: bool = MISSING  # train each job in a process of its own
    warm_start: bool = MISSING  # isolated jobs fork from a process that imported the libraries once
    resume: bool = MISSING  # rerunning a sweep into its hydra.sweep.dir skips jobs that already finished
    gpus: Optional[list[int]] = MISSING  # GPUs jobs may take, one job per GPU at a time; null = all visible


@dataclass
class SaveConfig(Frozen):
    """Resumable checkpoints of the training state (not to be confused with activation `checkpointing`)."""

    every_steps: int = MISSING  # steps between checkpoints (0 = none, except on Ctrl-C/SIGTERM)
    keep_last: int = MISSING  # checkpoints kept; older ones are deleted once a newer one is whole
    on_signal: bool = MISSING  # Ctrl-C / SIGTERM: finish the step, write a checkpoint, exit 130


@dataclass
class GuardConfig(Frozen):
    """What a non-finite (NaN/inf) loss or gradient norm does; either way a diagnostic file is written."""

    nonfinite: NonFinite = MISSING
    max_skips: int = MISSING  # with skip: stop anyway once this many steps were skipped


@dataclass
class TrainConfig(Frozen):
    """The whole run: one field per config group, plus run-level settings (conf/train.yaml)."""

    model: ModelConfig = MISSING
    quantization: QuantizationConfig = MISSING
    lora: LoraConfig = MISSING
    checkpointing: CheckpointingConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = MISSING
    distributed: DistributedConfig = MISSING
    plan: PlanConfig = MISSING
    sweep: SweepConfig = MISSING
    save: SaveConfig = MISSING
    guard: GuardConfig = MISSING
    resume: Optional[str] = MISSING  # null | auto | a run dir or one of its checkpoints/step_* dirs
    overwrite: bool = MISSING  # a new run into a run dir that holds one: move the old run to <dir>/replaced/<time>
    mode: Mode = MISSING
    seed: int = MISSING
    device: Device = MISSING
    output_dir: str = MISSING  # the run dir
    cache_dir: str = MISSING  # built models and tokenizers, shared between runs
    run_name: str = MISSING
    sweep_id: Optional[str] = MISSING  # set for multirun jobs: the W&B group that ties a sweep together
    tags: list[str] = MISSING


def freeze(cfg: Any) -> Any:
    """Make `cfg` and every schema dataclass inside it read-only; returns it."""
    if isinstance(cfg, Frozen):
        for f in dataclasses.fields(cfg):
            freeze(getattr(cfg, f.name))
        object.__setattr__(cfg, "_frozen", True)
    return cfg


def register_configs() -> None:
    """Register the schema so that `conf/train.yaml` can start from `train_schema`."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
