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

from qlora_lab.core.effects import Effect, key


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

    name: str = key(Effect.base)  # short name used in run names and W&B (e.g. "tiny", "phi4_mini")
    path: Optional[str] = key(Effect.base)  # hub id or local checkpoint directory; null for built models (model.build)
    # A transformers config dict to build a random-init model from (model=tiny, the benchmark shapes) instead of
    # loading a checkpoint. Empty for hub/local checkpoints. Open: its keys are the transformers config's of its
    # model_type, checked against that config class before anything loads.
    build: dict[str, Any] = key(Effect.base, open="the transformers config class of model.build.model_type")
    # A GGUF file (a path, or pkg:<python package>/<file>) converted once into the cache and loaded from there
    # instead of `path`: how a real pretrained model is had offline (model=smollm2_135m). null for the others.
    gguf: Optional[str] = key(Effect.base)
    tokenizer: Optional[str] = key(Effect.base)  # null = `path`
    dtype: Precision = key(Effect.base)  # dtype of the non-quantized weights (embeddings, norms, head)
    attn_implementation: Attention = key(Effect.implementation)
    max_seq_len: int = key(Effect.data)  # sequences are truncated to this many tokens
    trust_remote_code: bool = key(Effect.base)
    upcast: Upcast = key(Effect.base)  # fp32 after loading: none | norms | all (peft's prepare_model_for_kbit_training)
    kernels: Kernels = key(Effect.implementation)  # liger-kernel's Triton kernels (CUDA); auto = liger where it runs
    compile: Compile = key(Effect.implementation)  # torch.compile each decoder layer; auto = layers on CUDA
    # Run each decoder layer's MLP over the tokens this many at a time, each piece recomputed in backward (0: whole):
    # at long contexts the MLP's intermediate (3 x intermediate_size values per token) is what binds, not attention
    mlp_chunk: int = key(Effect.implementation)


@dataclass
class QuantizationConfig(Frozen):
    """How the frozen base weights are quantized: what every backend shares. Each backend extends it with its own
    keys in its own module (model/quantize/<backend>.py), and each quantization YAML starts from that backend's
    schema, so a key of another backend fails at composition."""

    name: str = key(Effect.base)  # nf4 | fp4 | int8 | torchao_nf4 | none
    backend: str = key(Effect.base)  # the module under model/quantize that quantizes: bitsandbytes | torchao | none


@dataclass
class LoraConfig(Frozen):
    """The low-rank adapter (maps onto peft.LoraConfig)."""

    name: str = key(Effect.adapter)  # default | dora
    r: int = key(Effect.adapter)
    alpha: float = key(Effect.adapter)
    dropout: float = key(Effect.adapter)
    target_modules: list[str] = key(Effect.adapter)  # [all-linear] or module names
    bias: LoraBias = key(Effect.adapter)
    use_dora: bool = key(Effect.adapter)
    use_rslora: bool = key(Effect.adapter)  # scale by alpha/sqrt(r) instead of alpha/r
    init: LoraInit = key(Effect.adapter)
    adapter_dtype: AdapterDType = key(Effect.adapter)
    # peft (PEFT's modules) | fused (one autograd function per 4-bit layer): the same LoRA, other kernels
    kernel: LoraKernel = key(Effect.implementation)


@dataclass
class CheckpointingConfig(Frozen):
    """Activation checkpointing: trade recompute time for activation memory."""

    name: str = key(Effect.implementation)  # none | reentrant | non_reentrant | offload | auto
    enabled: bool = key(Effect.implementation)
    use_reentrant: bool = key(Effect.implementation)
    offload_to_cpu: bool = key(Effect.implementation)  # keep the saved layer inputs in host memory between passes
    # Each decoder layer's mode: "all" (every layer as enabled/offload_to_cpu say), "auto" (the plan picks per layer
    # keep, recompute or offload, and the micro-batch, for the most tokens/s that fits: memory/frontier.py), or runs
    # of modes in layer order, e.g. "offload:8+recompute:14+keep:10" (what auto resolves to, recorded and re-used)
    layers: str = key(Effect.implementation)


