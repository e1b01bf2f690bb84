"""The models an export needs, and the merge itself, all in fp32 on the CPU.

- as trained: the run's own pipeline (`model.build_model` on the recorded config: the base quantized as it was
  trained, LoRA wrapped as it was) with the saved adapter weights loaded into it: what the run evaluated.
- the merge base + adapter, unmerged: PEFT on the weights the adapter is merged into. Either the original 16-bit
  weights (plain `from_pretrained`, as a user loads them) or the dequantized 4-bit base (the as-trained model with its
  LoRA layers taken off and its 4-bit weights dequantized: the very values the run's matmuls used).
- merged: `merge_and_unload` on that, in fp32, then cast to the export dtype. PEFT's merge on a bitsandbytes layer
  would re-quantize the merged weight to 4 bits (the sum no longer lies on the 4-bit grid: it changes the model),
  so the merge never runs on a quantized layer here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from qlora_lab.core.spec import RunSpec
from qlora_lab.core.schema import freeze
from qlora_lab.export.inputs import ADAPTER_WEIGHTS, Base, RunRecord
from qlora_lab.model import Source, build_model
from qlora_lab.model.source import load_tokenizer, resolve_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_path(rec: RunRecord, base: Base) -> str:
    """The base's dir, re-made into the cache through the project's pipeline when the run's copy is gone (a
    random-init build, a GGUF conversion)."""
    if Path(base.path).exists() or not (rec.cfg.model.build or rec.cfg.model.gguf):
        return base.path
    m = rec.cfg.model
    return resolve_model_path(m, rec.cfg.cache_dir, rec.cfg.seed, str(rec.cfg.device))  # a build is per device


def run_tokenizer(rec: RunRecord):
    """The tokenizer the run trained with (pad token and chat template included), loaded as the run loaded it; from
    the copy the run saved with its adapter when its base dir is gone (whatever base the merge goes into)."""
    path = rec.info.get("model_path")
    return load_tokenizer(path if path and Path(path).is_dir() else str(rec.adapter_dir), rec.cfg.model)


def cpu_spec(rec: RunRecord) -> RunSpec:
    """The run's resolved spec, moved to the CPU in fp32: the same weights, quantization and LoRA layers, computed in
    fp32; speed-only choices (compile, liger, the fused LoRA kernel, packed attention) off, as they compute the same
    function."""
    cfg = rec.cfg
    changes = {"device": "cpu", "model.dtype": "float32", "model.compile": "none", "model.kernels": "none",
               "lora.kernel": "peft", "data.packing": False, "checkpointing.layers": "all"}
    if hasattr(cfg.quantization, "compute_dtype"):  # the backend's own key (bitsandbytes has one)
        changes["quantization.compute_dtype"] = "float32"
    spec = RunSpec(cfg=freeze(cfg), device="cpu", processes=1)
    for key, value in changes.items():
        spec = spec.evolve(key, value)
    return spec


def as_trained(rec: RunRecord, path: str, tokenizer) -> torch.nn.Module:
    """The PEFT model as the run trained it, with the run's adapter weights: what its eval metrics describe."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    built = build_model(cpu_spec(rec), Source(path, tokenizer))
    result = set_peft_model_state_dict(built.model, load_file(str(rec.adapter_dir / ADAPTER_WEIGHTS)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"the adapter does not fit the model the run builds: unexpected "
                         f"{result.unexpected_keys[:3]}, missing {missing[:3]}")
    return built.model.eval()


def dequantized_from(trained: torch.nn.Module) -> torch.nn.Module:
    """The as-trained model's base with its LoRA layers removed and its quantized weights dequantized (fp32): W_q,
    the exact values its 4-bit matmuls multiply by (checked: max |logit difference| 0 on SmolLM2 nf4)."""
    base = trained.unload()
    return base.dequantize() if getattr(base, "hf_quantizer", None) is not None else base


def original(path: str, trust_remote_code: bool) -> torch.nn.Module:
    """The base as a user loads it: plain `from_pretrained` in fp32 (a pre-quantized checkpoint is dequantized)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if getattr(model, "hf_quantizer", None) is not None:
        model = model.dequantize()
    return model.eval()


def with_adapter(base: torch.nn.Module, rec: RunRecord) -> torch.nn.Module:
    """PEFT's own loader on `base`: the unmerged model the merge must reproduce."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(rec.adapter_dir)).eval()


def merged(unmerged: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """merge_and_unload in fp32 (the LoRA delta added to each fp32 weight once), then cast to `dtype`."""
    model = unmerged.merge_and_unload()
    model.config.use_cache = True  # generation wants the KV cache (the run turned it off to train)
    return model.to(DTYPES[dtype])


def write_checkpoint(model: torch.nn.Module, tokenizer, out: Path) -> None:
    """safetensors weights, config.json, generation_config.json, the tokenizer and its chat template."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def placed(target: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary dir beside `target` to write the export into, renamed to `target` when the block ends without an
    error (an earlier export there is replaced only with `overwrite`, and only then). On any error, and on Ctrl-C,
    the temporary dir is removed and `target` is as it was: an export is never half-written."""
    made_parent = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-writing-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from the other users of a shared machine
    old = None
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} appeared while exporting; nothing was replaced")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, old / target.name)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:  # put the earlier export back
                os.replace(old / target.name, target)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if made_parent and not any(target.parent.iterdir()):  # a failed first export leaves no empty export/
            target.parent.rmdir()


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
