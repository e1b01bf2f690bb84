"""One declaration per config key of what it affects (core/effects.py), and every reader agreeing with it: run names,
tags, resume checks, adapter metadata and which sweep jobs may train together."""

from __future__ import annotations

import dataclasses
import json
import shutil
import typing

import pytest
from omegaconf import OmegaConf

from qlora_lab import sinks
from qlora_lab.configs import key_table, named
from qlora_lab.core import schema
from qlora_lab.core.effects import Effect, declared, effects
from qlora_lab.core.errors import CheckpointError
from qlora_lab.model import quantize
from qlora_lab.runner.run import adapter_metadata, tags_of
from qlora_lab.train import checkpoint


def _classes():
    """Every schema a config is made of: the run's groups, each quantization backend's, each sink's."""
    yield from (c for c in vars(schema).values() if dataclasses.is_dataclass(c) and c is not schema.TrainConfig)
    yield from (s for _, s in quantize.BACKENDS.values())
    yield from (m.SCHEMA for m in sinks.SINKS.values())


@pytest.mark.parametrize("cls", list(_classes()), ids=lambda c: c.__name__)
def test_every_key_declares_what_it_affects(cls):
    undeclared = [f.name for f in dataclasses.fields(cls) if "effect" not in f.metadata]
    assert undeclared == [], f"{cls.__name__}: declare these with key(Effect.<x>): {undeclared}"


def test_the_run_level_keys_declare_theirs_too():
    """TrainConfig's own keys declare an effect; its groups (a dataclass each) declare theirs key by key."""
    hints = typing.get_type_hints(schema.TrainConfig)
    for f in dataclasses.fields(schema.TrainConfig):
        assert dataclasses.is_dataclass(hints[f.name]) or "effect" in f.metadata, f.name


@pytest.fixture
def spec(spec_of):
    return spec_of(["quantization=nf4"])


def test_fusable_keys_are_read_from_the_declarations(spec):
    """The sweep's rule (jobs that differ only in these keys share a base and a batch stream) is derived, not
    listed: LoRA's shape, optimization, reporting, locations; never the base, the data or the batch shape."""
    table = effects(spec.cfg)
    fusable = {k for k, d in table.items() if d.effect.fusable}
    assert {"lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.init", "optim.lr",
            "optim.weight_decay", "optim.scheduler", "optim.warmup_steps", "optim.max_steps", "eval.every_steps",
            "log.every_steps", "output_dir", "run_name"} <= fusable
    assert not fusable & {"model.name", "model.max_seq_len", "quantization.name", "quantization.quant_type",
                          "data.path", "data.micro_batch_size", "optim.grad_accum_steps", "seed", "data.packing",
                          "model.compile", "checkpointing.enabled", "lora.kernel"}


def test_names_and_tags_leave_out_locations(spec_of):
    s = spec_of(["lora.r=8"])
    s = dataclasses.replace(s, overrides=("lora.r=8", "cache_dir=/c", "logger.wandb.mode=offline", "resume=auto",
                                          "log.progress_bar=false", "hydra.run.dir=/x", "eval.every_steps=5"))
    assert tags_of(s) == ["lora.r=8", "eval.every_steps=5"]
    assert named("lora.r") and named("quantization") and named("experiment") and not named("cache_dir")
    assert not named("logger.wandb.project") and not named("logger.mlflow.tracking_uri")


def test_adapter_metadata_says_what_the_adapter_is_and_was_trained_on(spec):
    meta = adapter_metadata(spec)
    assert {"model.name", "quantization.quant_type", "lora.r", "lora.target_modules", "data.path", "seed"} <= set(meta)
    assert not {"optim.lr", "output_dir", "log.every_steps", "model.compile", "quantization.quant_storage"} & set(meta)
    assert len(meta) < 100  # W&B's limit on artifact metadata keys


