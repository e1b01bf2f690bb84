"""qlora-lab export: the merged (and GGUF) export of a run reproduces base + adapter on the run's eval rows; bad input
is refused before anything loads; the run's own files are never written and an export is never half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qlora_lab.cli import main as cli
from qlora_lab.export import gguf, merge, serve
from qlora_lab.export.verify import TOLERANCE
from qlora_lab.runner.rundir import RUN_FILES

SHORT = ["optim.max_steps=4", "eval.every_steps=0", "eval.max_rows=8", "eval.at_start=false", "logger=none"]
SMOLLM2 = ["experiment=smollm2_strings", "data.max_eval_rows=8", *SHORT]  # 8 held-out rows: the eval loss too
TINY = SHORT


def export(*args) -> int:
    return cli(["export", *map(str, args)])


def run_files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file the run wrote: what an export must leave as it was."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and not p.relative_to(run_dir).parts[0] == "export"}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "-writing-" in p.name or "-old-" in p.name] if parent.exists() else []


@pytest.fixture(scope="module")
def smollm2(module_run):
    return module_run(SMOLLM2)


@pytest.fixture(scope="module")
def tiny_run(module_run):
    return module_run(TINY)


def test_smollm2_merged_export_reproduces_base_plus_adapter(smollm2, capsys):
    """A real pretrained model: the export, loaded with plain from_pretrained, generates what base + adapter generate
    on the run's 8 eval rows. Measured here (fp32 on 2 CPU cores): max |logit difference| 8.0e-5 along the greedy
    paths, all 8 generations equal; the tolerance is 1e-3 (verify.TOLERANCE)."""
    before = run_files(smollm2)
    assert export(smollm2, "--dtype", "float32") == 0
    out = smollm2 / "export" / "merged"
    printed = capsys.readouterr().out
    assert "check passed" in printed and "original 16-bit weights" in printed
    made = json.loads((out / "export.json").read_text())
    merge_check = made["check"]["merge"]
    assert merge_check["equal_generations"] == merge_check["rows"] == 8
    assert merge_check["max_logit_difference"] <= TOLERANCE["float32"] == 1e-3
    # nf4 run merged into the 16-bit original: the as-trained comparison is reported, not gated
    assert made["check"]["trained"]["tolerance"] is None and made["base"]["dequantized"] is False
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "README.md",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "eval_exact_match" in card and '"quantization"' in card and "git commit" in card and "vllm serve" in card
    assert f'from_pretrained("{out}")' in card  # where it landed, not the temporary dir it was written in

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)  # a plain checkpoint: no qlora-lab, no PEFT
    assert model.dtype == torch.float32 and not hasattr(model, "peft_config")
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(out).chat_template
    assert run_files(smollm2) == before  # nothing of the run's own was written
    assert not set(RUN_FILES) & {"export"} and leftovers(out.parent) == []


def test_smollm2_gguf_round_trip_passes_the_same_check(smollm2, tmp_path, capsys):
    if gguf.converter_problem():
        pytest.skip(f"GGUF converter not installed: {gguf.converter_problem()}")
    assert export(smollm2, "--to", "gguf", "--dtype", "float32", "--out", tmp_path / "gguf") == 0
    made = json.loads((tmp_path / "gguf" / "export.json").read_text())
    assert made["file"] == "model-f32.gguf" and made["check"]["passed"]
    merge_check = made["check"]["merge"]  # measured: identical to the merged checkpoint's (8.0e-5, 8/8)
    assert merge_check["equal_generations"] == 8 and merge_check["max_logit_difference"] <= 1e-3
    assert "loaded from gguf" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["README.md", "export.json", "model-f32.gguf"]


def test_adapter_dir_is_what_vllm_loads(smollm2, tiny_run):
    for run in (smollm2, tiny_run):
        config = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert {"r", "lora_alpha", "target_modules"} <= set(config)
        assert config["bias"] == "none" and not config["use_dora"] and not config["modules_to_save"]
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        assert serve.vllm_problems(run / "adapter") == []


def test_vllm_check_names_what_it_would_refuse(tiny_run, copy_run):
    run = copy_run(tiny_run)
    path = run / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "use_dora": True, "modules_to_save": ["lm_head"]}))
    problems = serve.vllm_problems(run / "adapter")
    assert any("DoRA" in p for p in problems) and any("lm_head" in p for p in problems)
    assert "--max-lora-rank 32" in serve.vllm_command("base", run / "adapter", "x", 32)


def test_dequantized_merge_is_explicit_warned_and_is_what_was_trained(tiny_run, tmp_path, capsys):
    assert export(tiny_run, "--merge-into", "dequantized", "--out", tmp_path / "deq") == 0
    captured = capsys.readouterr()
    assert "warning: merged into a dequantized nf4 base" in captured.err
    made = json.loads((tmp_path / "deq" / "export.json").read_text())
    assert made["base"]["dequantized"]
    # nf4 multiplies by its dequantized weights, so this export is the run as trained, and that is gated too
    for check in ("merge", "trained"):
        assert made["check"][check]["tolerance"] == 1e-3 and made["check"][check]["pass"]
    assert "dequantized nf4 base" in (tmp_path / "deq" / "README.md").read_text()


def test_a_prequantized_base_is_detected(tiny_run, tmp_path, capsys):
    """--base pointing at a checkpoint that stores 4-bit weights (like the *-bnb-4bit repos): no 16-bit original is
    in it, so the merge is into its dequantized weights, and the export says so."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    info = json.loads((tiny_run / "run_info.json").read_text())
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(info["model_path"], quantization_config=bnb,
                                         dtype=torch.float32).save_pretrained(tmp_path / "base-4bit")
    assert export(tiny_run, "--base", tmp_path / "base-4bit", "--out", tmp_path / "out") == 0
    assert "stores quantized weights" in capsys.readouterr().out
    made = json.loads((tmp_path / "out" / "export.json").read_text())
    assert made["base"]["prequantized"] and made["base"]["dequantized"] and made["check"]["passed"]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading any model fails the test: refusals must come before."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was refused")

    monkeypatch.setattr(merge, "as_trained", refuse)
    monkeypatch.setattr(merge, "original", refuse)


