"""Several processes (torchrun, gloo on the CPU): DDP and FSDP2 train what one process trains.

Two processes with 4 rows each per step against one process with 8 rows: same rows per step, so the per-step
losses, gradient norms and the saved adapters must agree (DDP: to float rounding; FSDP: its bf16 all-gather and
compute of the fp32 LoRA weights is the only difference). Checkpoints hold gathered tensors, so a run moves
between 1 and 2 processes (and between DDP, FSDP and none) on resume.
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

from conftest import ROOT
from wandb_reader import read_run

COMMON = ["optim.max_steps=12", "lora.dropout=0", "save.every_steps=6", "logger.eval_every=0",
          "quantization.quant_storage=bfloat16", "logger.progress_bar=false"]


def launch(args: list[str], cache_dir: Path, run_dir: Path,
           processes: int | None = None) -> subprocess.CompletedProcess:
    """train.py with `COMMON` + `args`: under torchrun with `processes` processes, or plain python (None)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes else [sys.executable]
    cmd = [*head, str(ROOT / "train.py"), *COMMON, *args, f"cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:  # the lines that say why, from whichever process failed, then the tail
        why = [x for x in res.stderr.splitlines() if any(k in x for k in ("Error", "terminate", "rank", "what()"))]
        pytest.fail(f"exit {res.returncode}\n" + "\n".join(why[-40:]) + "\n--- stderr tail ---\n" + res.stderr[-3000:])
    return res


def records(run_dir: Path, name: str = "metrics.jsonl") -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run_dir / name).read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice in {run_dir / name}"
            out[r["step"]] = r
    return out


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def max_rel(a: dict[int, dict], b: dict[int, dict], key: str, steps) -> float:
    return max(abs(a[s][key] - b[s][key]) / abs(b[s][key]) for s in steps)


@pytest.fixture(scope="module")
def runs(cache_dir, tmp_path_factory) -> dict[str, Path]:
    """The same 12 steps: one process x 8 rows, and 2 processes x 4 rows under DDP and under FSDP."""
    root = tmp_path_factory.mktemp("dist")
    dirs = {"one": root / "one", "ddp": root / "ddp", "fsdp": root / "fsdp"}
    launch(["data.micro_batch_size=8"], cache_dir, dirs["one"])
    launch(["distributed=ddp", "data.micro_batch_size=4"], cache_dir, dirs["ddp"], processes=2)
    launch(["distributed=fsdp", "data.micro_batch_size=4"], cache_dir, dirs["fsdp"], processes=2)
    return dirs


def test_two_processes_train_what_one_process_trains(runs):
    one = records(runs["one"])
    assert sorted(one) == list(range(1, 13))
    for name, tol in (("ddp", 1e-5), ("fsdp", 5e-3)):  # observed: ddp 0 (to 5 digits), fsdp 5e-4
        got = records(runs[name])
        assert sorted(got) == list(range(1, 13)), f"{name}: rank 0 alone logs each step once"
        assert max_rel(got, one, "train/loss", range(1, 13)) < tol, name
        assert max_rel(got, one, "train/grad_norm", range(1, 13)) < 2 * tol, name
        assert all(got[s]["train/tokens"] == one[s]["train/tokens"] for s in one), f"{name}: tokens are global"
        a, b = adapter(runs[name]), adapter(runs["one"])
        assert a.keys() == b.keys()
        # each LoRA tensor's error relative to that tensor's norm
        worst = max(float((a[k].float() - b[k].float()).norm() / b[k].float().norm()) for k in b
                    if b[k].float().norm() > 0)
        assert worst < 10 * tol, (name, worst)
    # FSDP's step-1 loss is computed before any update, in bf16 like the one-process base: equal to rounding
    assert abs(records(runs["fsdp"])[1]["train/loss"] - one[1]["train/loss"]) < 1e-4


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
    res = launch(["data.micro_batch_size=8", f"resume={two_to_one}/checkpoints/step_0000006"], cache_dir,
                 tmp_path / "unused1")
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
        assert max_rel(got, ref, "train/loss", range(7, 13)) < 5e-3


def test_resume_refuses_another_number_of_rows_per_step(runs):
    from qlora_lab import checkpoint
    from qlora_lab.checkpoint import CheckpointError

    ckpt = runs["fsdp"] / "checkpoints" / "step_0000006"
    config = json.loads((ckpt / "config.json").read_text())["config"]
    with pytest.raises(CheckpointError, match=r"4 x 1 x 2 = 8 -> 4 x 1 x 1 = 4; keep 8 rows "
                                              r"\(e.g. data.micro_batch_size=8\)"):
        checkpoint.check_compatible(ckpt, config, None, world_size=1)
    config["data"]["micro_batch_size"] = 2
    assert "processes: 2 -> 4 (rows per step stay 8)" in checkpoint.check_compatible(ckpt, config, None, 4)


def test_every_process_composes_the_same_run_dir(monkeypatch):
    """Ranks start moments apart; the run dir's time is the launcher's start, so they agree."""
    from qlora_lab.resolvers import launch_time

    monkeypatch.setenv("LOCAL_RANK", "1")
    parent = psutil.Process(os.getppid()).create_time()
    assert launch_time("%Y-%m-%d_%H-%M-%S") == time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(parent))


def test_launcher_with_distributed_none_is_refused(compose, monkeypatch):
    from omegaconf import OmegaConf

    from qlora_lab import validate as v

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
