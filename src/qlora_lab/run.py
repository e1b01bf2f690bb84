"""The pipeline, in order: validate → load → quantize → prepare → adapt → data → train → save.

`run(cfg)` is what `train.py` calls and what the tests call; it returns the run's summary metrics.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from qlora_lab import adapt, checkpoint, data, distributed, load, plan, prepare, quantize, save
from qlora_lab.config import TrainConfig
from qlora_lab.metrics import JsonlSink, MetricLogger, WandbSink, flatten, memory_now, reset_peak
from qlora_lab.train import train
from qlora_lab.validate import resolve_device, validate


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


# Overrides that change where or how a run reports, not what it computes: no W&B tag for them.
NOT_TAGS = ("cache_dir", "output_dir", "logger.progress_bar", "logger.mode", "sweep.resume", "resume=", "hydra.")


def build_logger(cfg: TrainConfig, out_dir: Path, config: dict[str, Any], overrides: list[str],
                 resume: tuple[str | None, int] | None = None) -> MetricLogger:
    """metrics.jsonl and W&B; `resume=(wandb run id, step)` continues both after that step."""
    jsonl = JsonlSink(out_dir / "metrics.jsonl", resume_step=resume[1] if resume else None)
    sinks: list = [jsonl]
    tags = [o for o in overrides if not o.startswith(NOT_TAGS)]
    if cfg.logger.name == "wandb" and cfg.logger.mode != "disabled":
        sinks.append(WandbSink(project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode,
                               run_dir=out_dir, name=cfg.run_name, group=cfg.sweep_id,
                               tags=list(cfg.tags) + tags, config=flatten(config),
                               resume=(resume[0], jsonl.records()) if resume and resume[0] else None))
    return MetricLogger(sinks)


def find_resume(cfg: TrainConfig, out_dir: Path, config: dict[str, Any], fingerprint: str,
                overrides: list[str], dist: distributed.Dist = distributed.Dist()) -> Path | None:
    """The checkpoint `cfg.resume` names, checked against this config and data; None to start fresh."""
    if not cfg.resume:
        return None
    ckpt = checkpoint.find(cfg.resume, out_dir)
    if ckpt is None:
        if dist.main:
            print(f"qlora-lab: resume=auto: no checkpoint in {out_dir / checkpoint.CKPT_DIR}; starting from step 0")
        return None
    allowed = checkpoint.check_compatible(ckpt, config, fingerprint, dist.world)
    step = checkpoint.step_of(ckpt)
    run_dir = checkpoint.run_dir_of(ckpt)
    if dist.main:
        print(f"qlora-lab: resuming {run_dir} from {ckpt.name} (step {step})"
              + ("; config differences, allowed:\n" + "\n".join(f"  - {a}" for a in allowed) if allowed else ""))
        save.record_resume(run_dir, checkpoint=ckpt, step=step, overrides=overrides, differences=allowed)
    return ckpt


def run(cfg: DictConfig | TrainConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train one run described by `cfg`; returns its summary metrics."""
    overrides = list(overrides or [])
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else None
    tcfg: TrainConfig = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
    config = config if config is not None else OmegaConf.to_container(OmegaConf.structured(tcfg))

    # Everything that can be checked without a model is checked first, and all problems are reported at once.
    validate(tcfg)
    device = resolve_device(tcfg.device)
    # A plan describes a CUDA step wherever it is printed, so it resolves `auto` settings as a GPU run would.
    target = "cuda" if tcfg.mode == "plan" else device
    if tcfg.model.kernels == "auto":
        from qlora_lab.ledger import model_config

        tcfg.model.kernels = load.resolve_kernels(tcfg.model, model_config(tcfg).model_type, target)
    if tcfg.model.compile == "auto":  # Triton codegen where it pays (CUDA); the CPU would pay minutes of compile
        tcfg.model.compile = "layers" if target == "cuda" else "none"
    ledger, budget = plan.resolve(tcfg, device)  # from the architecture alone: no weights are read
    if tcfg.mode == "plan":
        print(plan.plan_report(tcfg, ledger, budget, overrides))
        return {"summary/status": "planned", "summary/predicted_peak_gib": ledger.peak_gib,
                "summary/predicted_card_gib": ledger.card_gib, "summary/micro_batch": ledger.micro_batch,
                "summary/fits": plan.fits(ledger, budget, tcfg.plan.safety_margin)}
    dist = distributed.setup(tcfg.distributed, device)
    try:
        return _train_run(tcfg, config, overrides, device, ledger, budget, dist)
    finally:
        distributed.teardown(dist)


