"""Crash and resume: a run killed by SIGKILL and resumed continues bit-identically; checkpoints are atomic."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_cli import train_py
from wandb_reader import read_runs

STEPS, EVERY = 30, 4
ARGS = [f"optim.max_steps={STEPS}", f"save.every_steps={EVERY}", "save.keep_last=2", "logger.eval_every=10"]
EXACT = ("train/loss", "train/grad_norm", "train/lr", "train/tokens", "train/epoch", "eval/loss")


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def start(args, cache_dir, out_dir) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"cache_dir={cache_dir}", "logger.progress_bar=false",
           f"hydra.run.dir={out_dir}/run"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc: subprocess.Popen, metrics, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}:\n{proc.stdout.read()[-3000:]}")
        if metrics.is_file() and any(json.loads(line).get("step", 0) >= step
                                     for line in metrics.read_text().splitlines() if line.endswith("}")):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


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
    from qlora_lab import checkpoint

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
    from qlora_lab import checkpoint

    assert checkpoint.step_of(checkpoint.valid_checkpoints(run_dir)[-1]) == stopped_at  # not a step lost
    res = train_py(ARGS + ["resume=auto"], cache_dir, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = records(full), records(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert all(g.get(k) == w.get(k) for w, g in zip(want, got) for k in EXACT)
