"""Checks against the machine, before any model loads: the device, the quantization backend and the sinks (each
plug-in says what it needs), files and directories, the hub. Together with the pure config checks (`core.checks`) they make `validate`, which reports
every problem at once, each with its fix.

Nothing here changes the machine: directories are checked for writability without being created.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import socket
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from qlora_lab import closed, sinks
from qlora_lab.core.checks import config_problems
from qlora_lab.core.dist import launched_rank, launched_world_size
from qlora_lab.core.errors import ConfigError, RunDirInUse
from qlora_lab.core.schema import ModelConfig, TrainConfig
from qlora_lab.model import quantize
from qlora_lab.model.gguf import locate
from qlora_lab.model.source import build_problems
from qlora_lab.runner.rundir import not_writable, reuse_problem

# Files that make a directory a loadable checkpoint (transformers' names).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or (os.sep in path and Path(path).exists())


def _hub_host() -> tuple[str, int]:
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _env_on(name: str) -> bool:
    return os.environ.get(name, "0") not in ("0", "", "false", "False")


def hub_reachable(timeout: float = 3.0) -> bool:
    if _env_on("HF_HUB_OFFLINE"):
        return False
    try:
        socket.create_connection(_hub_host(), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_model_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library rejects: let from_pretrained say why
        return True


def _hub_dataset_cached(name: str) -> bool:
    """Whether `datasets.load_dataset(name)` has something to read offline: the prepared dataset or its hub files."""
    from huggingface_hub import constants

    prepared = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    return hub.is_dir() or any(prepared.glob(f"{name.replace('/', '___')}*"))


def safetensors_problem(path: Path) -> str | None:
    """None if the safetensors file's header parses and its size is what the header's offsets say, else what is
    wrong: a copy or download cut short leaves a file that transformers reports as an opaque deserialization error."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if len(head) < 8 or n > size - 8:
            return f"is truncated ({size:,} bytes, less than its header)"
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError):
            return "has an unreadable header (corrupted, or not a safetensors file)"
    want = 8 + n + end
    if size < want:
        return f"is truncated ({size:,} of {want:,} bytes)"
    if size > want:
        return f"has {size - want:,} bytes after its last tensor (corrupted)"
    return None


def _weights_problem(local: Path) -> str | None:
    index = next((local / i for i in WEIGHT_INDEXES if (local / i).is_file()), None)
    if index is not None:
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            return f"has an unreadable {index.name}"
        missing = [f for f in files if not (local / f).is_file()]
        if missing:
            return f"lacks {len(missing)} weight shard(s) its {index.name} lists ({', '.join(missing[:3])})"
    else:
        files = [p.name for p in sorted(local.glob("*.safetensors"))] or [p.name for p in sorted(local.glob("*.bin"))]
        if not files:
            return "has no weights (*.safetensors or *.bin)"
    for name in files:
        if name.endswith(".safetensors"):
            why = safetensors_problem(local / name)
            if why:
                return f"{name} {why}"
    return None


def model_dir_problems(m: ModelConfig, train: bool = True) -> list[str]:
    """A local checkpoint directory must hold config.json, a tokenizer and whole weights (a plan reads config.json
    only); each missing piece is named with its fix (without this, transformers fails after a long load, or blames a
    missing sentencepiece)."""
    local, where = Path(m.path).expanduser(), f"model.path={m.path}"
    if not local.exists():
        return [f"{where} does not exist; give a checkpoint directory (config.json, tokenizer, weights) or a hub id"]
    if not local.is_dir():
        return [f"{where} is a file; give the directory that holds config.json, the tokenizer and the weights"]
    adapter = local / "adapter_config.json"
    if adapter.is_file() and not (local / "config.json").is_file():  # a run's adapter/ dir, taken for a model
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (ValueError, AttributeError):  # the adapter's own config, damaged: what it is still holds
            base = None
        return [f"{where} is a LoRA adapter (adapter_config.json), not a model; set model.path to its base model"
                + (f" ({base})" if base else "") + ", and to train this adapter on, resume from its run "
                "(resume=<run dir>)"]
    p = []
    if not (local / "config.json").is_file():
        p.append(f"{where} has no config.json; point it at a saved checkpoint directory")
    if not train:
        return p
    if m.tokenizer is None and not any((local / f).is_file() for f in TOKENIZER_FILES):
        p.append(f"{where} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])} or vocab files); copy them from "
                 "the base model's directory, or set model.tokenizer=<its dir or hub id>")
    why = _weights_problem(local)
    if why:
        p.append(f"{where} {why}; copy or download the checkpoint again")
    return p