def test_resume_rules_follow_the_declarations(spec):
    config = spec.config()

    def moved(key, value):
        other = json.loads(json.dumps(config))
        node = other
        *head, last = key.split(".")
        for part in head:
            node = node[part]
        node[last] = value
        return checkpoint.differences(config, other)

    assert moved("lora.r", 99)[0] and moved("quantization.quant_type", "fp4")[0] and moved("seed", 5)[0]
    assert moved("optim.name", "paged_adamw_8bit")[0]  # declared resume="refuse": its states do not carry over
    for key, value in (("optim.lr", 1.0), ("quantization.quant_storage", "bfloat16"), ("eval.every_steps", 7),
                       ("model.compile", "layers"), ("data.micro_batch_size", 99)):  # allowed, and said
        refused, allowed = moved(key, value)
        assert refused == [] and len(allowed) == 1 and allowed[0].startswith(key + ": "), (key, refused, allowed)
    assert moved("output_dir", "/elsewhere") == ([], [])  # a location is no difference at all


def test_a_key_a_checkpoint_holds_but_no_schema_knows_is_refused(spec):
    config = spec.config()
    other = json.loads(json.dumps(config))
    other["model"]["mystery"] = 1
    refused, _ = checkpoint.differences(other, config)
    assert refused == ["model.mystery: 1 -> '<absent>'"]


def test_a_new_location_key_is_left_out_everywhere_without_touching_a_reader():
    """Declaring a key once is all it takes: here a made-up sink with one location key and one reporting key."""

    @dataclasses.dataclass
    class Made(schema.Frozen):
        url: str = dataclasses.field(default="", metadata={"effect": Effect.location})
        every: int = dataclasses.field(default=1, metadata={"effect": Effect.reporting})

    table = {f"logger.made.{k}": d for k, d in effects(Made).items()}
    assert declared(table, "logger.made.url").resume == "ignore" and not declared(table, "logger.made.url").effect.named
    assert declared(table, "logger.made.every").resume == "allow"


def test_recorded_configs_are_judged_with_their_backend_and_sinks(spec):
    table = key_table(spec.config())
    assert table["quantization.quant_storage"].effect is Effect.implementation
    assert table["logger.wandb.mode"].effect is Effect.location
    assert declared(table, "model.build.hidden_size").effect is Effect.base  # under model.build


def test_resume_with_an_auto_micro_batch_under_another_budget(compose, tmp_path, cache_dir):
    """Train with data.micro_batch_size=auto under one budget, resume under a budget where the plan picks another
    micro-batch: the run continues with the checkpoint's micro-batch (its steps per epoch, its rows per step), and
    the predicted peak it logs is that micro-batch's. Epochs, not max_steps, so the step count depends on it."""
    from qlora_lab.memory import plan
    from qlora_lab.runner.resolve import resolve_spec
    from qlora_lab.runner.run import run

    base = ["data.micro_batch_size=auto", "optim.max_steps=0", "optim.epochs=1", "data.num_rows=96",
            "eval=loss", "eval.every_steps=0", "logger=none", "save.every_steps=2", "plan.max_micro_batch=16"]
    cfg = OmegaConf.to_object(compose(base + ["device=cpu", "plan.gpu_memory_gib=100"]))
    spec = resolve_spec(cfg, "cpu")[0]
    gib = {mb: plan.predict(spec.cfg, mb).card_gib for mb in (4, 16)}
    small = gib[4] / (1 - spec.cfg.plan.safety_margin) + 1e-6  # the plan picks 4 here, 16 with room to spare
    out = tmp_path / "run"
    first = run(compose(base + ["device=cpu", f"plan.gpu_memory_gib={small}"], out=out))
    assert first["summary/micro_batch"] == 4
    steps = first["summary/steps"]
    ckpt = sorted((out / "checkpoints").iterdir())[0]  # resume from an early checkpoint
    for later in sorted((out / "checkpoints").iterdir())[1:]:
        shutil.rmtree(later)
    (out / "summary.json").unlink()
    again = run(compose(base + ["device=cpu", "plan.gpu_memory_gib=100", "resume=auto"], out=out),
                overrides=["resume=auto"])
    assert again["summary/micro_batch"] == 4 and again["summary/steps"] == steps  # the checkpoint's, not the plan's
    assert again["summary/resumed_from_step"] == int(ckpt.name.split("_")[1])
    assert again["summary/predicted_peak_gib"] == pytest.approx(plan.predict(spec.cfg, 4).peak_gib)
    with pytest.raises(CheckpointError):  # and a micro-batch given by hand that changes the rows per step is refused
        run(compose(base[1:] + ["device=cpu", "data.micro_batch_size=16", "resume=auto"], out=out))
