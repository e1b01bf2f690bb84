"""Shared fixtures: compose configs the way train.py does, on a tiny model built once per session."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # helpers.py, wandb_reader.py

from helpers import CONF, compose_run  # noqa: E402
from qlora_lab.configs import register_configs  # noqa: E402
from qlora_lab.core.spec import RunSpec  # noqa: E402
from qlora_lab.runner.run import run  # noqa: E402

register_configs()
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


@pytest.fixture(scope="module")
def module_run(tmp_path_factory, cache_dir):
    """module_run(overrides) -> the dir of a real in-process run with `overrides`, trained once per test module."""
    runs: dict[tuple[str, ...], Path] = {}

    def _run(overrides: list[str]) -> Path:
        if tuple(overrides) not in runs:
            out = tmp_path_factory.mktemp("run") / "run"
            run(compose_run(cache_dir, out, list(overrides)), overrides=list(overrides))
            runs[tuple(overrides)] = out
        return runs[tuple(overrides)]

    return _run


@pytest.fixture
def copy_run(tmp_path):
    """copy_run(run_dir) -> a copy at tmp_path/run to damage or continue; the original stays for the next test."""

    def _copy(src: Path) -> Path:
        shutil.copytree(src, tmp_path / "run")
        return tmp_path / "run"

    return _copy


@pytest.fixture
def compose(cache_dir, tmp_path):
    """compose(["lora.r=8", ...]) -> DictConfig as train.py would see it, writing under tmp_path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(overrides: list[str] = (), out: Path | None = None):
        fixed = [f"output_dir={out or tmp_path}", f"cache_dir={cache_dir}", "run_name=test", "sweep_id=null",
                 "log.progress_bar=false"]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name="train", overrides=fixed + list(overrides))

    return _compose


@pytest.fixture
def spec_of(compose):
    """spec_of(["lora.r=8"], device="cpu") -> the resolved RunSpec of the composed config, as the runner makes it."""
    from omegaconf import OmegaConf

    from qlora_lab.runner.resolve import resolve_spec

    def _spec(overrides: list[str] = (), device: str = "cpu") -> RunSpec:
        return resolve_spec(OmegaConf.to_object(compose(list(overrides) + [f"device={device}"])), device)[0]

    return _spec


@pytest.fixture
def tiny(spec_of):
    """A prepared, LoRA-wrapped tiny model (model.build_model, what runs use) with its tokenizer and a batch."""

    def _build(overrides: list[str] = (), seed: int = 0, **build_kwargs):
        from qlora_lab.data import batching, rows, tokenize
        from qlora_lab.model import build_model

        spec = spec_of(overrides)
        torch.manual_seed(seed)  # the LoRA init
        built = build_model(spec, **build_kwargs)
        examples = tokenize.build_examples(rows.read_rows(spec.cfg.data)[:8], built.tokenizer,
                                           spec.cfg.model.max_seq_len, True).examples
        return spec.cfg, built.model, built.tokenizer, batching.collate(examples, built.tokenizer.pad_token_id)

    return _build
