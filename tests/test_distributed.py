"""Several processes (torchrun, gloo on the CPU): DDP and FSDP2 train what one process trains.

Two processes with 4 rows each per step against one process accumulating two micro-batches of 4 rows: the same
rows per step, and each process's share of a step is exactly one of the one-process micro-batches (same rows, same
padded width). So DDP must give the very same numbers, and FSDP differs only by its bf16 all-gather and compute of
the fp32 LoRA weights. Checkpoints hold gathered tensors, so a run moves between 1 and 2 processes (and between
DDP, FSDP and none) on resume.

Tolerances for FSDP, from measurement (12 steps of these runs, CPU): FSDP vs one process differed by at most
8.9e-4 (loss), 2.4e-3 (grad norm) and 2.6e-2 (adapter tensors, relative); the same rounding in one process (bf16
instead of fp32 LoRA weights) moved them by 1.8e-3, 4.0e-3 and 2.6e-2. The bounds are twice the latter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, launch, max_rel
from helpers import step_records as records
from qlora_lab.core.errors import CheckpointError
from qlora_lab.core.resolvers import launch_time
from qlora_lab.runner import preflight as v
from qlora_lab.train import checkpoint
from wandb_reader import read_run


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


FSDP_LOSS, FSDP_GRAD_NORM, FSDP_ADAPTER = 2 * 1.8e-3, 2 * 4.0e-3, 2 * 2.6e-2  # see the module docstring
ONE = ["data.micro_batch_size=4", "optim.grad_accum_steps=2"]  # one process, the same 8 rows a step


@pytest.fixture(scope="module")
def runs(cache_dir, tmp_path_factory) -> dict[str, Path]:
    """The same 12 steps of 8 rows: one process accumulating 2 x 4 rows, 2 processes x 4 rows under DDP and FSDP."""
    root = tmp_path_factory.mktemp("dist")
    dirs = {"one": root / "one", "ddp": root / "ddp", "fsdp": root / "fsdp"}
    launch(ONE, cache_dir, dirs["one"])
    launch(["distributed=ddp", "data.micro_batch_size=4"], cache_dir, dirs["ddp"], processes=2)
    launch(["distributed=fsdp", "data.micro_batch_size=4"], cache_dir, dirs["fsdp"], processes=2)
    return dirs


def adapter_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest error of a LoRA tensor relative to that tensor's norm."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).norm() / b[k].float().norm()) for k in b if b[k].float().norm() > 0)


def test_ddp_trains_exactly_what_one_process_trains(runs):
    """The same computation, provably: each process's forward and backward is one of the one-process micro-batches,
    and DDP's average of the two processes' gradients (each scaled by 2) is their sum exactly (scaling by 2 is exact
    and a sum of two terms does not depend on their order). So every number is equal, not close."""
    one, ddp = records(runs["one"]), records(runs["ddp"])
    assert sorted(one) == sorted(ddp) == list(range(1, 13)), "rank 0 alone logs each step once"
    for s in one:
        for key in ("train/loss", "train/grad_norm", "train/tokens", "train/lr"):
            assert ddp[s][key] == one[s][key], (s, key)
    a, b = adapter(runs["ddp"]), adapter(runs["one"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_trains_what_one_process_trains_within_bf16_rounding(runs):
    one, fsdp = records(runs["one"]), records(runs["fsdp"])
    assert sorted(fsdp) == list(range(1, 13)), "rank 0 alone logs each step once"
    assert fsdp[1]["train/loss"] == one[1]["train/loss"]  # before any update the LoRA B matrices are 0: same math
    assert max_rel(fsdp, one, "train/loss", range(1, 13)) < FSDP_LOSS
    assert max_rel(fsdp, one, "train/grad_norm", range(1, 13)) < FSDP_GRAD_NORM
    assert all(fsdp[s]["train/tokens"] == one[s]["train/tokens"] for s in one), "tokens are global"
    assert adapter_error(adapter(runs["fsdp"]), adapter(runs["one"])) < FSDP_ADAPTER


def test_only_rank_zero_writes(runs):
    for name in ("ddp", "fsdp"):
        run = runs[name]
        info = json.loads((run / "run_info.json").read_text())
        assert info["processes"] == 2 and info["config"]["distributed"]["name"] == name
        summary = json.loads((run / "summary.json").read_text())
        assert summary["summary/processes"] == 2
        # the whole model's parameter count, not one process's FSDP shard
        assert summary["summary/total_params"] == json.loads(
            (runs["one"] / "summary.json").read_text())["summary/total_params"]
        wandb_runs = list((run / "wandb").glob("offline-run-*"))
        assert len(wandb_runs) == 1, wandb_runs
        assert read_run(run)["run"].run_id
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000006"]
        assert not list(run.parent.glob(f"{name}?*")), "no second run dir from another rank"


def test_resume_moves_between_one_and_two_processes(runs, cache_dir, tmp_path):
    # 2 FSDP processes -> 1 process: the gathered checkpoint loads into an unsharded model
    two_to_one = tmp_path / "two_to_one"
    shutil.copytree(runs["fsdp"], two_to_one)
    res = launch(ONE + [f"resume={two_to_one}/checkpoints/step_0000006"], cache_dir, tmp_path / "unused1")
    assert "processes: 2 -> 1 (rows per step stay 8)" in res.stdout
    # 1 process -> 2 FSDP processes: the gathered checkpoint is sharded on load
    one_to_two = tmp_path / "one_to_two"
    shutil.copytree(runs["one"], one_to_two)
    res = launch(["distributed=fsdp", "data.micro_batch_size=4", f"resume={one_to_two}/checkpoints/step_0000006"],
                 cache_dir, tmp_path / "unused2", processes=2)
    assert "processes: 1 -> 2 (rows per step stay 8)" in res.stdout
    for resumed, original in ((two_to_one, runs["fsdp"]), (one_to_two, runs["one"])):
        got, ref = records(resumed), records(original)
        assert sorted(got) == list(range(1, 13))
        assert len(records(resumed, "metrics.rolled_back.jsonl")) == 6  # the original steps 7..12, kept aside
        assert max_rel(got, ref, "train/loss", range(7, 13)) < FSDP_LOSS  # one side ran FSDP: its bf16 rounding


def test_resume_refuses_another_number_of_rows_per_step(runs):
    ckpt = runs["fsdp"] / "checkpoints" / "step_0000006"
    config = json.loads((ckpt / "config.json").read_text())["config"]
    with pytest.raises(CheckpointError, match=r"4 x 1 x 2 = 8 -> 4 x 1 x 1 = 4; keep 8 rows "
                                              r"\(e.g. data.micro_batch_size=8\)"):
        checkpoint.check_compatible(ckpt, config, None, world_size=1)
    config["data"]["micro_batch_size"] = 2
    assert "processes: 2 -> 4 (rows per step stay 8)" in checkpoint.check_compatible(ckpt, config, None, 4)


def test_every_process_composes_the_same_run_dir(monkeypatch):
    """Ranks start moments apart; the run dir's time is the launcher's start, so they agree."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    parent = psutil.Process(os.getppid()).create_time()
    assert launch_time("%Y-%m-%d_%H-%M-%S") == time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(parent))


def test_launcher_with_distributed_none_is_refused(compose, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(v.ConfigError, match="add distributed=ddp .* or distributed=fsdp"):
        v.validate(OmegaConf.to_object(compose([])))
    v.validate(OmegaConf.to_object(compose(["distributed=ddp"])))


def test_sweep_under_a_launcher_is_refused(cache_dir, tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "HYDRA_FULL_ERROR": "0"}
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "lora.r=8,16", f"cache_dir={cache_dir}",
                          f"hydra.sweep.dir={tmp_path}/sweep"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "fans its jobs out itself" in res.stderr
