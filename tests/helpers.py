"""What several test files share: running train.py as a user does, and reading back what a run wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# On a child's PYTHONPATH, faults/sitecustomize.py gives every batch holding a row with POISON in it a NaN loss.
FAULTS = Path(__file__).parent / "faults"


def child_env(faults: bool = False, threads: int = 2) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HYDRA_FULL_ERROR": "0"}
    if faults:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAULTS), env.get("PYTHONPATH")) if p)
    return env


def interactive_signals() -> None:
    """SIGINT as an interactive shell gives it to a command: delivered (not blocked) and, in Python, raising
    KeyboardInterrupt. In one 2-core run of the whole suite SIGINT was blocked in the test process when test 333 ran (a
    blocked SIGINT reproduces both failures seen: a signal that never arrives, and a sweep child that inherits the
    mask and never stops), so a test that needs Ctrl-C sets that precondition instead of assuming it. For a child
    process use it as `preexec_fn`: the child's Python then installs its own handler, as it does under a shell."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL if os.getpid() != PYTEST_PID else signal.default_int_handler)


PYTEST_PID = os.getpid()


def train_py(args: list[str], cache_dir, out_dir, timeout: int = 300, faults: bool = False,
             ) -> subprocess.CompletedProcess:
    """`python train.py ARGS` with the run dir at out_dir/run and the sweep dir at out_dir/sweep."""
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"cache_dir={cache_dir}", "log.progress_bar=false",
           f"hydra.run.dir={out_dir}/run", f"hydra.sweep.dir={out_dir}/sweep"]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(faults), capture_output=True, text=True, timeout=timeout)


def start(args: list[str], cache_dir, out_dir) -> subprocess.Popen:
    """train.py in the background (stdout and stderr together), with the run dir at out_dir/run."""
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"cache_dir={cache_dir}", "log.progress_bar=false",
           f"hydra.run.dir={out_dir}/run"]
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}:\n{proc.stdout.read()[-3000:]}")
        if metrics.is_file() and any(json.loads(line).get("step", 0) >= step
                                     for line in metrics.read_text().splitlines() if line.endswith("}")):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / name).read_text().splitlines()]


def step_records(run_dir: Path, name: str = "metrics.jsonl") -> dict[int, dict]:
    """The training records of a run by step; fails if a step was logged twice."""
    out: dict[int, dict] = {}
    for r in records(run_dir, name):
        if "train/loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice in {Path(run_dir) / name}"
            out[r["step"]] = r
    return out


def max_rel(a: dict[int, dict], b: dict[int, dict], key: str, steps) -> float:
    return max(abs(a[s][key] - b[s][key]) / abs(b[s][key]) for s in steps)


# What the multi-process tests share: 12 steps with a checkpoint at 6, no dropout (its masks depend on how rows are
# split over processes), 4-bit weights packed as bf16 (what FSDP shards), and the base computing in bf16 as FSDP's
# param_dtype makes it (dtype auto would be fp32 on the CPU, and step 1 would then differ by bf16 rounding alone).
DIST_COMMON = ("optim.max_steps=12", "lora.dropout=0", "save.every_steps=6", "eval=loss", "eval.every_steps=0",
               "quantization.quant_storage=bfloat16", "model.dtype=bfloat16", "quantization.compute_dtype=bfloat16",
               "log.progress_bar=false")


def launch(args: list[str], cache_dir: Path, run_dir: Path, processes: int | None = None,
           common: tuple[str, ...] = DIST_COMMON) -> subprocess.CompletedProcess:
    """train.py with `common` + `args`: under torchrun with `processes` processes, or plain python (None)."""
    env = child_env(threads=1)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes else [sys.executable]
    cmd = [*head, str(ROOT / "train.py"), *common, *args, f"cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:  # the lines that say why, from whichever process failed, then the tail
        why = [x for x in res.stderr.splitlines() if any(k in x for k in ("Error", "terminate", "rank", "what()"))]
        pytest.fail(f"exit {res.returncode}\n" + "\n".join(why[-40:]) + "\n--- stderr tail ---\n" + res.stderr[-3000:])
    return res


def compose_run(cache_dir, out: Path, overrides: list[str]):
    """The config train.py would compose for `overrides`, with the run dir at `out` (for in-process runs)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[f"output_dir={out}", f"cache_dir={cache_dir}", "run_name=t",
                                                       "sweep_id=null", "log.progress_bar=false", *overrides])


def fake_checkpoint(path: Path, max_positions: int = 2048) -> Path:
    """A directory that looks like a saved checkpoint to the file checks (config.json, tokenizer.json and a
    well-formed safetensors file); nothing in it is loadable as a model."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": max_positions}))
    (path / "tokenizer.json").write_text("{}")
    save_file({"w": torch.zeros(4, 4)}, str(path / "model.safetensors"))
    return path