def _train_run(tcfg: TrainConfig, config: dict[str, Any], overrides: list[str], device: str, ledger, budget,
               dist: distributed.Dist) -> dict[str, Any]:
    # Every process writes into rank 0's run dir (their Hydra dirs agree anyway, see resolvers.launch_time).
    out_dir = Path(dist.broadcast(tcfg.output_dir))
    tcfg.output_dir = str(out_dir)
    config["output_dir"] = str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tcfg.plan.skip_unfit and plan.fits(ledger, budget, tcfg.plan.safety_margin) is False:
        return _skip(out_dir, ledger, budget, tcfg, dist.main)
    rows = data.read_rows(tcfg.data)
    data.check_size(rows, tcfg.data, dist.world)
    fingerprint = data.fingerprint(rows)
    ckpt = find_resume(tcfg, out_dir, config, fingerprint, overrides, dist)
    resume = None
    if ckpt is not None:  # training continues in the checkpoint's run dir (resume=<path> may name another)
        out_dir = checkpoint.run_dir_of(ckpt)
        tcfg.output_dir = str(out_dir)
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        resume = (saved["trainer"]["wandb_id"], saved["step"])
    seed_everything(tcfg.seed)
    t_start = time.perf_counter()

    # Only rank 0 reports: one metrics.jsonl, one W&B run, whatever the number of processes.
    logger = build_logger(tcfg, out_dir, config, overrides, resume) if dist.main else MetricLogger([])
    try:
        phases: dict[str, float] = {}

        def phase(name: str) -> None:
            phases.update({f"phase/{name}/{k}": v for k, v in memory_now(device).items()})

        reset_peak(device)
        if not dist.main:  # rank 0 builds a random-init model into the cache once; the others then find it
            dist.barrier()
        model_path = load.resolve_model_path(tcfg.model, tcfg.cache_dir, tcfg.seed, device)
        if dist.main:
            dist.barrier()
        tokenizer = load.load_tokenizer(model_path, tcfg.model)
        # Tokenize before loading weights: a dataset the tokenizer cannot render fails in seconds, not after a load.
        examples = data.build_examples(rows, tokenizer, tcfg.model.max_seq_len, tcfg.data.mask_prompt)
        train_set, eval_set = data.split_eval(examples, tcfg.data, tcfg.seed)
        bnb_config = quantize.build_bnb_config(tcfg.quantization)
        model = load.load_model(model_path, tcfg.model, bnb_config, device)
        phase("load")
        model = prepare.prepare_model(model, tcfg.model, tcfg.checkpointing, device)
        phase("prepare")
        model = adapt.wrap_model(model, tcfg.lora, tcfg.quantization)
        model = adapt.compile_layers(model, tcfg.model)
        trainable, total = adapt.count_parameters(model)  # before FSDP leaves each process a shard
        engine = distributed.wrap(model, tcfg.distributed, tcfg.checkpointing, dist)
        phase("wrap")
        if device == "cuda" and config["data"]["micro_batch_size"] == "auto":
            mb, attempts = plan.verify_micro_batch(tcfg.data.micro_batch_size,
                                                   lambda n: _probe_step(model, n, tcfg.model.max_seq_len))
            tcfg.data.micro_batch_size = mb
            print(f"qlora-lab: micro_batch_size=auto -> {mb} (ledger picked {ledger.micro_batch}; tries {attempts})")
            if mb != ledger.micro_batch:
                ledger = plan.predict(tcfg, mb)
        phases.update(plan.predicted_metrics(ledger))

        if ckpt is None and dist.main:
            save.write_run_info(out_dir, config=config, overrides=overrides, device=device,
                                dataset_fingerprint=fingerprint, model_path=model_path, processes=dist.world)
        if dist.main:
            print(f"qlora-lab: {tcfg.run_name}: {trainable:,} trainable / {total:,} parameters, "
                  f"{len(train_set)} train / {len(eval_set)} eval rows, device={device}, out={out_dir}"
                  + (f", {dist.world} processes ({dist.strategy})" if dist.active else ""))

        checkpointer = checkpoint.Checkpointer(out_dir, tcfg.save.keep_last, config, fingerprint, dist)
        summary = train(model, tokenizer, train_set, eval_set, tcfg, logger, device, phases, run_dir=out_dir,
                        checkpointer=checkpointer, resume_from=ckpt, engine=engine, dist=dist)
        adapter_dir = save.save_adapter(model, tokenizer, out_dir, dist)
        if not dist.main:
            return summary
        ledger_table = ""
        if device == "cuda":  # the ledger predicts CUDA allocator bytes; CPU RSS is not comparable
            measured = {p: phases[f"phase/{p}/allocated_gib"] for p in plan.PHASES[:-1]
                        if f"phase/{p}/allocated_gib" in phases}
            measured["step_peak"] = summary["summary/peak_memory_gib"]
            ledger_metrics, ledger_table = plan.compare(ledger, measured)
            logger.log(ledger_metrics, step=summary["summary/steps"])  # predicted, measured, diff: to every sink
            summary.update(ledger_metrics)

        summary.update({
            "summary/trainable_params": trainable,
            "summary/total_params": total,
            "summary/train_rows": len(train_set),
            "summary/wall_time_s": time.perf_counter() - t_start,
            "summary/status": "finished",
            "summary/micro_batch": tcfg.data.micro_batch_size,
            "summary/kernels": tcfg.model.kernels,
            "summary/predicted_peak_gib": ledger.peak_gib,
            "summary/adapter_dir": str(adapter_dir),
        })
        logger.summary({**summary, **phases})
        _print_summary(summary, phases)
        if ledger_table:
            print("qlora-lab: memory ledger, predicted vs measured (GiB allocated):\n" + ledger_table)
        return summary
    except BaseException as e:  # recorded in the run dir and in W&B, so a sweep table can say why it ended
        from qlora_lab.sweep import record_failure

        if dist.main:
            logger.summary(record_failure(out_dir, e))
        raise
    finally:
        logger.close()


