"""What an export reads, checked before any model loads: the run dir (or the best job of a sweep), its adapter, the
base to merge into and the target dir. Every problem is collected and raised at once, each with its fix."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qlora_lab.configs import typed
from qlora_lab.core.errors import BadFile
from qlora_lab.core.schema import TrainConfig
from qlora_lab.model.quantize import backend_of
from qlora_lab.model.source import model_config
from qlora_lab.runner import compare
from qlora_lab.runner.preflight import WEIGHT_INDEXES, safetensors_problem
from qlora_lab.runner.rundir import RUN_FILES
from qlora_lab.sinks.summary import read_summary

ADAPTER = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORT_DIR = "export"  # <run dir>/export/<merged|gguf>: not one of the run's own files (RUN_FILES)
assert EXPORT_DIR not in RUN_FILES
# LoRA inits that change the base weights when the adapter is created: their adapter is not a delta on the base
# the run loaded, so merging it into that base would be wrong.
BASE_CHANGING_INITS = ("pissa", "loftq")


class ExportError(ValueError):
    """Input an export cannot use; the message lists every problem with its fix (exit status 2)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s), nothing was loaded or written:\n{lines}")


@dataclass(frozen=True)
class RunRecord:
    """A finished run as its dir records it."""

    run_dir: Path
    info: dict[str, Any]  # run_info.json
    cfg: TrainConfig  # the resolved config the run ran with
    summary: dict[str, Any]  # summary.json ({} when absent)
    adapter_config: dict[str, Any]

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / ADAPTER

    @property
    def quantized(self) -> bool:
        return backend_of(self.cfg.quantization).quantized

    @property
    def weight_only(self) -> bool:
        """Whether the quantized base multiplies by its dequantized weights (4-bit: merging into them reproduces the
        run as trained); LLM.int8 also rounds activations."""
        return backend_of(self.cfg.quantization).weight_only(self.cfg.quantization)


@dataclass(frozen=True)
class Base:
    """The weights the adapter is merged into."""

    path: str  # a checkpoint dir or hub id; a built or GGUF-converted base is re-made into the cache if missing
    dequantized: bool  # merged into the 4-bit/8-bit base's dequantized weights, not the original 16-bit ones
    why: str  # how it was chosen, for the console and the model card
    prequantized: bool  # the checkpoint itself stores quantized weights: there is no 16-bit original in it