def _device(cfg: TrainConfig) -> tuple[str, list[str]]:
    device = resolve_device(cfg.device)
    if device == "cuda" and not torch.cuda.is_available():
        return "cpu", ["device=cuda but no CUDA device is visible; use device=cpu or device=auto"]
    return device, []


def _model(cfg: TrainConfig) -> list[str]:
    m, p = cfg.model, []
    if m.build:  # a built model: its keys are its transformers config's
        return build_problems(dict(m.build))
    if not m.path:  # an empty path is core.checks'
        return p
    if m.gguf:  # converted from the GGUF file into the cache; model.path is not read
        try:
            locate(m.gguf)
        except FileNotFoundError as e:
            p.append(str(e))
        return p
    local = Path(m.path).expanduser()
    if looks_local(m.path) or local.exists():
        p += model_dir_problems(m, train=cfg.mode == "train")
        config_json = local / "config.json"
        try:
            max_pos = json.loads(config_json.read_text()).get("max_position_embeddings") \
                if config_json.is_file() else None
        except (ValueError, AttributeError) as e:
            p.append(f"model.path={m.path}: its config.json is not a JSON object ({type(e).__name__}: "
                     f"{str(e)[:100]}); copy or download the checkpoint again")
            max_pos = None
        if max_pos is not None and m.max_seq_len > max_pos:
            p.append(f"model.max_seq_len={m.max_seq_len} exceeds the model's max_position_embeddings={max_pos}; "
                     f"set model.max_seq_len<={max_pos}")
    elif cfg.mode == "train" and not _hub_model_cached(m.path) and not hub_reachable():
        p.append(f"model.path={m.path} is not in the local Hugging Face cache and {_hub_host()[0]} cannot be "
                 f"reached; on a machine with access run `hf download {m.path}` and copy the cache (HF_HOME), or "
                 "set model.path to a local checkpoint directory"
                 + (f" (there is no local directory {local} either)" if os.sep in m.path else ""))
    return p


def _tokenizer(m: ModelConfig) -> list[str]:
    tok = Path(m.tokenizer).expanduser() if m.tokenizer else None
    if tok is None or not (looks_local(m.tokenizer) or tok.exists()):  # none, or a hub id
        return []
    if tok.is_dir() and any((tok / f).is_file() for f in TOKENIZER_FILES):
        return []
    return [f"model.tokenizer={m.tokenizer} is not a directory with tokenizer files ({', '.join(TOKENIZER_FILES[:2])} "
            "or vocab files); point it at one, or a hub id"]


def _attention(cfg: TrainConfig, device: str) -> list[str]:
    if cfg.model.attn_implementation != "flash_attention_2" or cfg.mode != "train":
        return []
    lacking = ([] if device == "cuda" else ["a CUDA GPU"]) + \
        ([] if importlib.util.find_spec("flash_attn") else ["the flash-attn package"])
    if not lacking:
        return []
    return [f"model.attn_implementation=flash_attention_2 needs {' and '.join(lacking)}; use "
            "model.attn_implementation=sdpa (PyTorch's fused attention, nothing to install)"
            + (", or pip install flash-attn" if device == "cuda" else "")]


