"""Sweeps: isolated jobs, failures recorded without stopping the sweep, W&B layout, resume, comparison report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from helpers import CONF, ROOT, child_env, interactive_signals, train_py
from qlora_lab import cli
from qlora_lab.core.paths import TINY_DATA
from qlora_lab.runner.compare import CompareError, compare, pareto_front, ranked
from qlora_lab.runner.preflight import validate
from qlora_lab.runner.sweep import _take_gpu
from wandb_reader import read_run

COMMON = ["checkpointing=none", "optim.max_steps=3", "optim.warmup_steps=0", "eval=loss", "eval.every_steps=0"]


def sweep_args(data_dir) -> list[str]:
    """2 micro-batch sizes x 2 datasets: the shipped rows, and the same rows each marked POISON, whose batches the
    fault injection (tests/faults) turns into NaN losses. Jobs 1 and 3 train on the poisoned file and fail."""
    return ["-m", "data.micro_batch_size=192,4", f"data.path={data_dir}/clean.jsonl,{data_dir}/poisoned.jsonl",
            *COMMON]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("sweep")
    data_dir = tmp_path_factory.mktemp("data")
    rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()]
    (data_dir / "clean.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data_dir / "poisoned.jsonl").write_text("".join(json.dumps({**r, "prompt": r["prompt"] + " POISON"}) + "\n"
                                                     for r in rows))
    res = train_py(sweep_args(data_dir), cache_dir, out, timeout=600, faults=True)
    jobs = {p.name: p for p in (out / "sweep").iterdir() if p.is_dir() and not p.name.startswith(".")}
    return out, res, jobs, data_dir


def _summary(job_dir):
    return json.loads((job_dir / "summary.json").read_text())


def test_failed_jobs_are_recorded_and_the_sweep_goes_on(sweep):
    out, res, jobs, _ = sweep
    assert res.returncode == 1, res.stderr[-2000:]  # some job failed: the sweep says so
    status = {name.split("_", 1)[0]: _summary(d)["summary/status"] for name, d in jobs.items()}
    assert status == {"0": "finished", "1": "failed_nan", "2": "finished", "3": "failed_nan"}
    assert "non-finite loss" in _summary(next(d for n, d in jobs.items() if n.startswith("1_")))["summary/reason"]
    records = [json.loads(x) for x in (out / "sweep" / "sweep_summary.jsonl").read_text().splitlines()]
    assert sorted(r["summary/status"] for r in records) == ["failed_nan", "failed_nan", "finished", "finished"]
    assert "2 job(s) did not finish" in res.stderr


def test_peak_memory_of_a_job_does_not_include_the_previous_job(sweep):
    """Job 0 (192 sequences, no checkpointing) peaks high; job 2 (4 sequences) runs after it in the same sweep.
    Its peak resident set (ru_maxrss, which never goes down within a process) must be its own."""
    _, _, jobs, _ = sweep
    last = lambda d: json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])  # noqa: E731
    big = last(next(d for n, d in jobs.items() if n.startswith("0_")))["memory/peak_reserved_gib"]
    small = last(next(d for n, d in jobs.items() if n.startswith("2_")))["memory/peak_reserved_gib"]
    assert big > small + 0.2, (big, small)


def test_wandb_runs_share_a_group_with_tags_and_summary_keys(sweep):
    out, _, jobs, data_dir = sweep
    runs = {n.split("_", 1)[0]: read_run(d) for n, d in jobs.items()}
    assert {r["run"].run_group for r in runs.values()} == {"sweep"}
    assert set(runs["0"]["run"].tags) == {"data.micro_batch_size=192", f"data.path={data_dir}/clean.jsonl"[:64],
                                          "checkpointing=none", "optim.max_steps=3", "optim.warmup_steps=0",
                                          "eval=loss", "eval.every_steps=0"}
    assert runs["0"]["config"]["data.micro_batch_size"] == 192 and runs["0"]["config"]["lora.r"] == 16
    for key in ("summary/peak_memory_gib", "summary/tokens_per_s", "summary/final_loss", "summary/eval_loss"):
        assert key in runs["0"]["summary"]
    assert runs["0"]["summary"]["summary/status"] == "finished"
    assert runs["1"]["summary"]["summary/status"] == "failed_nan"


def test_jobs_fork_from_the_warm_process_and_keep_the_injected_faults(sweep):
    """sweep.warm_start (the default): every job is a process forked from the one that imported the libraries, and
    what a process-wide patch does (the fault injection poisoning jobs 1 and 3, see sweep_args) still reaches it."""
    _, _, jobs, _ = sweep
    status = {n[0]: _summary(d)["summary/status"] for n, d in jobs.items()}
    assert status["1"] == status["3"] == "failed_nan"
    assert {_summary(jobs[n])["summary/process_start"] for n in jobs if status[n[0]] == "finished"} == {"warm_fork"}


def test_a_cold_sweep_runs_each_job_in_its_own_interpreter(cache_dir, tmp_path):
    res = train_py(["-m", "lora.r=4", "sweep.warm_start=false", *COMMON], cache_dir, tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (job,) = [p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert _summary(job)["summary/process_start"] == "interpreter"


def test_the_warm_process_preloads_real_modules_and_a_bad_fork_names_the_fix(compose, monkeypatch):
    """The server skips a module it cannot import without a word, so every preloaded name must exist; and a job
    forked after CUDA was initialised says what to do instead of failing at its first CUDA call."""
    import importlib.util

    import torch
    from omegaconf import OmegaConf

    from qlora_lab.runner import sweep as sweep_mod

    cfg, modeling = OmegaConf.to_object(compose([])), "transformers.models.llama.modeling_llama"
    names = sweep_mod.preload(cfg)
    assert all(importlib.util.find_spec(n) is not None for n in names), names
    # where torchao is installed the modeling module would import it, and torchao initialises CUDA at import
    assert (modeling in names) == (importlib.util.find_spec("torchao") is None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    assert modeling in sweep_mod.preload(cfg)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)  # a fork after CUDA was initialised ...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # ... on a machine with a GPU
    with pytest.raises(RuntimeError, match="sweep.warm_start=false"):
        sweep_mod._forked("unused.json", dict(os.environ), os.getcwd())


def test_job_dirs_and_wandb_runs_are_named_by_the_swept_keys(sweep):
    """Only what varies (the data path by its file name), not the constant overrides (checkpointing=none,
    optim.max_steps=3, ...); the W&B runs carry the same names."""
    _, _, jobs, _ = sweep
    assert sorted(jobs) == ["0_micro_batch_size=192,path=clean.jsonl", "1_micro_batch_size=192,path=poisoned.jsonl",
                            "2_micro_batch_size=4,path=clean.jsonl", "3_micro_batch_size=4,path=poisoned.jsonl"]
    assert {read_run(d)["run"].display_name for d in jobs.values()} == set(jobs)


def test_compare_writes_the_table_and_plots(sweep):
    out, _, _, _ = sweep
    res = compare(out / "sweep")
    assert res["header"][:4] == ["rank", "job", "data.micro_batch_size", "data.path"]
    assert [r[4] for r in res["rows"]] == ["finished", "finished", "failed_nan", "failed_nan"]  # ranked
    assert "| finished |" in res["markdown"].read_text()
    assert len(res["csv"].read_text().splitlines()) == 5
    for png in res["plots"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_resume_skips_finished_jobs(sweep, cache_dir):
    out, _, jobs, data_dir = sweep
    before = {n: (d / "metrics.jsonl").stat().st_mtime for n, d in jobs.items() if n[0] in "02"}
    res = train_py(sweep_args(data_dir) + ["sweep.resume=true"], cache_dir, out, timeout=600, faults=True)
    assert res.stdout.count("skipped (sweep.resume=true)") == 2
    assert {n: (jobs[n] / "metrics.jsonl").stat().st_mtime for n in before} == before
    assert res.returncode == 1  # the failed jobs ran again, and failed again


def _fake_sweep(root, jobs):
    """A sweep dir as train.py -m leaves it, from (name, overrides, summary) triples: no training needed."""
    for name, overrides, summary in jobs:
        d = root / name
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (d / "summary.json").write_text(json.dumps(summary))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 3.0 - s / 10}) + "\n"
                                                 for s in (1, 2, 3)))
    return root


def _done(peak, eval_loss, exact, **more):
    return {"summary/status": "finished", "summary/final_loss": 2.5, "summary/eval_loss": eval_loss,
            "summary/eval_exact_match": exact, "summary/eval_char_f1": exact / 2, "summary/tokens_per_s": 100.0,
            "summary/peak_memory_gib": peak, "summary/overhead_s": 20.0, **more}


@pytest.fixture
def fake_sweep(tmp_path):
    return _fake_sweep(tmp_path, [
        ("0_r=8", ["lora.r=8", "optim.max_steps=12"], _done(1.0, 2.0, 0.2)),
        ("1_r=16", ["lora.r=16", "optim.max_steps=12"], _done(1.5, 1.8, 0.5)),
        ("2_r=32", ["lora.r=32", "optim.max_steps=12"], _done(2.0, 1.7, 0.4)),
        ("3_r=64", ["lora.r=64", "optim.max_steps=12"], {"summary/status": "failed_oom", "summary/reason": "OOM"}),
    ])


def test_compare_ranks_by_a_task_metric_higher_is_better(fake_sweep):
    """Task metrics beside loss, memory and tokens/s; ranked by the first score every finished job has (exact
    match, higher is better); the Pareto front on the job's own peak and that score: r=32 (2.0 GiB, 0.4) is beaten
    by r=16 (1.5 GiB, 0.5)."""
    res = compare(fake_sweep)
    assert res["metric"] == "summary/eval_exact_match"
    assert res["header"] == ["rank", "job", "lora.r", "status", "final_loss", "eval_loss", "eval_exact_match",
                             "eval_char_f1", "tokens_per_s", "peak_memory_gib", "overhead_s", "pareto"]
    assert [(r[0], r[1], r[-1]) for r in res["rows"]] == [(1, "1_r=16", "*"), (2, "2_r=32", ""), (3, "0_r=8", "*"),
                                                          ("", "3_r=64", "")]
    assert "Ranked by eval_exact_match (higher is better)" in res["markdown"].read_text()
    assert [p.name for p in res["plots"]] == ["loss_curves.png", "memory_vs_eval_exact_match.png"]


def test_compare_metric_option_picks_the_axis_and_its_direction(fake_sweep):
    """--metric eval_loss: lower is better, and r=32's lower loss puts it on the front."""
    res = compare(fake_sweep, "eval_loss")
    assert [(r[1], r[-1]) for r in res["rows"]] == [("2_r=32", "*"), ("1_r=16", "*"), ("0_r=8", "*"), ("3_r=64", "")]
    assert [p.name for p in res["plots"]] == ["loss_curves.png", "memory_vs_loss.png"]
    with pytest.raises(CompareError, match="eval_bleu: no job reports it as a quality metric; choose one of: "
                                           "eval_char_f1, eval_exact_match, eval_loss, final_loss"):
        compare(fake_sweep, "eval_bleu")


