"""train.py as a user runs it: a 2-job sweep in one W&B group, an experiment preset, bad input; the qlora-lab
commands around it."""

from __future__ import annotations

import json

import pytest

from helpers import train_py
from qlora_lab import cli
from wandb_reader import read_run


def test_qlora_lab_has_every_command(capsys):
    """export (issue 26), reproduce and rerun (issue 31): one dispatcher, each command's own --help."""
    assert set(cli.COMMANDS) == {"export", "reproduce", "rerun"}
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0 and f"qlora-lab {name}" in capsys.readouterr().out


def test_two_job_multirun_gives_two_runs_in_one_group(cache_dir, tmp_path):
    res = train_py(["-m", "lora.r=8,16", "optim.max_steps=3", "eval.every_steps=0"], cache_dir, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and (p / "metrics.jsonl").exists())
    # Named by what the sweep varies; the constant overrides are in the tags and the config.
    assert [p.name for p in jobs] == ["0_r=8", "1_r=16"]
    runs = [read_run(p) for p in jobs]
    assert [r["run"].display_name for r in runs] == ["0_r=8", "1_r=16"]
    assert set(runs[0]["run"].tags) == {"lora.r=8", "optim.max_steps=3", "eval.every_steps=0"}
    assert runs[0]["run"].run_group == runs[1]["run"].run_group == "sweep"
    assert [r["config"]["lora.r"] for r in runs] == [8, 16]
    assert runs[0]["run"].run_id != runs[1]["run"].run_id
    trainable = [json.loads((p / "summary.json").read_text())["summary/trainable_params"] for p in jobs]
    assert trainable[1] == 2 * trainable[0]  # the override reached the model: LoRA size is linear in r


def test_experiment_preset_runs_on_the_tiny_model(cache_dir, tmp_path):
    res = train_py(["experiment=phi4_mini_qlora", "model=tiny", "optim.max_steps=2", "logger=none"],
                   cache_dir, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["config"]["data"]["micro_batch_size"] == 4 and info["config"]["model"]["name"] == "tiny"


def test_bad_input_exits_nonzero_with_every_fix_before_loading(cache_dir, tmp_path):
    res = train_py(["lora.r=0", "lora.dropout=1.5", "data=jsonl", f"data.path={tmp_path}/none.jsonl"],
                   cache_dir, tmp_path)
    assert res.returncode != 0
    assert "3 problem(s) in the config" in res.stderr
    assert "lora.r=0 must be a positive integer" in res.stderr and "does not exist" in res.stderr
    assert not (tmp_path / "run").exists()  # failed before anything was written: Hydra's dir is removed too


def test_unknown_option_from_the_command_line(cache_dir, tmp_path):
    res = train_py(["checkpointing=sometimes"], cache_dir, tmp_path)
    assert res.returncode != 0
    assert "Could not find 'checkpointing/sometimes'" in res.stderr and "non_reentrant" in res.stderr
