"""Every group option composes and validates; bad input fails early with every problem and its fix."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from helpers import CONF, fake_checkpoint
from qlora_lab.core.errors import ConfigError
from qlora_lab.model.kernels import resolve_kernels
from qlora_lab.model.quantize import bitsandbytes as bnb_backend
from qlora_lab.runner import preflight as v

GROUPS = ["model", "quantization", "lora", "checkpointing", "data", "optim", "logger"]
CUDA_ONLY = {("optim", "paged_adamw_8bit")}
NEEDS_PATH = {("data", "jsonl"), ("data", "hf"), ("model", "local")}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(compose, group, option, tmp_path, monkeypatch):
    monkeypatch.setattr(v, "hub_reachable", lambda: True)  # hub presets validate as on a machine with access
    extra = []
    if (group, option) == ("model", "local"):
        extra = [f"model.path={fake_checkpoint(tmp_path / 'ckpt')}"]
    elif (group, option) in NEEDS_PATH:
        path = tmp_path / "d.jsonl"
        path.write_text('{"prompt": "a", "response": "b"}\n')
        extra = [f"data.path={path}"]
    cfg = OmegaConf.to_object(compose([f"{group}={option}", "device=cpu"] + extra))
    if group == "logger":  # the sinks it selects, each typed by its own schema
        assert list(cfg.logger) == ([] if option == "none" else [option])
        assert all(type(s).__module__ == f"qlora_lab.sinks.{n}" for n, s in cfg.logger.items())
    else:
        assert getattr(cfg, group).name == option
    if (group, option) in CUDA_ONLY:
        with pytest.raises(ConfigError, match="optim=adamw"):
            v.validate(cfg)
    else:
        v.validate(cfg)


def test_several_sinks_each_with_its_own_typed_keys(compose):
    cfg = OmegaConf.to_object(compose(["logger=[wandb,mlflow]", "logger.mlflow.experiment=x",
                                       "logger.wandb.mode=disabled"]))
    assert list(cfg.logger) == ["wandb", "mlflow"]
    assert cfg.logger["mlflow"].experiment == "x" and cfg.logger["wandb"].mode == "disabled"
    with pytest.raises(ConfigCompositionException, match="logger.mlflow.bogus"):
        compose(["logger=[wandb,mlflow]", "logger.mlflow.bogus=1"])
    with pytest.raises(ConfigCompositionException, match="logger.wandb.experiment"):  # another sink's key
        compose(["logger=[wandb,mlflow]", "logger.wandb.experiment=x"])


def test_each_quantization_backend_takes_its_own_keys_only(compose):
    assert type(OmegaConf.to_object(compose(["quantization=torchao_nf4"])).quantization).__name__ == \
        "TorchaoQuantization"
    with pytest.raises(ConfigCompositionException, match="quantization.quant_type"):  # bitsandbytes' key
        compose(["quantization=torchao_nf4", "quantization.quant_type=fp4"])
    with pytest.raises(ConfigCompositionException, match="quantization.block_size"):
        compose(["quantization=nf4", "quantization.block_size=32"])


@pytest.mark.parametrize("experiment", [p.stem for p in (CONF / "experiment").glob("*.yaml")])
def test_every_experiment_composes(compose, experiment):
    cfg = OmegaConf.to_object(compose([f"experiment={experiment}"]))
    assert cfg.lora.r > 0


def test_phi4_experiment_reproduces_the_seed_setup(compose):
    cfg = OmegaConf.to_object(compose(["experiment=phi4_mini_qlora"]))
    assert cfg.model.path == "microsoft/Phi-4-mini-instruct"
    assert (cfg.quantization.quant_type, cfg.quantization.double_quant) == ("nf4", True)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 32, ["all-linear"])
    assert cfg.checkpointing.enabled and not cfg.checkpointing.use_reentrant
    assert cfg.data.micro_batch_size == 4
    # the measured levers (bench/results/): liger loss, compiled layers, fused LoRA with fp32 master weights,
    # offloaded checkpointing
    assert (cfg.model.kernels, cfg.model.compile, cfg.lora.kernel) == ("auto", "auto", "fused")
    assert cfg.lora.adapter_dtype == "float32" and cfg.checkpointing.offload_to_cpu


def test_unknown_group_option_lists_the_valid_ones(compose):
    with pytest.raises(ConfigCompositionException) as e:
        compose(["quantization=nf5"])
    assert "nf4" in str(e.value) and "fp4" in str(e.value) and "int8" in str(e.value)


def test_unknown_key_fails_at_composition(compose):
    with pytest.raises(ConfigCompositionException) as e:
        compose(["lora.rank=8"])
    assert isinstance(e.value.__cause__, ConfigKeyError) or "rank" in str(e.value.__cause__)


def test_wrong_type_fails_at_composition(compose):
    with pytest.raises(ConfigCompositionException) as e:
        compose(["lora.r=sixteen"])
    assert isinstance(e.value.__cause__, ValidationError)


def test_bad_values_are_all_reported_at_once(compose):
    cfg = OmegaConf.to_object(compose(["lora.r=0", "lora.dropout=1.0", "lora.alpha=0",
                                       "data.path=/nonexistent/train.jsonl", "optim.lr=-1", "device=cpu"]))
    with pytest.raises(ConfigError) as e:
        v.validate(cfg)
    msg = str(e.value)
    assert len(e.value.problems) == 5, msg
    for needle in ("lora.r=0 must be a positive integer", "lora.dropout=1.0 must be in [0, 1)",
                   "lora.alpha=0.0 must be > 0", "data.path='/nonexistent/train.jsonl' does not exist",
                   "optim.lr=-1.0 must be > 0"):
        assert needle in msg


def test_jsonl_without_path_names_the_fix(compose):
    cfg = compose(["data=jsonl"])
    with pytest.raises(Exception) as e:  # MISSING value: OmegaConf refuses to build the object
        v.validate(OmegaConf.to_object(cfg))
    assert "data.path" in str(e.value) or "path" in str(e.value)


def test_4bit_without_bitsandbytes_backend_names_the_fix(compose, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)  # import now raises ImportError
    bnb_backend._probe.cache_clear()
    try:
        for q in ("nf4", "fp4", "int8"):
            with pytest.raises(ConfigError) as e:
                v.validate(OmegaConf.to_object(compose([f"quantization={q}", "device=cpu"])))
            assert "choose quantization=none" in str(e.value)
        v.validate(OmegaConf.to_object(compose(["quantization=none", "device=cpu"])))
    finally:
        bnb_backend._probe.cache_clear()


def test_seq_len_above_model_maximum(compose):
    with pytest.raises(ConfigError, match="max_position_embeddings=256"):
        v.validate(OmegaConf.to_object(compose(["model.max_seq_len=4096"])))


def test_pissa_on_a_quantized_base_is_refused(compose):
    with pytest.raises(ConfigError, match="lora.init=pissa"):
        v.validate(OmegaConf.to_object(compose(["lora.init=pissa", "quantization=nf4"])))
    v.validate(OmegaConf.to_object(compose(["lora.init=pissa", "quantization=none"])))


def test_wandb_online_without_credentials(compose, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ConfigError, match="wandb login"):
        v.validate(OmegaConf.to_object(compose(["logger.wandb.mode=online"])))


def test_local_model_path_without_checkpoint(compose, tmp_path):
    (tmp_path / "not-a-model").mkdir()
    cfg = compose(["model=qwen2_5_0_5b", f"model.path={tmp_path}/not-a-model"])
    with pytest.raises(ConfigError, match="has no config.json"):
        v.validate(OmegaConf.to_object(cfg))


def test_liger_kernels_need_cuda(compose):
    with pytest.raises(ConfigError, match="model.kernels=none on the CPU"):
        v.validate(OmegaConf.to_object(compose(["model.kernels=liger", "device=cpu"])))


def test_kernels_auto_resolves_to_liger_only_where_it_can_run(compose, monkeypatch):
    import sys

    m = OmegaConf.to_object(compose(["experiment=phi4_mini_qlora"])).model
    assert m.kernels == "auto"
    assert resolve_kernels(m, "phi3", "cpu") == "none"
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)  # not installed
    assert resolve_kernels(m, "phi3", "cuda") == "none"
