"""The bad-input catalogue (docs/bad_inputs.md): each case gets a clear error naming the fix, before any model
loads where the input allows, and nothing already written is lost. Cases tested elsewhere are referenced from
the docs table; `test_every_catalogued_case_has_its_test` keeps table and tests in step. Real runs that fail
(checkpoints, resume, NaN) are in test_bad_runs.py, run dirs, restarts and signals in test_run_dirs.py."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import ROOT, fake_checkpoint
from test_cli import COMMAND_LINE_CASES
from test_trust import TRUST_FAMILIES
from qlora_lab.core.errors import CheckpointError, ConfigError, DataError
from qlora_lab.data import rows as data_rows
from qlora_lab.memory import plan
from qlora_lab.runner import preflight as v
from qlora_lab.train import checkpoint

# (id, overrides, the text of the one problem reported, which names the fix)
CONFIG_CASES = [
    ("lora_r_negative", ["lora.r=-4"], "lora.r=-4 must be a positive integer (e.g. lora.r=16)"),
    ("lora_r_zero", ["lora.r=0"], "lora.r=0 must be a positive integer"),
    ("num_proc_negative", ["data.num_proc=-2"], "data.num_proc=-2 must be an integer >= 1 (processes that tokenize)"),
    ("num_proc_not_a_number", ["data.num_proc=many"], "data.num_proc='many' must be an integer >= 1"),
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
    ("gguf_file_missing", ["model=smollm2_135m", "model.gguf=/no/such/model.gguf"],
     "model.gguf=/no/such/model.gguf: no such file (/no/such/model.gguf); give a .gguf file or pkg:<package>/<file>"),
    ("gguf_package_missing", ["model=smollm2_135m", "model.gguf=pkg:no_such_package/m.gguf"],
     "the package 'no_such_package' is not installed; `make setup` installs it, or point model.gguf at a .gguf file"),
    ("plan_max_micro_batch_zero", ["plan.max_micro_batch=0"], "plan.max_micro_batch=0 must be >= 1"),
    ("epochs_negative", ["optim.epochs=-1"], "optim.epochs=-1 must be >= 0"),
    ("eval_samples_negative", ["eval.samples=-1"], "eval.samples=-1 must be >= 0"),
    ("eval_max_rows_negative", ["eval.max_rows=-1"], "eval.max_rows=-1 must be >= 0"),
    ("quant_bits_unsupported", ["quantization.bits=3"], "must be 4 or 8 with bitsandbytes"),
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
    ("log_every_zero", ["log.every_steps=0"], "log.every_steps=0 must be >= 1"),
    ("log_adapter_without_wandb", ["logger=none", "log.adapter_artifact=true"],
     "log.adapter_artifact=true needs a sink to attach the adapter to; use logger=wandb (or mlflow)"),
    ("save_every_negative", ["save.every_steps=-5"], "save.every_steps=-5 must be >= 0"),
    ("keep_last_zero", ["save.keep_last=0"], "save.keep_last=0 must be >= 1"),
    ("resume_path_missing", ["resume=/nonexistent/run"], "or resume=auto"),
    ("optim_eps_negative", ["optim.eps=-1"], "optim.eps=-1.0 must be > 0"),
    ("seed_negative", ["seed=-1"], "seed=-1 must be >= 0"),
    ("weight_decay_negative", ["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1 must be >= 0"),
    ("warmup_negative", ["optim.warmup_steps=-1"], "optim.warmup_steps=-1 must be >= 0"),
    ("max_grad_norm_negative", ["optim.max_grad_norm=-1"], "(0 disables clipping)"),
    ("eval_every_negative", ["eval.every_steps=-1"], "eval.every_steps=-1 must be >= 0"),
    ("eval_batch_zero", ["eval.batch_size=0"], "eval.batch_size=0 must be >= 1"),
    ("eval_new_tokens_zero", ["eval.max_new_tokens=0"], "eval.max_new_tokens=0 must be >= 1"),
    ("guard_max_skips_negative", ["guard.max_skips=-1"], "guard.max_skips=-1 must be >= 0"),
    ("safety_margin_one", ["plan.safety_margin=1.0"], "plan.safety_margin=1.0 must be in [0, 1)"),
    ("gpu_memory_zero", ["plan.gpu_memory_gib=0"], "plan.gpu_memory_gib=0.0 must be > 0"),
    ("max_seq_len_zero", ["model.max_seq_len=0"], "model.max_seq_len=0 must be > 0"),
    ("max_eval_rows_negative", ["data.max_eval_rows=-1"], "data.max_eval_rows=-1 must be >= 0"),
    ("num_rows_negative", ["data.num_rows=-1"], "data.num_rows=-1 must be >= 0"),
    ("max_dropped_fraction_above_one", ["data.max_dropped_fraction=1.5"], "must be in [0, 1]"),
    ("config_name_with_jsonl", ["data.config_name=default"], "a .jsonl file has no configs"),
    ("split_with_jsonl", ["data.split=test"], "a .jsonl file is one split"),
    ("model_path_with_built_model", ["model.path=/models/my-llama"], "use model=local model.path=/models/my-llama"),
    ("overwrite_with_resume", ["overwrite=true", "resume=auto"], "drop one of the two"),
    ("flash_attention_without_package", ["model.attn_implementation=flash_attention_2", "device=cpu"],
     "use model.attn_implementation=sdpa"),
    ("data_path_is_a_directory", ["data=jsonl", "data.path=/tmp"], "is a directory; give the .jsonl file itself"),
    ("hf_local_dataset_missing", ["data=hf", "data.path=./no/such/dataset"], "data=hf takes a local dataset dir"),
    ("tokenizer_path_missing", ["model.tokenizer=/nonexistent/tokenizer"], "is not a directory with tokenizer"),
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
    ("eval_metric_unknown", ["eval.metrics=[loss,bleu]"], "expected one of [loss, exact_match, token_f1"),
    ("data_source_unknown", ["data.source=csv"], "Invalid value 'csv', expected one of [jsonl, hf]"),
    ("wandb_mode_unknown", ["logger.wandb.mode=dryrun"], "expected one of [offline, online, disabled]"),
    ("lora_bias_unknown", ["lora.bias=some"], "expected one of [none, all, lora_only]"),
    ("lora_init_unknown", ["lora.init=olora"], "expected one of [default, gaussian, pissa, loftq]"),
    ("model_dtype_unknown", ["model.dtype=float8"], "expected one of [auto, bfloat16, float16, float32]"),
    ("upcast_unknown", ["model.upcast=some"], "expected one of [none, norms, all]"),
    ("optimizer_unknown", ["optim.name=sgd"], "expected one of [adamw, paged_adamw_8bit]"),
    ("overwrite_not_a_bool", ["overwrite=maybe"], "Value 'maybe' is not a valid bool"),
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


def test_hf_dataset_offline_and_not_cached(compose, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(v, "hub_reachable", lambda: False)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        v.validate(OmegaConf.to_object(compose(["data=hf", "data.path=someorg/some_dataset"])))
    assert time.monotonic() - t0 < 5  # not ~20 s of retries
    assert "not in the local datasets cache" in str(e.value) and "data=jsonl data.path=<file>" in str(e.value)


def test_relative_model_path_that_does_not_exist_is_not_taken_for_a_hub_id(compose, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(v, "hub_reachable", lambda: False)
    with pytest.raises(ConfigError) as e:
        v.validate(OmegaConf.to_object(compose(["model=local", "model.path=models/my-llama"])))
    assert "there is no local directory" in str(e.value) and "models/my-llama" in str(e.value)


def test_unset_required_values_are_named(compose):
    from qlora_lab.runner.run import run

    with pytest.raises(ConfigError) as e:
        run(compose(["model=local", "data=jsonl"]))  # both leave `???` in their YAML
    assert [p.split(";")[0] for p in e.value.problems] == ["data.path is not set", "model.path is not set"]


def test_lora_target_that_is_not_a_linear_layer(compose):
    cfg = OmegaConf.to_object(compose(["lora.target_modules=[q_proj,norm]"]))
    with pytest.raises(ConfigError) as e:
        plan.plan_run(cfg, "cpu")  # on the meta device: PEFT would refuse only after the weights loaded
    assert len(e.value.problems) == 1 and "'norm', a LlamaRMSNorm, which LoRA cannot adapt" in str(e.value)


def test_quantization_skip_module_that_matches_nothing(compose):
    cfg = OmegaConf.to_object(compose(["quantization.skip_modules=[lm_haed]"]))
    with pytest.raises(ConfigError, match=r"\['lm_haed'\] but model tiny has no such module, so nothing would be"):
        plan.plan_run(cfg, "cpu")
    plan.plan_run(OmegaConf.to_object(compose(["quantization.skip_modules=[lm_head]"])), "cpu")


def test_resume_from_a_file_or_a_run_without_checkpoints(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file; give a run dir or one of its checkpoints/step_"):
        checkpoint.find(str(tmp_path / "adapter_model.safetensors"), tmp_path)
    with pytest.raises(CheckpointError, match=r"no whole checkpoint in .*save.every_steps>0"):
        checkpoint.find(str(tmp_path), tmp_path)


# ---- a local checkpoint directory (model=local model.path=DIR): every file it needs, before anything loads ----

def _remove(name: str):
    return lambda d: (d / name).unlink()


def _truncate(d):  # a copy or download cut short
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])


def _corrupt_header(d):
    w = d / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[8:12] = b"\xff\xfe{{"
    w.write_bytes(bytes(raw))


def _lose_a_shard(d):
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


def _into_an_adapter(d):  # what a run's adapter/ dir holds
    (d / "config.json").unlink()
    (d / "model.safetensors").rename(d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))


def _into_a_file(d):
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    d.write_text("weights?")


MODEL_DIR_CASES = [
    ("missing", shutil.rmtree, "does not exist; give a checkpoint directory"),
    ("a_file", _into_a_file, "is a file; give the directory that holds config.json"),
    ("no_config", _remove("config.json"), "has no config.json"),
    ("no_tokenizer", _remove("tokenizer.json"), "has no tokenizer files"),
    ("no_weights", _remove("model.safetensors"), "has no weights (*.safetensors or *.bin)"),
    ("truncated_weights", _truncate, "model.safetensors is truncated ("),
    ("corrupted_header", _corrupt_header, "model.safetensors has an unreadable header"),
    ("missing_shard", _lose_a_shard, "lacks 1 weight shard(s) its model.safetensors.index.json lists"),
    ("lora_adapter", _into_an_adapter, "is a LoRA adapter (adapter_config.json), not a model; set model.path to its "
                                       "base model (/models/base)"),
]


@pytest.mark.parametrize("damage,needle", [c[1:] for c in MODEL_DIR_CASES], ids=[c[0] for c in MODEL_DIR_CASES])
def test_model_dir(compose, tmp_path, damage, needle):
    d = fake_checkpoint(tmp_path / "ckpt")
    damage(d)
    with pytest.raises(ConfigError) as e:
        v.validate(OmegaConf.to_object(compose(["model=local", f"model.path={d}", "model.max_seq_len=64"])))
    assert len(e.value.problems) == 1 and needle in e.value.problems[0], e.value.problems
    assert "model.path=" in e.value.problems[0]


# ---- the catalogue and its tests stay in step ----

FAMILIES = {"test_config_value": CONFIG_CASES, "test_choice_value": COMPOSE_CASES, "test_model_dir": MODEL_DIR_CASES,
            "test_command_line_mistakes": COMMAND_LINE_CASES, **TRUST_FAMILIES}


def _test_exists(ref: str) -> bool:
    m = re.fullmatch(r"(test_\w+)\.py::(\w+)(?:\[([\w-]+)\])?", ref)
    if not m:
        return False
    path = Path(__file__).parent / f"{m[1]}.py"
    if not path.is_file() or not re.search(rf"^def {m[2]}\(", path.read_text(), re.M):
        return False
    return m[3] is None or m[3] in {c[0] for c in FAMILIES.get(m[2], [])}


def test_every_catalogued_case_has_its_test():
    table = (ROOT / "docs" / "bad_inputs.md").read_text()
    rows = [line for line in table.splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    refs = [re.findall(r"`(test_[^`]+)`", row) for row in rows]
    assert len(rows) >= 120 and all(refs), "every row names its test"
    assert [int(r.split("|")[1]) for r in rows] == list(range(1, len(rows) + 1)), "rows are numbered 1, 2, ..."
    missing = [r for rr in refs for r in rr if not _test_exists(r)]
    assert not missing, f"docs/bad_inputs.md names tests that do not exist: {missing}"
    listed = {tuple(re.fullmatch(r".*::(\w+)\[([\w-]+)\]", r).groups()) for rr in refs for r in rr if "[" in r}
    assert listed == {(f, c[0]) for f, cases in FAMILIES.items() for c in cases}, "every case is in the docs table"