@dataclass
class DataConfig(Frozen):
    """The fine-tuning dataset."""

    name: str = key(Effect.data)  # tiny | jsonl | hf
    source: DataSource = key(Effect.data)
    path: Optional[str] = key(Effect.data)  # jsonl file (source=jsonl) or dataset name/dir (source=hf)
    config_name: Optional[str] = key(Effect.data)  # datasets config name (source=hf)
    split: str = key(Effect.data)
    num_rows: int = key(Effect.data)  # use the first N rows of the dataset (0 = all)
    eval_fraction: float = key(Effect.data)  # share of rows held out for evaluation
    max_eval_rows: int = key(Effect.data)
    # share of rows that truncation at model.max_seq_len may drop (their response falls beyond it) before the run
    # refuses to start; every dropped or truncated row is counted and reported either way
    max_dropped_fraction: float = key(Effect.reporting)
    mask_prompt: bool = key(Effect.data)  # compute the loss on response tokens only
    # A system message for rows that have none; null = none added (a chat template may then insert its own default)
    system_prompt: Optional[str] = key(Effect.data)
    # an int, or "auto": the largest micro-batch the memory ledger predicts to fit; resolved before training
    micro_batch_size: Any = key(Effect.batching)
    shuffle: bool = key(Effect.data)
    # Pack rows into micro_batch_size rows of model.max_seq_len tokens each, documents isolated in attention
    packing: bool = key(Effect.data)
    metrics: list[Metric] = key(Effect.reporting)  # metrics this dataset's task declares, measured beside eval.metrics
    # Keep the tokenized rows under <cache_dir>/tokenized/<key>/ and memory-map them back in every later run whose
    # rows, tokenizer, chat template, max_seq_len, mask_prompt and system_prompt are the same (data/store.py)
    tokenize_cache: bool = key(Effect.implementation)
    # processes that tokenize: an int >= 1, or "auto" (1 for a small set, more for a large one, at most the CPUs)
    num_proc: Any = key(Effect.implementation)


@dataclass
class OptimConfig(Frozen):
    """Optimizer, schedule and loop length."""

    name: Optimizer = key(Effect.optimization, resume="refuse")  # another optimizer's states do not carry over
    lr: float = key(Effect.optimization)
    weight_decay: float = key(Effect.optimization)
    betas: list[float] = key(Effect.optimization)
    eps: float = key(Effect.optimization)
    scheduler: Scheduler = key(Effect.optimization)  # each after warmup
    warmup_steps: int = key(Effect.optimization)
    grad_accum_steps: int = key(Effect.batching)
    max_grad_norm: float = key(Effect.optimization)  # 0 disables clipping
    max_steps: int = key(Effect.optimization)  # optimizer steps; 0 = run `epochs` epochs
    epochs: int = key(Effect.optimization)


@dataclass
class DistributedConfig(Frozen):
    """Data-parallel training over the processes `torchrun` / `accelerate launch` start (one per GPU)."""

    name: Strategy = key(Effect.implementation)
    backend: Backend = key(Effect.implementation)
    param_dtype: DType = key(Effect.implementation)  # fsdp: all-gather and compute dtype (= the 4-bit storage dtype)
    reduce_dtype: DType = key(Effect.implementation)  # fsdp: dtype gradients are reduce-scattered in
    reshard_after_forward: bool = key(Effect.implementation)  # fsdp: free each layer's gathered weights after forward


@dataclass
class LogConfig(Frozen):
    """How often and what a run records, whichever sinks (`logger`) it records to."""

    every_steps: int = key(Effect.reporting)  # steps between metric records
    progress_bar: bool = key(Effect.location)
    adapter_artifact: bool = key(Effect.reporting)  # the saved adapter as an artifact in every sink that keeps them


@dataclass
class EvalConfig(Frozen):
    """Evaluation on the held-out rows: the loss, and task metrics of greedy generations."""

    name: str = key(Effect.reporting)  # default | loss
    every_steps: int = key(Effect.reporting)  # steps between evaluations (0 = only at the end)
    at_start: bool = key(Effect.reporting)  # also evaluate before the first step: the baseline of the run
    metrics: list[Metric] = key(Effect.reporting)
    max_rows: int = key(Effect.reporting)  # held-out rows generated on at each evaluation (0 = all of them)
    batch_size: int = key(Effect.reporting)  # prompts generated together
    max_new_tokens: int = key(Effect.reporting)  # generation stops here or at the end of the assistant turn
    samples: int = key(Effect.reporting)  # rows (prompt, reference, prediction) of the sample table per evaluation