def _skip(out_dir: Path, ledger, budget: float | None, cfg: TrainConfig, writer: bool = True) -> dict[str, Any]:
    """plan.skip_unfit: record the run as skipped, with the reason, instead of starting it."""
    reason = plan.verdict(ledger, budget, cfg.plan.safety_margin)
    summary = {"summary/status": "skipped", "summary/reason": reason, "summary/predicted_peak_gib": ledger.peak_gib,
               "summary/predicted_card_gib": ledger.card_gib}
    if writer:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"qlora-lab: {cfg.run_name}: skipped: {reason}")
    return summary


def _probe_step(model, micro_batch: int, seq: int) -> None:
    """One forward and backward at full sequence length, to prove a micro-batch fits before training on it."""
    try:
        ids = torch.randint(0, model.config.vocab_size, (micro_batch, seq), device="cuda")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def _print_summary(summary: dict[str, Any], phases: dict[str, float]) -> None:
    print("qlora-lab: memory by phase (GiB, allocated / peak allocated):")
    for name in ("load", "prepare", "wrap", "first_forward", "first_backward", "first_optimizer_step"):
        a, p = phases.get(f"phase/{name}/allocated_gib"), phases.get(f"phase/{name}/peak_allocated_gib")
        if a is not None:
            print(f"  {name:<22} {a:8.3f} / {p:8.3f}")
    print("qlora-lab: " + ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" if isinstance(v, float) else
                                    f"{k.split('/', 1)[1]}={v}" for k, v in summary.items()))
