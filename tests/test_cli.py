"""train.py as a user runs it: a 2-job sweep in one W&B group, an experiment preset, bad input; the qlora-lab
commands around it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT, child_env, train_py
from qlora_lab import cli
from wandb_reader import read_run


def test_qlora_lab_has_every_command(capsys):
    """compare (the sweep report), export (issue 26), reproduce and rerun (issue 31): one dispatcher, each
    command's own --help."""
    assert set(cli.COMMANDS) == {"compare", "export", "reproduce", "rerun"}
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


# Mistakes on train.py's command line that Hydra would refuse with its own message and exit status 1 (a crash's),
# the first leading to a second refusal (`To append to your config use +lora.rank=8`): each named with its fix,
# exit 2, before Hydra composes or writes anything.
COMMAND_LINE_CASES = [
    ("key_without_plus", ["lora.rank=8"], "lora.rank is not a key of LoraConfig; did you mean lora.r?"),
    ("option_unknown", ["checkpointing=sometimes"], "checkpointing=sometimes: no such option (checkpointing takes: "
                                                    "auto, non_reentrant, none, offload, reentrant"),
    ("option_misspelt", ["quantization=nf5"], "quantization=nf5: no such option; did you mean quantization=nf4?"),
    ("sink_misspelt", ["logger=[wandb,mlfow]"], "logger=mlfow: no such option; did you mean logger=mlflow?"),
    ("value_of_wrong_type", ["lora.r=abc"], "Error merging override lora.r=abc: Value 'abc' of type 'str' could "
                                            "not be converted to Integer"),
    ("swept_value_of_wrong_type", ["-m", "lora.r=4,abc"], "Error merging override lora.r=abc"),
    ("output_dir_in_a_sweep", ["-m", "lora.r=4,8", "output_dir=/tmp/x"],
     "output_dir=/tmp/x would put every job of the sweep in one dir; give hydra.sweep.dir=<dir>"),
    ("output_dir_beside_another_run_dir", ["output_dir=/tmp/x"],  # the helper gives hydra.run.dir=<tmp>/run
     "output_dir=/tmp/x and hydra.run.dir="),
]


@pytest.mark.parametrize("args,needle", [c[1:] for c in COMMAND_LINE_CASES], ids=[c[0] for c in COMMAND_LINE_CASES])
def test_command_line_mistakes(cache_dir, tmp_path, args, needle):
    res = train_py(args, cache_dir, tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "problem(s) on the command line" in res.stderr and needle in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "HYDRA_FULL_ERROR" not in res.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_a_sweep_with_a_job_that_cannot_run_is_refused_before_any_job_trains(cache_dir, tmp_path):
    """`lora.r=4,0`: job 1's value is refused; job 0 used to train to the end first (hours on a real model)."""
    res = train_py(["-m", "lora.r=4,0", "optim.max_steps=2", "logger=none"], cache_dir, tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "the sweep is refused before any job trains; 1 problem(s):" in res.stderr
    assert "job 1 (lora.r=0): lora.r=0 must be a positive integer (e.g. lora.r=16)" in res.stderr
    written = [p.name for p in (tmp_path / "sweep").rglob("*")]
    assert "metrics.jsonl" not in written and "summary.json" not in written


def test_output_dir_is_the_run_dir_and_train_log_holds_the_runs_lines(cache_dir, tmp_path):
    """output_dir=X alone: Hydra's record (.hydra/) lands beside the run's files, not in a second, time-stamped dir;
    train.log holds what the run printed (the package's logger does not propagate to Hydra's file handler); a plan
    leaves no dir."""
    out = tmp_path / "mine"
    cmd = [sys.executable, str(ROOT / "train.py"), f"output_dir={out}", f"cache_dir={cache_dir}", "optim.max_steps=2",
           "logger=none", "eval=loss", "eval.every_steps=0", "eval.at_start=false", "log.progress_bar=false"]
    res = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "summary.json").is_file()
    assert not (tmp_path / "run").exists()
    log = (out / "train.log").read_text()
    assert "first_loss=" in log and "time: launch" in log
    res = train_py(["mode=plan"], cache_dir, tmp_path)
    assert res.returncode == 0 and "predicted" in res.stdout and not (tmp_path / "run").exists()