@dataclass
class PlanConfig(Frozen):
    """The memory ledger: prediction before loading, fit checks, automatic micro-batch size."""

    gpu_memory_gib: Optional[float] = key(Effect.implementation)  # the card to plan for; null = the current GPU's
    safety_margin: float = key(Effect.implementation)  # share of the card kept free when judging fit and sizing
    skip_unfit: bool = key(Effect.reporting)  # a run predicted not to fit is recorded as skipped instead of started
    max_micro_batch: int = key(Effect.implementation)  # the largest micro-batch `auto` considers
    processes: Optional[int] = key(Effect.implementation)  # plan for N processes; null = the launcher's WORLD_SIZE
    # "search": the longest model.max_seq_len that trains at micro-batch 1 within the budget (mode=plan prints it; a
    # run trains at it); null: model.max_seq_len as given
    max_seq_len: Optional[str] = key(Effect.data)


@dataclass
class SweepConfig(Frozen):
    """How the jobs of a multirun (-m) run."""

    isolate: bool = key(Effect.location)  # train each job in a process of its own
    warm_start: bool = key(Effect.location)  # isolated jobs fork from a process that imported the libraries once
    resume: bool = key(Effect.location)  # rerunning a sweep into its hydra.sweep.dir skips jobs that finished
    gpus: Optional[list[int]] = key(Effect.location)  # GPUs jobs may take, one job per GPU at a time; null = all
    # Jobs that differ only in fusable keys train together on one base (runner/fuse.py): auto (when the plan says the
    # group fits; a group that does not is split) | true (whatever the plan says) | false (one process per job)
    fuse: str = key(Effect.location)
    # Units (fused groups, single jobs) run side by side on one GPU: auto (as many as the plan says fit together) or
    # an integer (at most that many at once)
    max_parallel: Any = key(Effect.location)


@dataclass
class SaveConfig(Frozen):
    """Resumable checkpoints of the training state (not to be confused with activation `checkpointing`)."""

    every_steps: int = key(Effect.reporting)  # steps between checkpoints (0 = none, except on Ctrl-C/SIGTERM)
    keep_last: int = key(Effect.reporting)  # checkpoints kept; older ones are deleted once a newer one is whole
    on_signal: bool = key(Effect.reporting)  # Ctrl-C / SIGTERM: finish the step, write a checkpoint, exit 130


@dataclass
class GuardConfig(Frozen):
    """What a non-finite (NaN/inf) loss or gradient norm does; either way a diagnostic file is written."""

    nonfinite: NonFinite = key(Effect.optimization)
    max_skips: int = key(Effect.optimization)  # with skip: stop anyway once this many steps were skipped


@dataclass
class TrainConfig(Frozen):
    """The whole run: one field per config group, plus run-level settings (conf/train.yaml)."""

    model: ModelConfig = MISSING
    quantization: QuantizationConfig = MISSING
    lora: LoraConfig = MISSING
    checkpointing: CheckpointingConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    log: LogConfig = MISSING
    # The sinks a run records to besides metrics.jsonl, by name (`logger=[wandb,mlflow]`; `logger=none`: none).
    # Each sink's keys are its own schema (sinks/<name>.py), checked when the config is composed.
    logger: dict[str, Any] = key(Effect.reporting)
    eval: EvalConfig = MISSING
    distributed: DistributedConfig = MISSING
    plan: PlanConfig = MISSING
    sweep: SweepConfig = MISSING
    save: SaveConfig = MISSING
    guard: GuardConfig = MISSING
    resume: Optional[str] = key(Effect.location)  # null | auto | a run dir or one of its checkpoints/step_* dirs
    overwrite: bool = key(Effect.location)  # a new run into a run dir that holds one: move the old run aside
    mode: Mode = key(Effect.implementation)
    seed: int = key(Effect.data)  # the sample order, LoRA's initialization and dropout
    device: Device = key(Effect.implementation)
    output_dir: str = key(Effect.location)  # the run dir
    cache_dir: str = key(Effect.location)  # built models and tokenizers, shared between runs
    run_name: str = key(Effect.location)
    sweep_id: Optional[str] = key(Effect.location)  # set for multirun jobs: the group that ties a sweep together
    tags: list[str] = key(Effect.location)
    # The study (experiments/<name>/, `qlora-lab reproduce`) this run belongs to: a tag `study=<name>` and a config key
    # in every sink and in run_info.json's config, so dashboards filter by study; null: none
    study: Optional[str] = key(Effect.reporting)


def freeze(cfg: Any) -> Any:
    """Make `cfg` and every schema dataclass inside it (the sinks' among them) read-only; returns it."""
    if isinstance(cfg, Frozen):
        for f in dataclasses.fields(cfg):
            freeze(getattr(cfg, f.name))
        object.__setattr__(cfg, "_frozen", True)
    elif isinstance(cfg, dict):
        for value in cfg.values():
            freeze(value)
    return cfg