@pytest.mark.parametrize("damage, expected", [
    ("no_adapter", "has no adapter/"),
    ("no_run_info", "has no run_info.json"),
    ("truncated", "adapter_model.safetensors is truncated"),
    ("shape", "has shape"),
    ("missing_base", "--base="),
    ("into_adapter", "one of its own files"),
])
def test_bad_input_is_refused_before_loading_with_the_fix(tiny_run, copy_run, tmp_path, capsys, no_loading, damage,
                                                          expected):
    run = copy_run(tiny_run)
    args: list = []
    weights = run / "adapter" / "adapter_model.safetensors"
    if damage == "no_adapter":
        shutil.rmtree(run / "adapter")
    elif damage == "no_run_info":
        (run / "run_info.json").unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "shape":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        key = next(k for k in tensors if "lora_A" in k)
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
        save_file(tensors, str(weights))
    elif damage == "missing_base":
        args = ["--base", tmp_path / "nowhere"]
    elif damage == "into_adapter":
        args = ["--out", run / "adapter" / "merged"]
    assert export(run, *args) == 2
    err = capsys.readouterr().err
    assert expected in err and "nothing was loaded or written" in err
    assert not (run / "export").exists() and not (tmp_path / "nowhere").exists()


def fake_sweep(tiny_run: Path, root: Path, scores: list[float]) -> Path:
    """A sweep dir whose jobs are copies of one run with the given eval_exact_match."""
    for i, score in enumerate(scores):
        job = root / f"{i}_r={8 * (i + 1)}"
        shutil.copytree(tiny_run, job)
        summary = json.loads((job / "summary.json").read_text())
        (job / "summary.json").write_text(json.dumps({**summary, "summary/eval_exact_match": score}))
    return root


def test_best_job_of_a_sweep_is_exported(tiny_run, tmp_path, capsys):
    sweep = fake_sweep(tiny_run, tmp_path / "sweep", [0.25, 0.75, 0.5])
    assert export(sweep, "--best", "eval_exact_match") == 0
    assert "best job of" in capsys.readouterr().out
    assert (sweep / "1_r=16" / "export" / "merged" / "export.json").is_file()
    assert not (sweep / "0_r=8" / "export").exists() and not (sweep / "2_r=24" / "export").exists()


def test_unknown_best_metric_is_refused_with_the_choices(tiny_run, tmp_path, capsys, no_loading):
    sweep = fake_sweep(tiny_run, tmp_path / "sweep", [0.25, 0.75])
    assert export(sweep, "--best", "eval_bleu") == 2
    err = capsys.readouterr().err
    assert "eval_bleu" in err and "eval_exact_match" in err  # the metrics the jobs do report
    assert export(sweep) == 2 and "--best" in capsys.readouterr().err  # a sweep dir without --best


def test_a_failed_write_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    before = run_files(tiny_run)

    def half_write(model, tokenizer, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge, "write_checkpoint", half_write)
    with pytest.raises(OSError):
        export(tiny_run, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    with pytest.raises(OSError):  # the default target: not even an empty export/ stays in the run dir
        export(tiny_run)
    assert not (tiny_run / "export").exists() and run_files(tiny_run) == before


def test_a_wrong_merge_fails_the_check_and_is_not_placed(tiny_run, tmp_path, monkeypatch, capsys):
    """The gate catches a merge that lost the adapter (what re-quantizing or a wrong scale would also show)."""
    monkeypatch.setattr(merge, "merged", lambda unmerged, dtype: unmerged.unload().to(merge.DTYPES[dtype]))
    assert export(tiny_run, "--out", tmp_path / "out") == 3
    assert "FAIL" in capsys.readouterr().out
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_check_only_rechecks_and_notices_a_changed_adapter(tiny_run, copy_run, tmp_path, capsys):
    run = copy_run(tiny_run)
    assert export(run) == 0
    assert export(run, "--check-only") == 0 and capsys.readouterr().out.count("check passed") == 2
    assert export(run) == 2 and "--overwrite" in capsys.readouterr().err  # an earlier export is never replaced unasked
    weights = run / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    save_file({k: v * 2 for k, v in tensors.items()}, str(weights))  # as a resumed run would leave it
    assert export(run, "--check-only") == 3 and "another adapter" in capsys.readouterr().err
    assert export(run, "--overwrite") == 0