def test_qlora_lab_compare_refuses_what_it_cannot_read_naming_the_fix(fake_sweep, tmp_path, capsys):
    """`qlora-lab compare` (the same as python -m qlora_lab.runner.compare): a dir that does not exist, a dir with
    no job and an unknown metric exit 2 with one line naming the fix, never a traceback."""
    assert cli.main(["compare", str(tmp_path / "nonexistent")]) == 2
    assert "nonexistent is not a directory; give a sweep dir (outputs/multirun/<time>)" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["compare", str(tmp_path / "empty")]) == 2
    assert "no job directories with a summary.json" in capsys.readouterr().err
    assert cli.main(["compare", str(fake_sweep), "--metric", "eval_bleu"]) == 2
    assert "qlora-lab: --metric eval_bleu: no job reports it" in capsys.readouterr().err
    assert cli.main(["compare", str(fake_sweep)]) == 0 and "Ranked by" in capsys.readouterr().out


def test_ties_in_the_quality_metric_are_broken_by_the_eval_loss():
    """A short sweep where every job's exact match is 0: the lower eval loss ranks first, not the sweep's order."""
    jobs = [{"name": n, "summary": {"summary/eval_exact_match": 0.0, "summary/eval_loss": loss,
                                    "summary/final_loss": 1.0}} for n, loss in (("0_r=4", 6.158), ("1_r=8", 6.126))]
    assert [j["name"] for j in ranked(jobs, "summary/eval_exact_match")] == ["1_r=8", "0_r=4"]


