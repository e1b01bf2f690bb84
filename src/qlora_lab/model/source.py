"""Stage 1 (load), where the model comes from: a hub id, a local checkpoint directory, or a random-init build.

`model=tiny` and the random-init benchmark shapes are built once into the cache and then take the very same
`from_pretrained` path as a hub id or a local checkpoint, so the code the tests run is the code users run.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from qlora_lab.core.files import read_json
from qlora_lab.core.paths import SHIPPED_CONFIGS
from qlora_lab.core.resolvers import safe
from qlora_lab.core.schema import ModelConfig
from qlora_lab.model.gguf import ensure_converted, locate
from qlora_lab.model.random_init import ensure_built


def resolve_model_path(m: ModelConfig, cache_dir: str, seed: int, device: str = "cpu") -> str:
    """The directory or hub id to load from; builds the random-init model first if the config asks for one."""
    name = safe(m.name) or "model"  # a user's value becomes a path under the cache: one component, never `..`
    if m.build:
        return str(ensure_built(dict(m.build), Path(cache_dir).resolve(), name, seed=seed, device=device))
    if m.gguf:
        return str(ensure_converted(m.gguf, Path(cache_dir).resolve(), name))
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
        data = read_json(local, "point model.path at a checkpoint directory whose config.json is the model's")
    else:
        shipped = SHIPPED_CONFIGS / (m.path.replace("/", "--") + ".json")
        if not shipped.is_file():
            return AutoConfig.from_pretrained(m.path, trust_remote_code=m.trust_remote_code)
        data = json.loads(shipped.read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def build_problems(build: dict) -> list[str]:
    """`model.build` is open to the keys of a transformers config (core/schema.py); transformers' configs take any
    keyword and keep an unknown one as a dead attribute, so a typo (`num_hidden_layer`) would build the default shape
    without a word. A key is the config's when its class has it (as an attribute, an `__init__` argument or an
    alias), or when setting it changes the config beyond storing it (`rope_theta` goes into `rope_parameters`)."""
    import inspect

    from transformers import CONFIG_MAPPING

    build = dict(build)
    kind = build.pop("model_type", None)
    if kind not in CONFIG_MAPPING:
        near = difflib.get_close_matches(str(kind), list(CONFIG_MAPPING.keys()), n=1)
        return [f"model.build.model_type={kind} is not a transformers model type"
                + (f"; did you mean {near[0]}?" if near else " (e.g. llama, qwen2, phi3)")]
    cls = CONFIG_MAPPING[kind]
    default = cls().to_dict()
    known = set(default) | set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))
    problems = []
    for key, value in build.items():
        if key in known:
            continue
        try:
            consumed = cls(**{key: value}).to_dict() != {**default, key: value}
        except Exception as e:  # the class refuses the value: not a dead attribute, and from_config will say why
            consumed = True
            problems.append(f"model.build.{key}={value!r}: {cls.__name__} refuses it ({type(e).__name__}: {e})")
        if not consumed:
            near = difflib.get_close_matches(key, sorted(k for k in known if not k.startswith("_")), n=1)
            problems.append(f"model.build.{key} is not a key of {cls.__name__} (model_type={kind}), which would keep "
                            "it unused" + (f"; did you mean model.build.{near[0]}?" if near else "; remove it"))
    return problems


def load_tokenizer(path: str, m: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(m.tokenizer or path, trust_remote_code=m.trust_remote_code)
    if tok.pad_token is None:  # many base models ship none; padding positions are masked from the loss anyway
        tok.pad_token = tok.eos_token
    return tok
