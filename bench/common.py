"""What the benchmarks share: a run spec of a benchmark shape, composed like train.py composes one."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE_MODEL = {"phi4mini": "phi4_mini_shape", "llama8b": "llama3_8b_shape", "qwen05b": "qwen2_5_0_5b_shape"}
DEFAULT_CACHE = "/tmp/qlab-cache"  # random-init shapes are built once per machine


def bench_spec(shape: str, overrides: list[str], seq: int, cache_dir: str, device: str = "cuda"):
    """The resolved RunSpec of `model=<shape>` with `overrides` at `seq` tokens (what train.py would run)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from qlora_lab.configs import register_configs
    from qlora_lab.runner.resolve import resolve_spec

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"model={SHAPE_MODEL[shape]}", *overrides, f"model.max_seq_len={seq}", f"device={device}",
            "logger=none", "output_dir=/tmp/qlab-bench", "run_name=bench", "sweep_id=null", f"cache_dir={cache_dir}"])
    spec, _, _ = resolve_spec(OmegaConf.to_object(cfg), device)
    return spec
