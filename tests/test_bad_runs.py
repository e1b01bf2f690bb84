"""Bad inputs met by real runs (docs/bad_inputs.md): checkpoints that are damaged, from another setup or cannot be
written, and non-finite losses. Each case gets a message that names the fix and loses nothing already written."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from helpers import compose_run
from qlora_lab.core.errors import CheckpointError, NonFiniteLossError
from qlora_lab.core.paths import TINY_DATA
from qlora_lab.runner.run import run
from qlora_lab.train import checkpoint
from qlora_lab.train import step as step_mod
from qlora_lab.train.optim import build_optimizer, build_scheduler


# ---- checkpoints and resume: one real run with checkpoints, copied per case ----

STEPS, EVERY = 5, 2
BASE = [f"optim.max_steps={STEPS}", f"save.every_steps={EVERY}", "save.keep_last=3", "logger=none",
        "eval=loss", "eval.every_steps=0", "device=cpu"]


def _run(cache_dir, out: Path, overrides: list[str]):
    return run(compose_run(cache_dir, out, BASE + overrides), overrides=overrides)


@pytest.fixture
def run_copy(module_run, copy_run) -> Path:
    """A copy of one real run with checkpoints (trained once for this file), per case."""
    return copy_run(module_run(BASE))


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
    (run_copy / "summary.json").unlink()  # the crash that left the checkpoint unfinished left no summary either
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
    summary = _run(cache_dir, run_copy, ["resume=auto", "optim.max_steps=6", "log.every_steps=2"])
    assert summary["summary/resumed_from_step"] == 4 and summary["summary/steps"] == 6
    out = capsys.readouterr().out
    assert "config differences, allowed" in out and "optim.max_steps: 5 -> 6" in out
    resumes = json.loads((run_copy / "run_info.json").read_text())["resumes"]
    assert "log.every_steps: 1 -> 2" in resumes[-1]["config_differences"]


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