def test_make_compare_runs_the_report(fake_sweep):
    res = subprocess.run(["make", "-s", "compare", f"SWEEP={fake_sweep}", "METRIC=eval_char_f1"], cwd=ROOT,
                         capture_output=True, text=True, env=child_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Ranked by eval_char_f1" in res.stdout and (fake_sweep / "memory_vs_eval_char_f1.png").is_file()


def test_jobs_share_the_compile_caches_in_the_sweep_dir(tmp_path, monkeypatch):
    from qlora_lab.runner.sweep import job_env

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/mine")
    env = job_env(tmp_path)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / ".compile_cache" / "inductor")
    assert env["TRITON_CACHE_DIR"] == "/mine"  # what the user set wins
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == env["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"


def test_pareto_front_on_a_hand_made_example():
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 3.5), (4.0, 1.0), (2.5, 2.9), (5.0, 1.0)]
    assert pareto_front(pts) == [0, 1, 4, 3]  # (3, 3.5) is beaten by (2, 3); (5, 1) by (4, 1)


def test_gpu_slots_give_each_job_its_own_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    first = _take_gpu(tmp_path, [0, 1])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    second = _take_gpu(tmp_path, [0, 1])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    first.close()  # job 0 ended: its GPU is free again
    third = _take_gpu(tmp_path, [0, 1])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    second.close()
    third.close()
    assert _take_gpu(tmp_path, [3]) is None  # one GPU: nothing to arbitrate


