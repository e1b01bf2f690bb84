"""Nothing lost, nothing silent (docs/bad_inputs.md): a run dir is never silently reused, a restart keeps one
history, a resume never destroys finished work, and every way a run ends (interrupted while loading, a run dir
that stops taking writes) leaves a readable summary.json."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import compose_run, interactive_signals, records, step_records, train_py
from qlora_lab.core.errors import CheckpointError, DataError, OutputError, RunDirInUse, TrainingInterrupted, exit_code
from qlora_lab.runner import run as run_mod
from qlora_lab.runner import rundir, sweep
from qlora_lab.runner.run import run
from qlora_lab.sinks import summary as summary_mod
from qlora_lab.sinks.jsonl import JsonlSink
from qlora_lab.sinks.summary import write_summary
from qlora_lab.train import checkpoint
from qlora_lab.train import step as step_mod
from wandb_reader import read_runs

STEPS = 4
# Fast and real: the tiny model, a checkpoint after every step (the last three kept), the eval loss on 16 rows.
BASE = [f"optim.max_steps={STEPS}", "save.every_steps=1", "save.keep_last=3", "logger=none", "eval=loss",
        "eval.every_steps=0", "data.metrics=[]", "data.max_eval_rows=16", "device=cpu"]


def _run(cache_dir, out: Path, overrides: list[str], base: list[str] = BASE):
    return run(compose_run(cache_dir, out, base + overrides), overrides=overrides)


def _files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run dir and its bytes (what must stay as it was)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(module_run) -> Path:
    """A finished run with checkpoints at steps 1-3 (trained once for this file); never changed by a test."""
    return module_run(BASE)


@pytest.fixture
def run_dir(finished, copy_run) -> Path:
    return copy_run(finished)


def test_new_run_into_a_run_dir_that_holds_one_is_refused(run_dir, cache_dir):
    before = _files(run_dir)
    with pytest.raises(RunDirInUse) as e:
        _run(cache_dir, run_dir, ["optim.max_steps=2", "lora.r=8"])
    msg = str(e.value)
    assert f"output_dir={run_dir} holds a finished run ({STEPS} steps)" in msg
    assert "resume=auto" in msg and "hydra.run.dir=<new dir>" in msg and "overwrite=true" in msg
    assert _files(run_dir) == before  # refused before anything was written
    assert exit_code(e.value) == 2


def test_overwrite_moves_the_old_run_aside(run_dir, cache_dir):
    before = _files(run_dir)
    summary = _run(cache_dir, run_dir, ["optim.max_steps=2", "lora.r=8", "overwrite=true"])
    assert summary["summary/steps"] == 2
    (moved,) = (run_dir / "replaced").iterdir()
    assert _files(moved) == before  # the whole earlier run, byte for byte
    assert [r["step"] for r in records(run_dir)] == [1, 2]
    assert [r["step"] for r in records(moved)] == list(range(1, STEPS + 1))
    # what truncation did to the rows rides on step 1's record and the summary (the shipped rows fit)
    assert records(run_dir)[0]["data/rows"] == 4000 and records(run_dir)[0]["data/dropped_rows"] == 0
    assert summary["summary/dropped_rows"] == summary["summary/truncated_rows"] == 0
    assert rundir.held_run(moved) and "replaced" not in rundir.RUN_FILES


def test_a_run_refused_for_its_data_does_not_block_the_fixed_command(cache_dir, tmp_path):
    """A bad data file refuses the run before it trains, and its record (summary.json: failed_config) must not make
    the same command, once the file is fixed, ask for resume or overwrite: the record moves aside, the run starts."""
    rows, out = tmp_path / "rows.jsonl", tmp_path / "run"
    rows.write_text("")
    with pytest.raises(DataError, match="has no rows"):
        _run(cache_dir, out, ["data=jsonl", f"data.path={rows}"])
    refused = _files(out)
    assert json.loads(refused["summary.json"])["summary/status"] == "failed_config" and rundir.refused_run(out)
    shutil.copy(Path(run_mod.__file__).parents[1] / "assets" / "tiny_tasks.jsonl", rows)
    summary = _run(cache_dir, out, ["data=jsonl", f"data.path={rows}"])
    assert summary["summary/status"] == "finished" and summary["summary/steps"] == STEPS
    (moved,) = (out / "replaced").iterdir()
    assert _files(moved) == refused  # the refusal's record, byte for byte
    assert not rundir.refused_run(out)


def test_resume_auto_on_a_finished_run_changes_nothing(run_dir, cache_dir, capsys):
    before = _files(run_dir)
    summary = _run(cache_dir, run_dir, ["resume=auto"])
    assert summary["summary/status"] == "finished" and summary["summary/steps"] == STEPS
    assert "nothing to continue, nothing changed" in capsys.readouterr().out
    assert _files(run_dir) == before


def test_resume_at_or_below_the_checkpoint_step_is_refused(run_dir, cache_dir):
    """The reported case: a finished 4-step run, then resume=<its step_3 checkpoint> optim.max_steps=2 ran 0 steps
    and replaced the final adapter with step 3's. Now refused before anything is touched."""
    before = _files(run_dir)
    step3 = run_dir / "checkpoints" / "step_0000003"
    with pytest.raises(CheckpointError, match=r"step_0000003 is at step 3 and this run stops at step 2, so nothing "
                                              r"would train.*raise optim.max_steps above 3"):
        _run(cache_dir, run_dir, [f"resume={step3}", "optim.max_steps=2"])
    step1 = run_dir / "checkpoints" / "step_0000001"
    with pytest.raises(CheckpointError, match=r"finished 4 steps; continuing step_0000001 to step 3 would replace"):
        _run(cache_dir, run_dir, [f"resume={step1}", "optim.max_steps=3"])
    assert _files(run_dir) == before  # the finished run's summary.json still says finished


