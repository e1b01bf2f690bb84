"""Crash and resume: a run killed by SIGKILL and resumed continues bit-identically; checkpoints are atomic."""

from __future__ import annotations

import json
import os
import random
import signal

import pytest
import torch
from safetensors.torch import load_file

from helpers import records, start, train_py, wait_for_step
from qlora_lab.train import checkpoint
from wandb_reader import read_runs

STEPS, EVERY = 30, 4
ARGS = [f"optim.max_steps={STEPS}", f"save.every_steps={EVERY}", "save.keep_last=2", "eval=loss",
        "eval.every_steps=10"]
EXACT = ("train/loss", "train/grad_norm", "train/lr", "train/tokens", "train/epoch", "eval/loss")


@pytest.fixture(scope="module")
def full(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("full")
    res = train_py(ARGS, cache_dir, out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "run"


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("killed")
    kill_at = random.Random(7).randint(EVERY + 1, STEPS - EVERY - 1)  # a step that is no checkpoint's
    proc = start(ARGS, cache_dir, out)
    wait_for_step(proc, out / "run" / "metrics.jsonl", kill_at)
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs: what is on disk is all there is
    proc.wait()
    proc.stdout.close()
    run_dir = out / "run"
    before = records(run_dir)
    res = train_py(ARGS + ["resume=auto"], cache_dir, out)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir, before, res


def test_killed_run_resumes_bit_identically(full, killed_and_resumed):
    run_dir, before, res = killed_and_resumed
    resumed_from = json.loads((run_dir / "run_info.json").read_text())["resumes"][0]["step"]
    assert resumed_from % EVERY == 0 and 0 < resumed_from <= before[-1]["step"]
    assert f"from step_{resumed_from:07d}" in res.stdout
    want, got = records(full), records(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # no step missing, none twice
    for w, g in zip(want, got):
        for key in EXACT:
            assert g.get(key) == w.get(key), f"step {g['step']} {key}: {g.get(key)!r} != {w.get(key)!r}"
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (full, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_records_logged_after_the_checkpoint_are_rolled_back_not_lost(killed_and_resumed):
    run_dir, before, _ = killed_and_resumed
    step = json.loads((run_dir / "run_info.json").read_text())["resumes"][0]["step"]
    rolled = run_dir / "metrics.rolled_back.jsonl"
    dropped = [r for r in before if r["step"] > step]
    assert dropped, "the kill came after steps past the checkpoint were logged"
    assert [json.loads(line)["step"] for line in rolled.read_text().splitlines()] == [r["step"] for r in dropped]


def test_resumed_run_continues_the_same_wandb_run(killed_and_resumed):
    run_dir, before, _ = killed_and_resumed
    first, second = read_runs(run_dir)
    # The killed process's W&B file may miss its last seconds (SIGKILL stops W&B's buffered writer too), so the
    # resumed process rewinds the same run id to its start and refills it from metrics.jsonl.
    assert first["run"] is None or first["run"].run_id == second["run"].run_id
    assert second["config"]["_wandb"]["branch_point"]["step"] == 0
    assert second["run"].run_id == second["config"]["_wandb"]["branch_point"]["run_id"]
    history = [h for h in second["history"] if "train/loss" in h]
    assert [h["_step"] for h in history] == list(range(1, STEPS + 1))  # one continuous step axis
    assert [h["train/loss"] for h in history] == [r["train/loss"] for r in records(run_dir)]
    assert second["summary"]["summary/status"] == "finished"


def test_only_the_last_checkpoints_are_kept_and_all_are_whole(killed_and_resumed):
    run_dir, _, _ = killed_and_resumed
    kept = checkpoint.all_checkpoints(run_dir)
    assert [checkpoint.step_of(p) for p in kept] == [STEPS - STEPS % EVERY - EVERY, STEPS - STEPS % EVERY]
    assert all(checkpoint.verify(p) is None for p in kept)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_ctrl_c_writes_a_checkpoint_and_the_run_resumes_exactly(full, tmp_path, cache_dir):
    proc = start(ARGS, cache_dir, tmp_path)
    run_dir = tmp_path / "run"
    wait_for_step(proc, run_dir / "metrics.jsonl", 6)
    os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "finishing this step and writing a checkpoint" in out and "continue with resume=auto" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["summary/status"] == "interrupted"
    stopped_at = records(run_dir)[-1]["step"]
    assert checkpoint.step_of(checkpoint.valid_checkpoints(run_dir)[-1]) == stopped_at  # not a step lost
    res = train_py(ARGS + ["resume=auto"], cache_dir, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = records(full), records(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert all(g.get(k) == w.get(k) for w, g in zip(want, got) for k in EXACT)


def test_auto_micro_batch_is_recorded_as_the_integer_that_ran_and_resumes_with_it(compose, tmp_path):
    """data.micro_batch_size=auto is resolved before anything is recorded: run_info.json, the checkpoint and W&B hold
    the integer, so a resume that names that integer (or says auto again) continues the run."""
    from qlora_lab.runner.run import run

    out = tmp_path / "run"
    args = ["plan.gpu_memory_gib=1", "plan.max_micro_batch=8", "optim.max_steps=4", "save.every_steps=2",
            "logger=none", "eval=loss"]
    summary = run(compose(args + ["data.micro_batch_size=auto"], out=out))
    info = json.loads((out / "run_info.json").read_text())
    mb = info["config"]["data"]["micro_batch_size"]
    assert mb == summary["summary/micro_batch"] == 8  # the tiny model fits plan.max_micro_batch on 1 GiB
    assert info["resolved"]["data.micro_batch_size"] == ["auto", 8]
    ckpt = checkpoint.valid_checkpoints(out)[-1]
    assert json.loads((ckpt / "config.json").read_text())["config"]["data"]["micro_batch_size"] == 8
    for again in (f"data.micro_batch_size={mb}", "data.micro_batch_size=auto"):
        resumed = run(compose(args + [again, f"resume={ckpt}", "optim.max_steps=5"], out=out))
        assert resumed["summary/resumed_from_step"] == 2 and resumed["summary/micro_batch"] == 8
