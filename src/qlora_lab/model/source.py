"""Stage 1 (load), where the model comes from: a hub id, a local checkpoint directory, or a random-init build.

`model=tiny` and the random-init benchmark shapes are built once into the cache and then take the very same
`from_pretrained` path as a hub id or a local checkpoint, so the code the tests run is the code users run.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_lab.core.paths import SHIPPED_CONFIGS
from qlora_lab.core.schema import ModelConfig
from qlora_lab.model.gguf import ensure_converted, locate
from qlora_lab.model.random_init import ensure_built


def resolve_model_path(m: ModelConfig, cache_dir: str, seed: int, device: str = "cpu") -> str:
    """The directory or hub id to load from; builds the random-init model first if the config asks for one."""
    if m.build:
        return str(ensure_built(dict(m.build), Path(cache_dir).resolve(), m.name, seed=seed, device=device))
    if m.gguf:
        return str(ensure_converted(m.gguf, Path(cache_dir).resolve(), m.name))
    return str(Path(m.path).expanduser()) if Path(m.path).expanduser().exists() else m.path


def model_config(m: ModelConfig):
    """The transformers config of the model, without weights and without a download where possible.

    Built shapes come from `model.build`, GGUF files from their metadata, local checkpoints from their
    config.json, and the hub presets from the architecture configs shipped in assets/configs (the
    memory-relevant fields of the published config.json).
    """
    from transformers import AutoConfig

    if m.build:
        build = dict(m.build)
        return AutoConfig.for_model(build.pop("model_type"), **build)
    if m.gguf:  # the GGUF file's metadata: no conversion needed to plan
        path = locate(m.gguf)
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    local = Path(m.path).expanduser() / "config.json"
    if local.is_file():
        data = json.loads(local.read_text())
    else:
        shipped = SHIPPED_CONFIGS / (m.path.replace("/", "--") + ".json")
        if not shipped.is_file():
            return AutoConfig.from_pretrained(m.path, trust_remote_code=m.trust_remote_code)
        data = json.loads(shipped.read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def load_tokenizer(path: str, m: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(m.tokenizer or path, trust_remote_code=m.trust_remote_code)
    if tok.pad_token is None:  # many base models ship none; padding positions are masked from the loss anyway
        tok.pad_token = tok.eos_token
    return tok