def _plugins(cfg: TrainConfig, device: str) -> list[str]:
    """The quantization backend's and the sinks' problems, with their config and on this machine."""
    p = quantize.config_problems(cfg) + sinks.config_problems(cfg.logger)
    if not p:
        p = quantize.machine_problems(cfg, device) + sinks.machine_problems(cfg.logger)
    return p


def _data(cfg: TrainConfig) -> list[str]:
    d, p = cfg.data, []
    if not d.path:
        return p
    local = Path(d.path).expanduser()
    if d.source == "jsonl" and local.is_dir():
        inside = sorted(x.name for x in local.glob("*.jsonl"))[:3]
        p.append(f"data.path={d.path!r} is a directory; give the .jsonl file itself"
                 + (f" (it holds {', '.join(inside)})" if inside else ""))
    elif d.source == "jsonl" and not local.is_file():
        p.append(f"data.path={d.path!r} does not exist; give the path of a .jsonl file")
    if d.source == "hf" and looks_local(d.path) and not local.exists():
        p.append(f"data.path={d.path} does not exist; data=hf takes a local dataset directory or a hub dataset name")
    elif d.source == "hf" and not local.exists() and cfg.mode == "train" and not _hub_dataset_cached(d.path) \
            and (_env_on("HF_DATASETS_OFFLINE") or not hub_reachable()):
        p.append(f"data.path={d.path} is not in the local datasets cache and {_hub_host()[0]} cannot be reached "
                 "(datasets would retry for ~20 s, then fail); on a machine with access load it once and copy the "
                 "cache (HF_HOME), or save its rows as JSON lines and use data=jsonl data.path=<file>")
    return p


def _files(cfg: TrainConfig) -> list[str]:
    p = []
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).expanduser().exists():
        p.append(f"resume={cfg.resume}: no such path; give a run dir or one of its checkpoints/step_* dirs, "
                 "or resume=auto")
    if cfg.mode == "train":
        for key in ("output_dir", "cache_dir"):
            why = not_writable(getattr(cfg, key))
            if why:
                p.append(f"{key}={getattr(cfg, key)} is not writable ({why}); point it at a writable directory"
                         + (" (hydra.run.dir=... sets the run dir)" if key == "output_dir" else ""))
    return p


def _run_dir(cfg: TrainConfig) -> list[str]:
    if cfg.mode != "train" or launched_rank() > 0:  # rank 0 alone writes (and may already have started)
        return []
    why = reuse_problem(Path(cfg.output_dir), cfg.resume, cfg.overwrite)
    return [why] if why else []


def _launch(cfg: TrainConfig, device: str, world: int) -> list[str]:
    if cfg.distributed.name != "none" and device == "cuda" and cfg.mode == "train" \
            and world > torch.cuda.device_count():
        return [f"the launcher started {world} processes but {torch.cuda.device_count()} GPUs are visible; use "
                f"--nproc_per_node={torch.cuda.device_count()} (one process per GPU)"]
    return []


def validate(cfg: TrainConfig) -> str:
    """Raise ConfigError listing every problem of `cfg` on this machine; returns the device the run will use."""
    world = launched_world_size()
    device, problems = _device(cfg)
    problems += config_problems(cfg, device, world)
    problems += _model(cfg) + _tokenizer(cfg.model) + _attention(cfg, device) + _plugins(cfg, device) + _data(cfg) + _files(cfg) \
        + _launch(cfg, device, world)
    in_use = _run_dir(cfg)
    if in_use:
        raise RunDirInUse(problems + in_use)
    if problems:
        raise ConfigError(problems)
    return device


# train.py's flags that change which config is composed: the check below would compose another one, so it stands aside
_CONFIG_FLAGS = ("--config-path", "--config-name", "--config-dir", "-cp", "-cn", "-cd")
_MAX_COMPOSES = 32  # a sweep's values are composed one at a time; past this many, the rest are left to Hydra


