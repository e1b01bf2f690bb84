"""Fused sweeps (runner/fuse.py): jobs that share a base train together, each exactly as it trains alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from helpers import ROOT, child_env, compose_run, records, step_records, train_py
from qlora_lab.runner import fuse
from qlora_lab.runner.run import run

# 6 steps of 8 rows, dropout on, three adapters of different shape, dropout, lr and length; fp32 on the CPU.
COMMON = ["data.micro_batch_size=8", "optim.max_steps=6", "eval=loss", "eval.every_steps=3", "logger=none",
          "save.every_steps=3", "eval.at_start=false"]
JOBS = [["lora.r=4", "lora.dropout=0", "optim.lr=1e-3"],
        ["lora.r=8", "lora.dropout=0.1", "optim.lr=2e-4", "lora.alpha=8"],
        ["lora.r=16", "lora.dropout=0.05", "optim.lr=5e-4", "optim.max_steps=4", "lora.target_modules=[q_proj,v_proj]"]]
# Measured on this tiny model (fp32, 2 threads): fused vs alone per-step losses within 2e-7 relative and adapter
# tensors within 3e-7 (the base GEMM over stacked rows sums in another order); bounds 1e-5 and 1e-5.
LOSS_TOL, ADAPTER_TOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def fused_and_alone(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("fuse")
    entries = []
    for i, job in enumerate(JOBS):
        cfg = compose_run(cache_dir, root / "fused" / f"j{i}", COMMON + job)
        entries.append(fuse.Entry(OmegaConf.to_container(cfg, resolve=True), job))
    fuse.run_group(entries)
    for i, job in enumerate(JOBS):
        run(compose_run(cache_dir, root / "alone" / f"j{i}", COMMON + job), overrides=job)
    return root


@pytest.mark.parametrize("i", range(len(JOBS)))
def test_a_fused_job_trains_and_saves_what_it_does_alone(fused_and_alone, i):
    fused, alone = fused_and_alone / "fused" / f"j{i}", fused_and_alone / "alone" / f"j{i}"
    a, b = step_records(fused), step_records(alone)
    assert sorted(a) == sorted(b) == list(range(1, 7 if i < 2 else 5))  # the third job stops at its own max_steps
    for s in a:
        assert a[s]["train/loss"] == pytest.approx(b[s]["train/loss"], rel=LOSS_TOL), s
        assert a[s]["train/grad_norm"] == pytest.approx(b[s]["train/grad_norm"], rel=1e-4), s
        assert a[s]["train/tokens"] == b[s]["train/tokens"]
    evals = lambda d: {r["step"]: r["eval/loss"] for r in records(d) if "eval/loss" in r}  # noqa: E731
    assert evals(fused) == pytest.approx(evals(alone), rel=LOSS_TOL)
    ta, tb = load_file(fused / "adapter" / "adapter_model.safetensors"), load_file(alone / "adapter" /
                                                                                  "adapter_model.safetensors")
    assert sorted(ta) == sorted(tb)  # the same names: PEFT's, as a model with this adapter alone saves them
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=ADAPTER_TOL, atol=ADAPTER_TOL * ta[k].abs().max()), k
    ca = json.loads((fused / "adapter" / "adapter_config.json").read_text())
    cb = json.loads((alone / "adapter" / "adapter_config.json").read_text())
    assert ca == cb
    files = {p.name for p in fused.iterdir()}
    assert {"metrics.jsonl", "summary.json", "run_info.json", "adapter", "checkpoints"} <= files
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (fused, alone))
    assert sa["summary/status"] == sb["summary/status"] == "finished"
    assert sa["summary/trainable_params"] == sb["summary/trainable_params"]
    assert sa["summary/total_params"] == sb["summary/total_params"] and sa["summary/fused_jobs"] == 3
    saved = [torch.load(sorted((d / "checkpoints").iterdir())[-1] / "adapter.pt", weights_only=True)
             for d in (fused, alone)]
    assert sorted(saved[0]) == sorted(saved[1])  # checkpoints too hold the names the job has alone: either resumes


def test_which_jobs_fuse_is_read_from_the_declarations(compose):
    """A sweep over LoRA and optimization keys is one group; over the data, the quantization, the micro-batch or the
    seed, one group per value; a job that asks for DoRA or sweep.fuse=false trains alone."""
    def configs(*jobs):
        return [OmegaConf.to_container(compose(list(j)), resolve=True) for j in jobs]

    assert fuse.groups(configs(["lora.r=4"], ["lora.r=8", "optim.lr=1e-3"], ["lora.dropout=0.2"])) == [[0, 1, 2]]
    for key, values in {"quantization": ["nf4", "none"], "data.micro_batch_size": ["4", "8"], "seed": ["0", "1"],
                        "model.max_seq_len": ["32", "64"], "data": ["tiny", "strings"]}.items():
        assert fuse.groups(configs(*[[f"{key}={v}"] for v in values])) == [[0], [1]], key
    assert fuse.groups(configs(["lora.r=4"], ["lora=dora"], ["lora.r=8"])) == [[0, 2], [1]]
    assert fuse.groups(configs(["lora.r=4", "sweep.fuse=false"], ["lora.r=8", "sweep.fuse=false"])) == [[0], [1]]
    assert fuse.groups(configs(["lora.r=4"], ["lora.r=8"]), resume_steps=[3, 0]) == [[0], [1]]


def test_the_plan_of_a_fused_group_holds_one_base(spec_of):
    """Peak of N fused jobs <= the sum of their peaks minus N-1 bases (the issue's bound), on the Phi-4-mini shape."""
    from qlora_lab.memory import plan

    cfgs = [spec_of(["model=phi4_mini_shape", f"lora.r={r}", "data.micro_batch_size=4", "model.kernels=liger",
                     "checkpointing=offload"]).cfg for r in (8, 16, 32, 64)]
    group = plan.predict_group(cfgs)
    alone = [plan.predict(c, 4) for c in cfgs]
    base = sum(i.bytes for i in alone[0].items if i.name.startswith(("base", "quant", "embed")))
    assert group.peak_bytes <= sum(a.peak_bytes for a in alone) - 3 * base
    assert group.peak_bytes > max(a.peak_bytes for a in alone)


def test_the_plan_of_a_group_counts_a_shared_dropout_mask_once(spec_of):
    """Two jobs with the same lora.dropout keep one mask per LoRA layer (model/grouped.py): the group's saved
    activations are one mask (1 byte an input element, per adapted layer) smaller than with two dropouts."""
    from qlora_lab.memory import ledger as ledger_mod, plan

    def group(dropouts):
        cfgs = [spec_of(["model=phi4_mini_shape", "data.micro_batch_size=1", "checkpointing=none",
                         f"lora.dropout={p}"]).cfg for p in dropouts]
        return plan.predict_group(cfgs)

    same, other = group([0.05, 0.05]), group([0.05, 0.1])
    cfg = spec_of(["model=phi4_mini_shape", "data.micro_batch_size=1"]).cfg
    arch = ledger_mod.read_arch(cfg)
    mask_bytes = sum(din for din, _ in ledger_mod._lora_modules(arch, cfg).values())  # a token, a layer
    tokens = same.micro_batch * same.seq_len
    assert other.peak_bytes - same.peak_bytes == pytest.approx(mask_bytes * tokens * arch.layers, rel=0.02)


def test_a_sweep_fuses_through_train_py_and_one_poisoned_job_fails_alone(cache_dir, tmp_path):
    """`-m` over lora.r: one group, one process; the fault-injection seam (tests/faults) gives job 1_r=8's loss a NaN
    at step 3: it stops failed_nan, the others finish with the curves they have when it is not poisoned."""
    args = ["-m", "lora.r=4,8,16", "optim.max_steps=5", "eval=loss", "eval.every_steps=0", "logger=none",
            "sweep.fuse=true"]
    env = {"QLAB_POISON_JOB": "1_r=8", "QLAB_POISON_STEP": "3"}
    poisoned = _train_py(args, cache_dir, tmp_path / "poisoned", env)
    clean = _train_py(args, cache_dir, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert poisoned.returncode == 1 and "1 job(s) did not finish" in poisoned.stderr
    sweep = tmp_path / "poisoned" / "sweep"
    assert len(list(sweep.glob("group_*.json"))) == 1  # one process for the three jobs
    status = {p.name: json.loads((p / "summary.json").read_text())["summary/status"]
              for p in sweep.iterdir() if (p / "summary.json").is_file()}
    assert status == {"0_r=4": "finished", "1_r=8": "failed_nan", "2_r=16": "finished"}
    assert (sweep / "1_r=8" / "nonfinite" / "step_0000003.json").is_file()
    for job in ("0_r=4", "2_r=16"):
        a, b = step_records(sweep / job), step_records(tmp_path / "clean" / "sweep" / job)
        assert {s: r["train/loss"] for s, r in a.items()} == {s: r["train/loss"] for s, r in b.items()}


def _train_py(args, cache_dir, out, env=None, faults=True):
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"cache_dir={cache_dir}", "log.progress_bar=false",
           f"hydra.sweep.dir={out}/sweep"]
    return subprocess.run(cmd, cwd=ROOT, env={**child_env(faults), **(env or {})}, capture_output=True, text=True,
                          timeout=600)


def test_a_killed_fused_sweep_resumes_every_job_bit_exactly(cache_dir, tmp_path):
    """SIGKILL the group's process after its step-4 checkpoints, then `sweep.resume=true`: every job continues from
    its checkpoint to the curve and adapter of an uninterrupted fused sweep, exactly (fp32, the same group)."""
    args = ["-m", "lora.r=4,8", "optim.max_steps=8", "save.every_steps=4", "eval=loss", "eval.every_steps=0",
            "logger=none", "sweep.fuse=true", "sweep.warm_start=false"]
    whole = _train_py(args, cache_dir, tmp_path / "whole", faults=False)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"cache_dir={cache_dir}", "log.progress_bar=false",
           f"hydra.sweep.dir={out}/sweep"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**child_env(True), "QLAB_SLOW_STEP_S": "0.5"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: all(any((out / "sweep" / j / "checkpoints").glob("step_0000004"))
                          for j in ("0_r=4", "1_r=8")), proc)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    resumed = _train_py(args + ["sweep.resume=true"], cache_dir, out, faults=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for job in ("0_r=4", "1_r=8"):
        a, b = step_records(out / "sweep" / job), step_records(tmp_path / "whole" / "sweep" / job)
        assert {s: r["train/loss"] for s, r in a.items()} == {s: r["train/loss"] for s, r in b.items()}
        ta = load_file(out / "sweep" / job / "adapter" / "adapter_model.safetensors")
        tb = load_file(tmp_path / "whole" / "sweep" / job / "adapter" / "adapter_model.safetensors")
        assert all(torch.equal(ta[k], tb[k]) for k in tb)


def _wait(done, proc, timeout=300.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        if proc.poll() is not None:
            raise AssertionError("the sweep ended before the checkpoints were written")
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def test_fused_false_keeps_one_process_per_job(cache_dir, tmp_path):
    res = train_py(["-m", "lora.r=4,8", "optim.max_steps=2", "eval=loss", "eval.every_steps=0", "logger=none",
                    "sweep.fuse=false"], cache_dir, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list((tmp_path / "sweep").glob("group_*.json"))
    assert all((tmp_path / "sweep" / j / "job_config.json").is_file() for j in ("0_r=4", "1_r=8"))


def test_a_single_job_head_loss_is_the_models_own(tiny):
    """The group computes each job's loss from the decoder's output with the LM head and the model's loss
    function: for one job that is exactly the causal LM's own forward (fp32)."""
    from qlora_lab.model.grouped import head_loss
    from qlora_lab.train.step import model_inputs

    cfg, model, _, batch = tiny(["lora.dropout=0"])
    inputs = model_inputs(batch, "cpu")
    n = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        whole = model(**inputs, num_items_in_batch=n).loss
        labels = inputs.pop("labels")
        causal = model.get_base_model()
        hidden = causal.get_decoder()(**inputs).last_hidden_state
        assert head_loss(causal, hidden, labels, n, "none") == whole


def _job(r: int, p: float):
    """The LoRA config keys the grouped adapters read, for one job."""
    from types import SimpleNamespace

    return SimpleNamespace(r=r, dropout=p, adapter_dtype="float32")


def _dropout_group(base: torch.nn.Module, jobs: dict, micro=None):
    """A PEFT model over `base` with one adapter per job on each of its Linear children, grouped as a fused sweep
    groups them, counter-based dropout installed and masks shared (model.build_group's order); returns the model,
    its routing and how many adapters draw another's mask."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    from qlora_lab.model import dropout, grouped

    targets = [n for n, m in base.named_children() if isinstance(m, torch.nn.Linear)]

    def build(lo):
        return PeftLoraConfig(r=lo.r, lora_alpha=2 * lo.r, lora_dropout=lo.dropout, target_modules=targets)

    first, *others = jobs
    model = get_peft_model(base, build(jobs[first]), adapter_name=first)
    routing = grouped.group_adapters(model, first, [(n, jobs[n]) for n in others], 0, build, lambda *a: None)
    dropout.install(model, 0, micro or dropout.MicroBatch())
    return model, routing, grouped.share_dropout_masks(model)


def test_jobs_with_the_same_dropout_hash_one_mask_per_layer(monkeypatch):
    """A sweep's jobs share the seed, so jobs with the same lora.dropout draw the same mask at a layer: the grouped
    forward hashes it once (and autograd keeps it once), and every job's rows still get exactly the output and
    gradients they get with the job's adapter alone."""
    from qlora_lab.model import dropout

    torch.manual_seed(0)
    micro = dropout.MicroBatch()
    model, routing, reused = _dropout_group(torch.nn.Sequential(torch.nn.Linear(32, 48)),
                                            {"j0": _job(4, 0.1), "j1": _job(8, 0.1), "j2": _job(4, 0.2)}, micro)
    assert reused == 1  # j1 draws j0's mask
    for p in model.parameters():  # B starts at zero: give every adapter a term to compare
        if p.requires_grad:
            torch.nn.init.normal_(p)
    micro.set(3)
    model.train()
    layer = model.base_model.model[0]
    calls = []
    keep = dropout.keep_mask
    monkeypatch.setattr(dropout, "keep_mask", lambda *a, **k: calls.append(a[1]) or keep(*a, **k))
    x = torch.randn(3 * 5, 32, requires_grad=True)
    out = layer(x)
    assert sorted(calls) == [0.1, 0.2]  # j0 and j1 share one mask; j2 has its own
    out.pow(2).sum().backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for j, name in enumerate(routing.jobs):
        model.zero_grad()
        with routing.only(name):
            alone = layer(x[5 * j:5 * (j + 1)].detach())
        assert torch.equal(alone, out[5 * j:5 * (j + 1)].detach())
        alone.pow(2).sum().backward()
        for n, p in model.named_parameters():
            if f".{name}." in n and p.requires_grad:
                torch.testing.assert_close(p.grad, fused[n], rtol=1e-6, atol=1e-6)


def test_a_groups_progress_bars_each_keep_their_own_line(capsys):
    """Each job of a fused group draws its bar on its own line, named by the job: they do not overwrite one another."""
    from qlora_lab.train.loop import Progress

    bars = [Progress(10, 0, True, desc=f"job{i}", position=i) for i in range(3)]
    try:
        assert [abs(b.bar.pos) for b in bars] == [0, 1, 2]  # tqdm keeps a fixed line as -position
        assert [b.bar.desc for b in bars] == ["job0", "job1", "job2"]
    finally:
        for b in bars:
            b.close()
    assert Progress(10, 0, False).bar is None  # off: nothing is drawn


def test_a_grouped_layer_compiles_once_for_every_layer():
    """Every layer's dropout key differs (it is hashed from the layer's path); the grouped forward must not read it
    as a Python number, or torch.compile specializes on it and recompiles each decoder layer (on the 0.5B shape: 24
    compiles of the first step, past dynamo's recompile limit). One graph serves every layer."""
    model, routing, _ = _dropout_group(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)),
                                       {"j0": _job(4, 0.1), "j1": _job(4, 0.1)})
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    layers = [model.base_model.model[0], model.base_model.model[1]]
    assert layers[0].lora_dropout["j0"].key_value != layers[1].lora_dropout["j0"].key_value
    torch._dynamo.reset()
    for layer in layers:
        layer.compile(backend=count)
    model.train()
    x = torch.randn(2 * 3, 16, requires_grad=True)  # as every decoder layer's input in training
    for layer in layers:
        x = layer(x)
    assert len(graphs) == 1 and routing.jobs == ["j0", "j1"]
    torch._dynamo.reset()