def test_launcher_configs_compose(compose):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    for launcher in ("local_gpus", "slurm_gpu"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hydra_compose(config_name="train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")


def test_wandb_sweep_yaml_builds_a_valid_train_command(compose):
    """As far as the agent goes offline: the command it would run composes and validates."""
    from omegaconf import OmegaConf

    spec = yaml.safe_load((ROOT / "experiments" / "wandb_sweep.yaml").read_text())
    assert spec["program"] == "train.py" and "${args_no_hyphens}" in spec["command"]
    params = {k: (v["values"][0] if "values" in v else v["min"]) for k, v in spec["parameters"].items()}
    args = [f"{k}={v}" for k, v in params.items()]  # what ${args_no_hyphens} expands to
    cfg = OmegaConf.to_object(compose(args + ["device=cpu"]))
    validate(cfg)
    assert cfg.lora.r == params["lora.r"] and cfg.optim.lr == pytest.approx(params["optim.lr"])


@pytest.mark.parametrize("fuse", ["false", "true"])
def test_ctrl_c_stops_the_sweep_cleanly(cache_dir, tmp_path, fuse):
    """Ctrl-C stops a sweep and says which jobs finished: with one process per job (Hydra's loop over jobs) and with
    the jobs fused (the launcher's threads wait on the group, and Ctrl-C reaches the main thread alone: it stops
    the running group, each job checkpointed and recorded interrupted, instead of waiting for it to finish)."""
    env = child_env()
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "lora.r=4,8,16", "optim.max_steps=400", "logger=none",
           f"sweep.fuse={fuse}", "eval=loss", "quantization=none", f"cache_dir={cache_dir}", "log.progress_bar=false",
           f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=interactive_signals)
    deadline = time.time() + 240

    def trained() -> bool:  # job 0 has logged a step: its process is in its training loop
        return any('"train/loss"' in m.read_text() for m in (tmp_path / "sweep").glob("0_*/metrics.jsonl"))

    while not trained() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGINT)  # the user's Ctrl-C reaches the sweep process
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "sweep interrupted" in err
    records = [json.loads(x) for x in (tmp_path / "sweep" / "sweep_summary.jsonl").read_text().splitlines()]
    if fuse == "false":
        assert records[-1]["summary/status"] == "interrupted" and records[-1]["job"].startswith("0_")
        assert not list((tmp_path / "sweep").glob("1_*"))  # no later job started
    else:
        assert sorted(r["job"][:2] for r in records) == ["0_", "1_", "2_"]
        assert {r["summary/status"] for r in records} == {"interrupted"}
        assert all(list((tmp_path / "sweep" / r["job"] / "checkpoints").glob("step_*")) for r in records)