def adapter_digest(adapter_dir: Path) -> str:
    """sha256 of the adapter's weights and config: an export records it, --check-only compares it."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", ADAPTER_WEIGHTS):
        with open(adapter_dir / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def best_job(sweep_dir: Path, metric: str) -> tuple[Path, str, float]:
    """The finished job of a sweep that is best by `metric` (in the metric's own direction, core.goals), ranked as
    the sweep report ranks them (runner.compare): (its dir, the summary key, its value)."""
    if not sweep_dir.is_dir():
        raise ExportError([f"{sweep_dir} does not exist; give a sweep dir (outputs/multirun/<time>)"])
    jobs = compare.load_jobs(sweep_dir)
    if not jobs:
        raise ExportError([f"{sweep_dir} holds no job with a summary.json; --best takes a sweep dir "
                           "(outputs/multirun/<time>); export a single run without --best"])
    try:
        key = compare.quality_metric(jobs, metric)
    except compare.CompareError as e:  # compare's message lists the metrics the jobs report
        raise ExportError([f"--best {e}"]) from None
    done = [j for j in compare.ranked(jobs, key) if j["summary"].get("summary/status") == "finished"
            and isinstance(j["summary"].get(key), (int, float)) and math.isfinite(j["summary"][key])]
    if not done:
        raise ExportError([f"--best {metric}: no finished job of {sweep_dir} reports it; finish the sweep "
                           "(sweep.resume=true) or export one job's dir"])
    return sweep_dir / done[0]["name"], key, float(done[0]["summary"][key])


def read_run(run_dir: Path) -> RunRecord:
    """The run in `run_dir`, with its adapter checked (files, header, config); raises ExportError listing every
    problem."""
    if not run_dir.is_dir():
        raise ExportError([f"{run_dir} does not exist; give a run dir (outputs/runs/<time>_<name>)"])
    if not (run_dir / "run_info.json").is_file() and any(p.is_dir() and (p / "run_info.json").is_file()
                                                         for p in run_dir.iterdir()):
        raise ExportError([f"{run_dir} is a sweep dir (its jobs are runs); pick one with --best <metric> "
                           "(e.g. --best eval_exact_match), or give one job's dir"])
    problems: list[str] = []
    info, cfg, adapter_config = {}, None, {}
    try:
        info = json.loads((run_dir / "run_info.json").read_text())
        merged = typed(info["config"])  # the run schema with its quantization backend's and sinks' schemas
        cfg = OmegaConf.to_object(merged)
    except FileNotFoundError:
        problems.append(f"{run_dir} has no run_info.json, so the base model and the eval rows it used are unknown; "
                        "give the dir of a run made by `python train.py` (it writes run_info.json at the start)")
    except (ValueError, KeyError) as e:
        problems.append(f"{run_dir}/run_info.json is unreadable ({type(e).__name__}: {e}); restore it from a copy")
    except OmegaConfBaseException as e:
        commit = info.get("git_commit")
        problems.append(f"{run_dir}/run_info.json records a config this qlora-lab cannot read ({e}); export with "
                        f"the version the run was trained with" + (f" (git checkout {commit[:12]})" if commit else ""))
    adapter = run_dir / ADAPTER
    if not adapter.is_dir():
        problems.append(f"{run_dir} has no {ADAPTER}/ (the run did not finish, or it was interrupted before saving); "
                        f"finish it with `python train.py ... resume=auto hydra.run.dir={run_dir}`")
    else:
        problems += _adapter_file_problems(adapter)
        if (adapter / "adapter_config.json").is_file():
            try:
                adapter_config = json.loads((adapter / "adapter_config.json").read_text())
            except ValueError:
                pass  # reported by _adapter_file_problems
    if cfg is not None and cfg.lora.init in BASE_CHANGING_INITS:
        problems.append(f"the run used lora.init={cfg.lora.init}, which rewrites the base weights when the adapter "
                        "is made, so its adapter is not a delta on the base it loaded; merging it is not supported "
                        "here (train with lora.init=default or gaussian)")
    try:
        summary = read_summary(run_dir) or {}
    except BadFile as e:
        problems.append(str(e))
    if problems:
        raise ExportError(problems)
    return RunRecord(run_dir, info, cfg, summary, adapter_config)


def _adapter_file_problems(adapter: Path) -> list[str]:
    fix = "the run's adapter is damaged: copy it again, or retrain (`python train.py ... overwrite=true`)"
    problems = []
    config = adapter / "adapter_config.json"
    if not config.is_file():
        problems.append(f"{config} is missing; {fix}")
    else:
        try:
            data = json.loads(config.read_text())
            missing = [k for k in ("r", "lora_alpha", "target_modules", "peft_type") if k not in data]
            if missing or data.get("peft_type") != "LORA":
                problems.append(f"{config} is not a LoRA adapter config (missing {missing or 'peft_type LORA'}); "
                                + fix)
        except ValueError:
            problems.append(f"{config} is not valid JSON; {fix}")
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        problems.append(f"{weights} is missing; {fix}")
    else:
        why = safetensors_problem(weights)
        if why:
            problems.append(f"{weights} {why}; {fix}")
    return problems


def adapter_shapes(adapter: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors header alone (no tensor is read)."""
    with open(adapter / ADAPTER_WEIGHTS, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def shape_problems(rec: RunRecord, base_config) -> list[str]:
    """Each LoRA tensor must fit the module it adapts in the base's architecture: lora_A (r, in), lora_B (out, r).
    The base is instantiated on the meta device (shapes only, nothing allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _without_quantization(base_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ranks = rec.adapter_config.get("rank_pattern") or {}
    problems = []
    for name, shape in adapter_shapes(rec.adapter_dir).items():
        module_name, part = _split(name)
        if part is None:
            continue  # a DoRA magnitude or another extra tensor: PEFT checks it when it loads
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            problems.append(f"adapter tensor {name} adapts `{module_name}`, which this base has no module named; "
                            "the adapter was trained on another architecture: give its base with --base PATH")
            continue
        r = next((v for k, v in ranks.items() if module_name.endswith(k)), rec.adapter_config["r"])
        want = [r, module.in_features] if part == "lora_A" else [module.out_features, r]
        if list(shape) != want:
            problems.append(f"adapter tensor {name} has shape {list(shape)}, but `{module_name}` "
                            f"({module.in_features} -> {module.out_features}, r={r}) needs {want}; the adapter does "
                            "not belong to this base (or is damaged): give its base with --base PATH, or retrain")
        if len(problems) >= 5:
            problems.append("... (further tensors not checked)")
            break
    return problems


def _split(name: str) -> tuple[str, str | None]:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> (`model.layers.0.self_attn.q_proj`,
    `lora_A`)."""
    bare = name.removeprefix("base_model.model.")
    for part in ("lora_A", "lora_B"):
        if f".{part}." in bare:
            return bare.split(f".{part}.")[0], part
    return bare, None


def _without_quantization(config):
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def prequantized(config) -> bool:
    """The checkpoint stores quantized weights (e.g. a *-bnb-4bit repo): what loads from it is already rounded."""
    return getattr(config, "quantization_config", None) is not None


def checkpoint_problems(path: Path, flag: str) -> list[str]:
    """A local checkpoint dir to merge into: config.json and whole safetensors weights."""
    if not path.exists():
        return [f"{flag}={path} does not exist; give the directory of the original 16-bit checkpoint "
                "(config.json and *.safetensors)"]
    if not path.is_dir():
        return [f"{flag}={path} is a file; give the checkpoint directory that holds config.json and the weights"]
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return [f"{flag}={path} is a LoRA adapter, not a model; give the base model's checkpoint dir"]
    problems = []
    if not (path / "config.json").is_file():
        problems.append(f"{flag}={path} has no config.json; give a saved checkpoint directory")
    index = next((path / i for i in WEIGHT_INDEXES if (path / i).is_file()), None)
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index else \
            [p.name for p in sorted(path.glob("*.safetensors"))]
    except (ValueError, KeyError):
        return problems + [f"{flag}={path}: its {index.name} is unreadable; copy the checkpoint again"]
    if not files:
        problems.append(f"{flag}={path} has no *.safetensors weights; give the original checkpoint dir")
    for name in files:
        why = "is missing" if not (path / name).is_file() else safetensors_problem(path / name)
        if why:
            problems.append(f"{flag}={path}: {name} {why}; copy the checkpoint again")
    return problems


def choose_base(rec: RunRecord, base_arg: str | None, merge_into: str) -> tuple[Base, Any]:
    """The base to merge into and its transformers config (read from config.json or the recorded model config; no
    weights), with every problem raised at once. `merge_into` is `original` or `dequantized`."""
    from transformers import AutoConfig

    from_run = base_arg is None
    path = rec.info.get("model_path") if from_run else str(Path(base_arg).expanduser())
    m = rec.cfg.model
    if from_run and not Path(path).exists() and (m.build or m.gguf):
        if m.build and rec.cfg.device == "cuda" and not _cuda():  # a CUDA build draws other random weights
            raise ExportError([f"the run's random-init base {path} is gone and was built on CUDA; export on a CUDA "
                               "machine (it is re-made there as the run made it), or restore the cache dir"])
        why = "re-made into the cache as the run made it (model.build / model.gguf)"
    elif from_run and not Path(path).exists() and (path.startswith(("/", ".", "~")) or path.count("/") != 1):
        raise ExportError([f"the run's base {path} no longer exists; give the original 16-bit checkpoint with "
                           "--base PATH"])
    else:
        why = "the run's base" if from_run else "--base"
    if not from_run:
        problems = checkpoint_problems(Path(path), "--base")
        if problems:
            raise ExportError(problems)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code) if Path(path).exists() \
            or not (m.build or m.gguf) else _recorded_config(rec)
    except (OSError, ValueError) as e:
        raise ExportError([f"the config of the base {path} cannot be read ({e}); give the original 16-bit "
                           "checkpoint with --base PATH"]) from None
    problems = shape_problems(rec, config)
    if problems:
        raise ExportError(problems)
    pre = prequantized(config)
    if pre:
        kind, why = True, f"{why}: the checkpoint stores quantized weights, so no 16-bit original is in it"
    elif from_run and rec.quantized and merge_into == "dequantized":
        kind, why = True, f"{why}, dequantized as the run quantized it (--merge-into dequantized)"
    else:
        kind = False
        if from_run and rec.quantized:
            why = f"{why}, reloaded unquantized from its 16-bit source"
    return Base(path, kind, why, pre), config


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _recorded_config(rec: RunRecord):
    return model_config(rec.cfg.model)


def target_problems(target: Path, rec: RunRecord, overwrite: bool) -> list[str]:
    """The export must not land on the run's own files, nor replace an earlier export unasked."""
    run_dir = rec.run_dir.resolve()
    t = target.resolve()
    if t == run_dir or any(t == run_dir / f or t.is_relative_to(run_dir / f) for f in RUN_FILES):
        return [f"--out {target} is the run dir or one of its own files ({', '.join(RUN_FILES)}); choose another "
                f"dir, e.g. the default {run_dir / EXPORT_DIR}/merged"]
    if target.exists() and not overwrite:
        return [f"{target} exists (an earlier export?); check it with --check-only, replace it with --overwrite, or "
                "give another --out"]
    return []
