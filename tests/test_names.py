"""Run and job-dir names: the keys a sweep varies, short, safe for file systems and W&B, stable across re-runs."""

from __future__ import annotations

import re

from qlora_lab.configs import named
from qlora_lab.core.resolvers import NAME_CAP, job_name as _job_name, swept_keys
SAFE = re.compile(r"^[A-Za-z0-9=,._+-]+$")


def job_name(overrides, swept, num):
    """As the resolver names a run: the keys' declarations decide what names it (configs.named)."""
    return _job_name(overrides, swept, num, named)


def test_a_sweep_job_is_named_by_its_swept_keys_only():
    job = ["data=jsonl", "data.path=/tmp/fixed.jsonl", "experiment=phi4_mini_qlora", "lora.r=8",
           "model=phi4_mini_shape", "optim.max_steps=12"]
    assert job_name(job, "lora.r", 0) == "0_r=8"
    assert job_name(["lora.r=16", "quantization=none", "optim.lr=1e-4"], "quantization,lora.r", 3) \
        == "3_r=16,quantization=none"  # sorted by the whole key, as Hydra sorts its override_dirname


def test_keys_that_end_alike_stay_whole():
    job = ["data.path=a.jsonl", "model.path=/m", "lora.r=8"]
    assert job_name(job, "data.path,model.path,lora.r", 1) == "1_data.path=a.jsonl,r=8,model.path=m"
    # paths and hub ids by their last part: what tells the runs apart (the whole value is in tags and config)
    assert job_name(["data.path=/data/v2/train.jsonl", "model.path=Qwen/Qwen2.5-0.5B"], None, None) \
        == "data.path=train.jsonl,model.path=Qwen2.5-0.5B"


def test_a_single_run_is_named_by_its_overrides_without_the_location_keys():
    """Where a run writes or reads is no part of its name, as each key declares (core/effects.py)."""
    assert job_name(["optim.max_steps=3", "lora.r=8", "logger.wandb.mode=online", "cache_dir=/c", "resume=auto",
                     "log.progress_bar=false", "hydra.run.dir=/x", "sweep.resume=true"], None, None) \
        == "r=8,max_steps=3"
    assert job_name(["quantization=torchao_nf4", "quantization.block_size=32", "logger=[wandb,mlflow]"], None, None) \
        == "logger=wandb,mlflow,quantization=torchao_nf4,block_size=32"  # sorted by the whole key
    assert job_name([], None, None) == "default"


def test_a_sweep_whose_keys_did_not_reach_the_job_uses_every_override():
    """A launcher that drops the environment: the name is longer, never wrong, and still numbered."""
    assert job_name(["lora.r=8", "optim.max_steps=3"], None, 2) == "2_r=8,max_steps=3"
    assert job_name(["lora.r=8"], "", 0) == "0_r=8"  # a multirun that sweeps nothing


def test_long_names_are_cut_with_a_hash_that_keeps_them_unique_and_stable():
    def name(decay):  # optim.weight_decay sorts last: the cap cuts it off
        return job_name(["optim.lr=1e-4", f"optim.weight_decay={decay}", "lora.alpha=32", "lora.dropout=0.05",
                         "data.micro_batch_size=8", "optim.warmup_steps=100"],
                        "optim.lr,optim.weight_decay,lora.alpha,lora.dropout,data.micro_batch_size,optim.warmup_steps",
                        0)

    a, b = name("0.01"), name("0.02")
    assert len(a) == len(b) == NAME_CAP + 2  # + the job number
    assert a != b and a[:-8] == b[:-8]  # the same head, told apart by the hash
    assert a == name("0.01")  # stable
    assert SAFE.match(a) and SAFE.match(job_name(["data.path='/a b/ü?*.jsonl'"], None, None))


def test_swept_keys_are_every_kind_of_sweep_and_the_sweeper_params():
    task = ["lora.r=8,16", "data.path=x.jsonl", "optim.lr=range(1,3)", "+extra=choice(1,2)",
            "lora.target_modules=[q_proj,v_proj]", "quantization=nf4,none"]
    assert swept_keys(task, {"seed": "1,2", "lora.r": "8,16"}) == ["lora.r", "optim.lr", "extra", "quantization",
                                                                      "seed"]
    assert swept_keys(["lora.r=8"], None) == []