def test_crash_before_the_first_checkpoint_then_resume_auto_keeps_one_history(cache_dir, tmp_path, monkeypatch):
    """The README's crash recipe before the first checkpoint: each step once in metrics.jsonl, one W&B run."""
    out = tmp_path / "run"
    args = ["save.every_steps=0", "logger=wandb"]
    real, calls = step_mod.forward_loss, {"n": 0}

    def crash_at_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(step_mod, "forward_loss", crash_at_step_3)
    with pytest.raises(RuntimeError):
        _run(cache_dir, out, args)
    (out / "summary.json").unlink()  # what a SIGKILL leaves: no summary, metrics of steps 1-2, a W&B run
    monkeypatch.setattr(step_mod, "forward_loss", real)
    summary = _run(cache_dir, out, args + ["resume=auto"])
    assert summary["summary/status"] == "finished" and summary["summary/resumed_from_step"] == 0
    assert sorted(step_records(out)) == list(range(1, STEPS + 1))  # no step twice
    assert [r["step"] for r in records(out, "metrics.rolled_back.jsonl")] == [1, 2]
    first, second = read_runs(out)
    assert first["run"].run_id == second["run"].run_id  # one W&B run, rewound and refilled
    assert [h["_step"] for h in second["history"] if "train/loss" in h] == list(range(1, STEPS + 1))
    resumes = json.loads((out / "run_info.json").read_text())["resumes"]
    assert resumes[-1]["checkpoint"] is None and resumes[-1]["step"] == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_while_loading_is_recorded(cache_dir, tmp_path, monkeypatch, signum):
    def interrupted(*a, **k):  # the signal arrives while the weights load
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(run_mod, "build_model", interrupted)
    previous = signal.getsignal(signal.SIGINT)
    interactive_signals()
    out = tmp_path / "run"
    try:
        with pytest.raises(TrainingInterrupted) as e:
            _run(cache_dir, out, [])
    finally:
        signal.signal(signal.SIGINT, previous)
    msg = str(e.value)
    assert f"stopped by {signal.Signals(signum).name}" in msg and "before training started" in msg
    assert "no checkpoint was written" in msg and f"resume=auto hydra.run.dir={out}" in msg
    assert exit_code(e.value) == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary/status"] == "interrupted" and "no checkpoint was written" in summary["summary/reason"]


def test_a_second_ctrl_c_names_the_last_whole_checkpoint(cache_dir, tmp_path, monkeypatch):
    real, calls = step_mod.forward_loss, {"n": 0}

    def second_signal_at_step_3(*a, **k):  # what StopRequest raises on a second Ctrl-C
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("a second SIGINT")
        return real(*a, **k)

    monkeypatch.setattr(step_mod, "forward_loss", second_signal_at_step_3)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="stopped by a second SIGINT during training; the last whole "
                                                  "checkpoint is step_0000002: continue with resume=auto"):
        _run(cache_dir, out, [])
    assert json.loads((out / "summary.json").read_text())["summary/status"] == "interrupted"


def test_run_dir_that_turns_read_only_mid_run(cache_dir, tmp_path, monkeypatch):
    real = JsonlSink.log

    def read_only_from_step_3(self, metrics, step):
        if step >= 3:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(self, metrics, step)

    monkeypatch.setattr(JsonlSink, "log", read_only_from_step_3)
    out = tmp_path / "run"
    with pytest.raises(OutputError, match=r"failed \(the file system is read-only\); the run dir .* must stay "
                                          r"writable.*resume=auto"):
        _run(cache_dir, out, [])
    assert [r["step"] for r in records(out)] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary/status"] == "failed_config" and "read-only" in summary["summary/reason"]


def test_checkpoint_dir_that_cannot_be_created(cache_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(checkpoint.Checkpointer, "root", property(lambda self: blocker / "checkpoints"))
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="writing the checkpoint of step 1 .* failed .*nothing partial"):
        _run(cache_dir, out, [])
    assert json.loads((out / "summary.json").read_text())["summary/status"] == "failed_config"