def _option_problem(group: str, value: str, conf_dir: Path) -> str | None:
    options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
    if not options or value in options or (value in ("null", "none") and group != "logger"):
        return None
    guess = difflib.get_close_matches(value, options, n=1, cutoff=0.6)
    return (f"{group}={value}: no such option" + (f"; did you mean {group}={guess[0]}?" if guess else "")
            + f" ({group} takes: {', '.join(options)}; see conf/{group}/)")


def command_line_problems(args: list[str], conf_dir: Path) -> list[str]:
    """What is wrong with train.py's overrides, found before Hydra composes them: Hydra ends the process on a
    composition error with its own message (`Could not override 'lora.rank'. To append to your config use
    +lora.rank=8`, which leads to a second refusal) and exit status 1, the status of a crash. Here every problem is
    listed at once, with the schema's did-you-mean, for exit status 2: a key the schema lacks, with or without +; a
    group option that does not exist (`logger=[wandb,mlfow]`); a value Hydra cannot merge (`lora.r=abc`), each
    value of a sweep on its own. Hydra's own keys are left to Hydra."""
    if any(a.split("=")[0] in _CONFIG_FLAGS for a in args):
        return []
    texts = [a for a in args if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(texts)
    except HydraException:
        return []  # a syntax error: Hydra's message shows where
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    problems, mine = [], []
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete():
            continue
        mine.append(o)
        if key in groups:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
            problems += [p for v in flat if (p := _option_problem(key, str(v), conf_dir))]
    problems += closed.override_problems([o.input_line for o in mine], groups)
    if problems:
        return list(dict.fromkeys(problems))
    # The values, merged as Hydra will merge them: every sweep value once, beside the first value of the others.
    sweeps = [o for o in mine if o.is_sweep_override()]
    plain = [o.input_line for o in mine if not o.is_sweep_override()]
    firsts = {id(o): f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in sweeps}
    trials = [plain + list(firsts.values())]
    for o in sweeps:
        for v in list(o.sweep_string_iterator())[1:]:
            trials.append(plain + [firsts[id(x)] if x is not o else f"{o.get_key_element()}={v}" for x in sweeps])
    out = []
    with initialize_config_dir(config_dir=str(conf_dir.absolute()), version_base="1.3"):
        for trial in trials[:_MAX_COMPOSES]:
            try:
                compose(config_name="train", overrides=trial)
            except (HydraException, OmegaConfBaseException) as e:
                cause = str(e.__cause__ or "").strip().splitlines()
                out.append(str(e).strip().splitlines()[0] + (f": {cause[0]}" if cause else ""))
    return list(dict.fromkeys(out))


def run_dir_args(args: list[str]) -> tuple[list[str], list[str]]:
    """train.py's arguments with `output_dir=X` made the run dir (`hydra.run.dir=X` added): Hydra writes its record
    (.hydra/, train.log) into hydra.run.dir, so output_dir alone split a run's files over two dirs. A sweep's jobs
    each have their own dir under hydra.sweep.dir: output_dir there is a problem. Returns (args, problems)."""
    given = [a for a in args if a.split("=", 1)[0].lstrip("+") == "output_dir" and "=" in a]
    if not given:
        return args, []
    if any(a in ("-m", "--multirun") for a in args):
        return args, [f"{given[-1]} would put every job of the sweep in one dir; give hydra.sweep.dir=<dir> "
                      "(each job writes <dir>/<n>_<name>)"]
    out = given[-1].split("=", 1)[1]
    runs = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
    if runs and Path(runs[-1]).expanduser().absolute() != Path(out).expanduser().absolute():
        return args, [f"{given[-1]} and hydra.run.dir={runs[-1]} name two dirs for one run (Hydra's record would go "
                      "to the second); give hydra.run.dir=<dir> alone"]
    return (args if runs else args + [f"hydra.run.dir={out}"]), []
