"""The bad-input catalogue (docs/bad_inputs.md): each case gets a clear error naming the fix, before any model
loads where the input allows, and nothing already written is lost. Cases tested elsewhere are referenced from
the docs table; `test_every_catalogued_case_has_its_test` keeps table and tests in step."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import CONF, ROOT
from qlora_lab.core.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from qlora_lab.core.paths import TINY_DATA
from qlora_lab.data import rows as data_rows
from qlora_lab.memory import plan
from qlora_lab.runner import preflight as v
from qlora_lab.runner.run import run
from qlora_lab.train import checkpoint
from qlora_lab.train import step as step_mod
from qlora_lab.train.optim import build_optimizer, build_scheduler

# (id, overrides, the text of the one problem reported, which names the fix)
CONFIG_CASES = [
    ("lora_r_negative", ["lora.r=-4"], "lora.r=-4 must be a positive integer (e.g. lora.r=16)"),
    ("lora_r_zero", ["lora.r=0"], "lora.r=0 must be a positive integer"),
    ("lora_alpha_zero", ["lora.alpha=0"], "try lora.alpha=2*r"),
    ("lora_dropout_one", ["lora.dropout=1.0"], "lora.dropout=1.0 must be in [0, 1)"),
    ("lora_targets_empty", ["lora.target_modules=[]"], "use [all-linear] or name modules"),
    ("loftq_on_quantized_base", ["lora.init=loftq"], "use quantization=none"),
    ("fused_lora_without_4bit", ["lora.kernel=fused", "lora.adapter_dtype=bfloat16", "quantization=int8"],
     "use lora.kernel=peft with quantization=int8"),
    ("fused_lora_with_dora", ["lora=dora", "lora.kernel=fused", "lora.adapter_dtype=bfloat16"],
     "use lora.kernel=peft with DoRA"),
    ("fsdp_uint8_storage", ["distributed=fsdp"], "set quantization.quant_storage=bfloat16 so they travel as stored"),
    ("fsdp_int8", ["distributed=fsdp", "quantization=int8"], "use quantization=nf4 with quantization.quant_storage"),
    ("nccl_on_cpu", ["distributed=ddp", "distributed.backend=nccl", "device=cpu"], "use distributed.backend=gloo"),
    ("distributed_auto_micro_batch", ["distributed=ddp", "data.micro_batch_size=auto", "plan.gpu_memory_gib=80"],
     "with distributed=ddp give an integer"),
    ("plan_processes_zero", ["plan.processes=0"], "plan.processes=0 must be >= 1"),
    ("quant_bits_unsupported", ["quantization.bits=3"], "must be 4, 8 or 16"),
    ("optim_lr_zero", ["optim.lr=0"], "optim.lr=0.0 must be > 0"),
    ("grad_accum_zero", ["optim.grad_accum_steps=0"], "optim.grad_accum_steps=0 must be >= 1"),
    ("no_training_steps", ["optim.max_steps=0", "optim.epochs=0"], "set optim.max_steps > 0"),
    ("betas_out_of_range", ["optim.betas=[0.9,1.5]"], "must be two numbers in [0, 1)"),
    ("paged_optimizer_on_cpu", ["optim=paged_adamw_8bit", "device=cpu"], "use optim=adamw on the CPU"),
    ("micro_batch_zero", ["data.micro_batch_size=0"], "must be a positive integer or auto"),
    ("micro_batch_auto_on_cpu", ["data.micro_batch_size=auto", "device=cpu"], "plan.gpu_memory_gib=N"),
    ("eval_fraction_one", ["data.eval_fraction=1.0"], "data.eval_fraction=1.0 must be in [0, 1)"),
    ("liger_kernels_on_cpu", ["model.kernels=liger", "device=cpu"], "use model.kernels=none on the CPU"),
    ("offload_without_checkpointing", ["checkpointing=none", "checkpointing.offload_to_cpu=true"],
     "needs checkpointing.enabled=true"),
    ("log_every_zero", ["logger.log_every=0"], "logger.log_every=0 must be >= 1"),
    ("log_adapter_without_wandb", ["logger=none", "logger.log_adapter=true"],
     "logger.log_adapter=true needs a W&B run to attach the adapter to; use logger=wandb"),
    ("save_every_negative", ["save.every_steps=-5"], "save.every_steps=-5 must be >= 0"),
    ("keep_last_zero", ["save.keep_last=0"], "save.keep_last=0 must be >= 1"),
    ("resume_path_missing", ["resume=/nonexistent/run"], "or resume=auto"),
]


# A choice that is not one of its Enum's members fails when Hydra composes the config, naming every valid one.
COMPOSE_CASES = [
    ("lora_kernel_unknown", ["lora.kernel=triton"], "Invalid value 'triton', expected one of [peft, fused]"),
    ("distributed_unknown", ["distributed=ddp", "distributed.name=deepspeed"], "expected one of [none, ddp, fsdp]"),
    ("fsdp_param_dtype_unknown", ["distributed=fsdp", "distributed.param_dtype=fp8"],
     "Invalid value 'fp8', expected one of [bfloat16, float16, float32]"),
    ("compile_unknown", ["model.compile=max"], "Invalid value 'max', expected one of [none, layers, auto]"),
    ("quant_type_unknown", ["quantization.quant_type=nf3"], "expected one of [nf4, fp4]"),
    ("scheduler_unknown", ["optim.scheduler=warmup_stable"], "expected one of [cosine, linear, constant]"),
    ("attention_unknown", ["model.attn_implementation=flash3"], "expected one of [sdpa, eager, flash_attention_2]"),
    ("device_unknown", ["device=tpu"], "Invalid value 'tpu', expected one of [auto, cpu, cuda]"),
    ("mode_unknown", ["mode=serve"], "Invalid value 'serve', expected one of [train, plan]"),
    ("guard_action_unknown", ["guard.nonfinite=ignore"], "expected one of [stop, skip]"),
]


@pytest.mark.parametrize("overrides,needle", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_value(compose, overrides, needle):
    cfg = OmegaConf.to_object(compose(overrides))
    with pytest.raises(ConfigError) as e:
        v.validate(cfg)
    assert len(e.value.problems) == 1, e.value.problems
    assert needle in e.value.problems[0]


@pytest.mark.parametrize("overrides,needle", [c[1:] for c in COMPOSE_CASES], ids=[c[0] for c in COMPOSE_CASES])
def test_choice_value(compose, overrides, needle):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose(overrides)
    assert needle in str(e.value.__cause__)


def test_unknown_experiment(compose):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="experiment/phi5"):
        compose(["experiment=phi5"])


def test_device_cuda_without_gpu(compose):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match="use device=cpu or device=auto"):
        v.validate(OmegaConf.to_object(compose(["device=cuda"])))


def test_lora_target_that_matches_nothing_fails_before_loading(compose):
    cfg = OmegaConf.to_object(compose(["lora.target_modules=[q_proj,qkv_proj]"]))
    with pytest.raises(ConfigError) as e:
        plan.plan_run(cfg, "cpu")  # what run() calls right after validate: the model on the meta device only
    assert "['qkv_proj']" in str(e.value) and "q_proj" in str(e.value) and "down_proj" in str(e.value)


def test_output_dir_not_writable(compose, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError) as e:
        v.validate(OmegaConf.to_object(compose([f"output_dir={blocker}/run"])))
    assert "output_dir=" in str(e.value) and "point it at a writable directory" in str(e.value)


def test_hub_model_offline_and_not_cached(compose, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(v, "hub_reachable", lambda: False)
    with pytest.raises(ConfigError) as e:
        v.validate(OmegaConf.to_object(compose(["model=phi4_mini"])))
    assert "hf download microsoft/Phi-4-mini-instruct" in str(e.value) and "local checkpoint" in str(e.value)
    v.validate(OmegaConf.to_object(compose(["model=phi4_mini", "mode=plan"])))  # planning needs no weights


def test_hub_unreachable_is_detected_quickly(monkeypatch):
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    t0 = time.monotonic()
    assert v.hub_reachable(timeout=2.0) is False
    assert time.monotonic() - t0 < 3.0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert v.hub_reachable() is False


def test_dataset_shorter_than_one_batch(compose, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(5)))
    d = OmegaConf.to_object(compose(["data=jsonl", f"data.path={path}", "data.micro_batch_size=8"])).data
    with pytest.raises(DataError, match=r"set data.micro_batch_size<=5"):
        data_rows.check_size(len(data_rows.read_rows(d)), d, 8)


# ---- checkpoints and resume: one real run with checkpoints, copied per case ----

STEPS, EVERY = 5, 2
BASE = [f"optim.max_steps={STEPS}", f"save.every_steps={EVERY}", "save.keep_last=3", "logger=none",
        "eval.every_steps=0", "device=cpu"]


def _cfg(cache_dir, out: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[f"output_dir={out}", f"cache_dir={cache_dir}", "run_name=t",
                                                       "sweep_id=null", "logger.progress_bar=false", *overrides])


def _run(cache_dir, out: Path, overrides: list[str]):
    return run(_cfg(cache_dir, out, BASE + overrides), overrides=overrides)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    _run(cache_dir, out, [])
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def test_corrupted_checkpoint(run_copy, cache_dir):
    latest = checkpoint.all_checkpoints(run_copy)[-1]
    raw = bytearray((latest / "optimizer.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte, same size
    (latest / "optimizer.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as e:
        _run(cache_dir, run_copy, [f"resume={latest}"])
    assert "corrupted optimizer.pt (checksum mismatch)" in str(e.value) and "step_0000002" in str(e.value)
    # auto passes over it to the newest whole one
    assert checkpoint.find("auto", run_copy).name == "step_0000002"


def test_truncated_or_unfinished_checkpoint(run_copy, cache_dir):
    latest = checkpoint.all_checkpoints(run_copy)[-1]
    data = (latest / "adapter.pt").read_bytes()
    (latest / "adapter.pt").write_bytes(data[: len(data) // 3])
    assert "truncated adapter.pt" in checkpoint.verify(latest)
    (latest / "manifest.json").unlink()  # as a crash between the files and the manifest would leave it
    assert checkpoint.verify(latest) == "has no manifest.json (its write never finished)"
    with pytest.raises(CheckpointError, match="whole checkpoints in that run: \\['step_0000002'\\]"):
        _run(cache_dir, run_copy, [f"resume={latest}"])
    summary = _run(cache_dir, run_copy, ["resume=auto"])
    assert summary["summary/resumed_from_step"] == 2 and summary["summary/status"] == "finished"


def test_checkpoint_from_another_model_or_lora_shape(run_copy, cache_dir):
    with pytest.raises(CheckpointError) as e:
        _run(cache_dir, run_copy, ["resume=auto", "lora.r=8", "model.build.num_hidden_layers=2"])
    msg = str(e.value)
    assert "lora.r: 16 -> 8" in msg and "model.build.num_hidden_layers: 4 -> 2" in msg
    assert "rerun with the checkpoint's values" in msg
    assert not list(run_copy.glob("metrics.rolled_back.jsonl"))  # refused before anything was touched


def test_checkpoint_adapter_of_another_shape_is_refused_on_load(run_copy, cache_dir, tiny):
    cfg, model, _, _ = tiny(["lora.r=8"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg.optim, "cpu")
    with pytest.raises(CheckpointError, match="another model or LoRA shape"):
        checkpoint.load(checkpoint.all_checkpoints(run_copy)[-1], model, opt, build_scheduler(opt, cfg.optim, 5))


def test_checkpoint_of_other_data_is_refused(run_copy, cache_dir, tmp_path):
    rows = TINY_DATA.read_text().splitlines()
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(rows[:-1]) + "\n")  # one row fewer
    ckpt = checkpoint.all_checkpoints(run_copy)[-1]
    config = json.loads((ckpt / "config.json").read_text())["config"]
    with pytest.raises(CheckpointError, match="dataset content: fingerprint"):
        checkpoint.check_compatible(ckpt, config, "0123456789abcdef")


def test_harmless_differences_are_allowed_and_noted(run_copy, cache_dir, capsys):
    summary = _run(cache_dir, run_copy, ["resume=auto", "optim.max_steps=6", "logger.log_every=2"])
    assert summary["summary/resumed_from_step"] == 4 and summary["summary/steps"] == 6
    out = capsys.readouterr().out
    assert "config differences, allowed" in out and "optim.max_steps: 5 -> 6" in out
    resumes = json.loads((run_copy / "run_info.json").read_text())["resumes"]
    assert "logger.log_every: 1 -> 2" in resumes[-1]["config_differences"]


def test_resume_auto_with_nothing_to_resume_starts_fresh(cache_dir, tmp_path, capsys):
    summary = _run(cache_dir, tmp_path / "fresh", ["resume=auto", "optim.max_steps=2"])
    assert summary["summary/resumed_from_step"] == 0 and summary["summary/steps"] == 2
    assert "no checkpoint in" in capsys.readouterr().out


def test_disk_full_while_checkpointing(cache_dir, tmp_path, monkeypatch):
    real_write = checkpoint._write

    def write(path, obj):  # the second checkpoint's optimizer file hits a full disk half way
        if path.name == "optimizer.pt" and path.parent.name.startswith(".tmp-step_0000004"):
            path.write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, obj)

    monkeypatch.setattr(checkpoint, "_write", write)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError) as e:
        _run(cache_dir, out, [])
    assert "the disk is full" in str(e.value) and "resume=auto from step_0000002" in str(e.value)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002"]  # no partial one left behind
    assert checkpoint.verify(out / "checkpoints" / "step_0000002") is None
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # what was logged stays
    assert json.loads((out / "summary.json").read_text())["summary/status"] == "failed_config"


def test_disk_full_while_saving_the_adapter(cache_dir, tmp_path, monkeypatch):
    from peft import PeftModel

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError) as e:
        _run(cache_dir, out, [])
    assert "free space and rerun with resume=auto (checkpoint step_0000004 is whole)" in str(e.value)
    assert not (out / "adapter").exists() and not (out / ".adapter.tmp").exists()


# ---- non-finite loss: the guard ----

def _poison(monkeypatch, steps: set[int]):
    """Make the loss NaN on the given optimizer steps (one micro-batch per step), as a bad batch would."""
    real, count = step_mod.forward_loss, {"n": 0}

    def forward(*a, **k):
        loss = real(*a, **k)
        count["n"] += 1
        return loss * float("nan") if count["n"] in steps else loss

    monkeypatch.setattr(step_mod, "forward_loss", forward)


def test_nonfinite_loss_stops_with_a_diagnostic(cache_dir, tmp_path, monkeypatch):
    _poison(monkeypatch, {3})
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as e:
        _run(cache_dir, out, [])
    msg = str(e.value)
    assert "at step 3" in msg and "Lower optim.lr" in msg and "guard.nonfinite=skip" in msg
    report = json.loads((out / "nonfinite" / "step_0000003.json").read_text())
    assert report["step"] == 3 and len(report["sample_rows"]) == 16
    assert report["last_finite_loss"] == pytest.approx(json.loads(
        (out / "metrics.jsonl").read_text().splitlines()[1])["train/loss"])
    assert report["nonfinite_grad_tensors"] == len(report["tensors"]) > 0  # NaN reached every LoRA gradient
    assert report["nonfinite_weights"] == []  # the update was never applied
    assert json.loads((out / "summary.json").read_text())["summary/status"] == "failed_nan"
    guard = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "guard/action" in x]
    assert guard[0]["guard/action"] == "stop" and guard[0]["step"] == 3


def test_nonfinite_loss_skipped_and_training_goes_on(cache_dir, tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 4})
    out = tmp_path / "run"
    summary = _run(cache_dir, out, ["guard.nonfinite=skip"])
    assert summary["summary/status"] == "finished" and summary["summary/skipped_steps"] == 2
    assert sorted(p.name for p in (out / "nonfinite").iterdir()) == ["step_0000002.json", "step_0000004.json"]
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter" / "adapter_model.safetensors").values())


def test_nonfinite_skip_gives_up_after_max_skips(cache_dir, tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3, 4})
    with pytest.raises(NonFiniteLossError, match="after 2 skipped steps"):
        _run(cache_dir, tmp_path / "run", ["guard.nonfinite=skip", "guard.max_skips=2"])


# ---- the catalogue and its tests stay in step ----

def _test_exists(ref: str) -> bool:
    m = re.fullmatch(r"(test_\w+)\.py::(\w+)(?:\[([\w-]+)\])?", ref)
    if not m:
        return False
    path = Path(__file__).parent / f"{m[1]}.py"
    if not path.is_file() or not re.search(rf"^def {m[2]}\(", path.read_text(), re.M):
        return False
    cases = {"test_config_value": CONFIG_CASES, "test_choice_value": COMPOSE_CASES}.get(m[2], [])
    return m[3] is None or m[3] in {c[0] for c in cases}


def test_every_catalogued_case_has_its_test():
    table = (ROOT / "docs" / "bad_inputs.md").read_text()
    rows = [line for line in table.splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    refs = [re.findall(r"`(test_[^`]+)`", row) for row in rows]
    assert len(rows) >= 30 and all(refs), "every row names its test"
    missing = [r for rr in refs for r in rr if not _test_exists(r)]
    assert not missing, f"docs/bad_inputs.md names tests that do not exist: {missing}"
    listed = {r.split("[")[1].rstrip("]") for rr in refs for r in rr if "[" in r}
    assert listed == {c[0] for c in CONFIG_CASES + COMPOSE_CASES}, "every config case is in the docs table"