def test_a_summary_that_cannot_be_written_does_not_hide_the_failure(cache_dir, tmp_path, monkeypatch, capsys):
    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(summary_mod, "write_summary", read_only)
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        _run(cache_dir, tmp_path / "run", ["data=jsonl", f"data.path={bad}"])
    assert "could not record the failure in" in capsys.readouterr().err


def test_summary_json_is_strict_json(tmp_path):
    write_summary(tmp_path, {"summary/eval_loss": float("nan"), "summary/final_loss": float("inf")})
    strict = json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert strict == {"summary/eval_loss": None, "summary/final_loss": None}


# ---- Hydra's side: the dirs it creates before our code runs ----

def _hydra_cfg(**hydra) -> OmegaConf:
    """The part of a composed config the guard reads, with what Hydra always sets (the job's name, the overrides)."""
    mode = "RunMode.MULTIRUN" if "sweep" in hydra else "RunMode.RUN"
    return OmegaConf.create({"hydra": {"output_subdir": ".hydra", "job": {"name": "train"}, "mode": mode,
                                       "overrides": {"task": [], "hydra": []}, **hydra},
                             "mode": "train", "overwrite": False, "sweep": {"resume": False}})


def test_run_dir_guard_keeps_the_runs_own_hydra_record(finished, tmp_path):
    cfg = _hydra_cfg(run={"dir": str(finished)})
    rundir.RunDirGuard().on_run_start(cfg)
    assert cfg.hydra.output_subdir == rundir.HYDRA_NEW  # Hydra writes this command's record beside the run's
    fresh = _hydra_cfg(run={"dir": str(tmp_path / "new")})
    rundir.RunDirGuard().on_run_start(fresh)
    assert fresh.hydra.output_subdir == ".hydra"


@pytest.mark.parametrize("key,value,needle", [
    ("run", "{tmp}/a-file/run", "cannot be created or written"),
    ("run", "~/runs/x", "the shell does not expand ~ after key="),
    ("sweep", "{tmp}/a-file/sweep", "cannot be created or written"),
])
def test_run_and_sweep_dirs_that_cannot_be_created(tmp_path, capsys, key, value, needle):
    (tmp_path / "a-file").write_text("not a directory")
    cfg = _hydra_cfg(**{key: {"dir": value.format(tmp=tmp_path)}})
    with pytest.raises(SystemExit) as e:
        (rundir.RunDirGuard().on_run_start if key == "run" else rundir.RunDirGuard().on_multirun_start)(cfg)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_rerun_sweep_into_its_dir_is_refused(finished, tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(finished, sweep_dir / "0_lora.r=8")
    with pytest.raises(SystemExit) as e:
        rundir.RunDirGuard().on_multirun_start(_hydra_cfg(sweep={"dir": str(sweep_dir)}))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "holds 1 job(s) of an earlier sweep (0_lora.r=8)" in err and "sweep.resume=true" in err
    assert rundir.sweep_dir_problem(sweep_dir, resume=True, overwrite=False) is None


def test_sweep_resume_continues_an_unfinished_job(finished, tmp_path, monkeypatch, compose):
    job = tmp_path / "sweep" / "1_job"
    shutil.copytree(finished, job)
    (job / "summary.json").unlink()  # killed mid-run
    seen = {}
    monkeypatch.setattr(sweep, "run", lambda cfg, overrides: seen.update(resume=cfg.resume))
    cfg = compose(["sweep.resume=true", "sweep.isolate=false"], out=job)
    sweep.run_job(cfg, ["lora.r=8"], tmp_path / "sweep", job.name)
    assert seen == {"resume": "auto"}


def test_refused_command_keeps_the_run_and_its_hydra_record(cache_dir, tmp_path):
    """From the command line: exit status 2, every fix on stderr, and the run's files and .hydra/ as they were."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 6.6}\n')
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("the run's own record\n")
    before = _files(run_dir)
    res = train_py(["optim.max_steps=2", "logger=none"], cache_dir, tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "holds an unfinished run (metrics.jsonl up to step 1" in res.stderr and "overwrite=true" in res.stderr
    assert "Traceback" not in res.stderr
    assert _files(run_dir) == before and not (run_dir / rundir.HYDRA_NEW).exists()


def test_a_run_dir_named_by_hydra_interpolations_is_guarded_too(cache_dir, tmp_path):
    """The default run dir is named with ${hydra:...} interpolations, which resolve only once Hydra has set its
    config; the guard resolves them before that (it used to warn and let the run through)."""
    run_dir = tmp_path / "train" / "run"  # ${hydra:job.name} is the script's name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 6.6}\n')
    res = train_py(["optim.max_steps=2", "logger=none"], cache_dir, f"{tmp_path}/${{hydra:job.name}}")
    assert res.returncode == 2 and "holds an unfinished run" in res.stderr, res.stderr[-2000:]
    assert "RunDirGuard" not in res.stderr and "Traceback" not in res.stderr
