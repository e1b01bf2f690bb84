"""Shared fixtures: compose configs the way train.py does, on a tiny model built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(Path(__file__).parent))  # the wandb_reader helper

from qlora_lab.config import register_configs  # noqa: E402
from qlora_lab.resolvers import register_resolvers  # noqa: E402

register_configs()
register_resolvers()
torch.set_num_threads(2)  # CI has 2 cores; the same here keeps pinned numbers comparable


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def compose(cache_dir, tmp_path):
    """compose(["lora.r=8", ...]) -> DictConfig as train.py would see it, writing under tmp_path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(overrides: list[str] = (), out: Path | None = None):
        fixed = [f"output_dir={out or tmp_path}", f"cache_dir={cache_dir}", "run_name=test", "sweep_id=null",
                 "logger.progress_bar=false"]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name="train", overrides=fixed + list(overrides))

    return _compose


@pytest.fixture
def tiny(compose):
    """A prepared, LoRA-wrapped tiny model with its tokenizer and a training batch, for unit checks."""

    def _build(overrides: list[str] = (), seed: int = 0):
        from omegaconf import OmegaConf

        from qlora_lab import adapt, data, load, prepare, quantize

        cfg = OmegaConf.to_object(compose(list(overrides) + ["device=cpu"]))
        path = load.resolve_model_path(cfg.model, cfg.cache_dir, 0)
        tok = load.load_tokenizer(path, cfg.model)
        torch.manual_seed(seed)
        model = load.load_model(path, cfg.model, quantize.build_bnb_config(cfg.quantization), "cpu")
        model = prepare.prepare_model(model, cfg.model, cfg.checkpointing, "cpu")
        model = adapt.wrap_model(model, cfg.lora, cfg.quantization)
        rows = data.read_rows(cfg.data)[:8]
        batch = data.collate(data.build_examples(rows, tok, cfg.model.max_seq_len, True), tok.pad_token_id)
        return cfg, model, tok, batch

    return _build
