"""Resumable checkpoints: write them atomically, find the latest whole one, check it fits the run, restore it.

A checkpoint is a directory `<run dir>/checkpoints/step_<N>/` holding everything the loop needs to continue as
if it had never stopped:

    adapter.pt          the trainable (LoRA) tensors by parameter name, whole (gathered from every process)
    optimizer.pt        optimizer.state_dict() keyed by parameter name, whole
    scheduler.pt        scheduler.state_dict()
    rng.pt              python, numpy, torch CPU and CUDA generator states
    trainer_state.json  step, data position (epoch, offset, that epoch's sample order), loss history, W&B run id
    config.json         the resolved config, dataset fingerprint and number of processes it was trained with
    manifest.json       sha256 and size of each file above; written last

It is written under a temporary name, every file fsynced, then renamed into place and the parent fsynced: a
crash mid-write leaves a `.tmp-*` directory that is never taken for a checkpoint (and that the next start of the
run removes: runner/rundir.py `clean_leftovers`). Loading verifies every checksum. All tensors load with
`weights_only=True` (core/files.py): a file holding anything but tensors, numbers and containers is refused unread,
in one line, and a resume reads every file of its checkpoint (`readable`) before it touches the run's records.
"""

from __future__ import annotations

import logging
import errno
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_lab.configs import key_table
from qlora_lab.core.dist import Dist
from qlora_lab.core.effects import declared
from qlora_lab.core.errors import CheckpointError
from qlora_lab.core.files import load_tensors, read_json
from qlora_lab.core.flat import flatten
from qlora_lab.core.scrub import scrub
from qlora_lab.train import gathered

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
PREFIX = "step_"
FILES = ("adapter.pt", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "config.json")

# Which config differences a resume refuses, allows (printed and recorded in run_info.json) or ignores is declared
# once per key, next to it (core/effects.py: a changed model, quantization, LoRA shape, data or seed is refused;
# lr, steps, kernels, logging are allowed; paths and names are ignored). Each optimizer step trains on
# micro_batch_size x grad_accum_steps x processes consecutive rows of the sample order: that product must stay, its
# factors may change (e.g. 2 GPUs x 4 rows -> 1 GPU x 8 rows).
# How a failed write is named in messages (errno -> words).
WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        if path.suffix == ".json":
            f.write(json.dumps(obj, indent=1).encode())
        else:
            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def step_of(ckpt: Path) -> int:
    return int(ckpt.name[len(PREFIX):])


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=True)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuples(x: Any) -> Any:
    """random.setstate wants nested tuples; torch.load gives back what was saved, but be strict."""
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclass
class Checkpointer:
    """Writes `step_<N>` checkpoints into `<run_dir>/checkpoints`, keeping the last `keep_last`."""

    run_dir: Path
    keep_last: int
    config: dict[str, Any]
    fingerprint: str
    dist: Dist = Dist()

    @property
    def root(self) -> Path:
        return self.run_dir / CKPT_DIR

    def save(self, step: int, model, optimizer, scheduler, trainer_state: dict[str, Any]) -> Path:
        """Write the checkpoint of the state after `step`; raises CheckpointError (earlier ones intact) on failure.

        Every process calls it (gathering FSDP shards is a collective); rank 0 writes and tells the others how
        it went, so all of them raise or none.
        """
        tensors = gathered.adapter_state(model, self.dist)
        optim = gathered.optimizer_state(model, optimizer, self.dist)
        error = None
        if self.dist.main:
            try:
                self._write(step, tensors, optim, scheduler, trainer_state)
            except CheckpointError as e:
                error = e
        message = self.dist.broadcast(str(error) if error else None)
        if error is not None:
            raise error
        if message is not None:
            raise CheckpointError(message)
        return self.root / f"{PREFIX}{step:07d}"

    def _write(self, step: int, tensors: dict[str, torch.Tensor], optim: dict[str, Any], scheduler,
               trainer_state: dict[str, Any]) -> Path:
        final = self.root / f"{PREFIX}{step:07d}"
        tmp = self.root / f".tmp-{PREFIX}{step:07d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:  # from the first mkdir on: a run dir that became read-only fails here, with the message below
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            payload = {
                "adapter.pt": tensors,
                "optimizer.pt": optim,
                "scheduler.pt": scheduler.state_dict(),
                "rng.pt": rng_state(),
                "trainer_state.json": {"step": step, **trainer_state},
                # scrubbed as every record is (core/scrub.py); a resume compares it with the scrubbed config
                "config.json": {"config": scrub(self.config), "dataset_fingerprint": self.fingerprint,
                                "world_size": self.dist.world},
            }
            for name in FILES:
                _write(tmp / name, payload[name])
            manifest = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in FILES}
            _write(tmp / "manifest.json", manifest)
            _fsync_dir(tmp)
            if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            kept = [p.name for p in valid_checkpoints(self.run_dir)]
            cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__
            code = cause.errno if isinstance(cause, OSError) else None
            why = WRITE_ERRORS.get(code, f"{type(e).__name__}: {e}")
            raise CheckpointError(
                f"writing the checkpoint of step {step} to {self.root} failed ({why}); nothing partial was left. "
                f"Free space or make the run dir writable again (or point save.every_steps/output_dir elsewhere) "
                f"and resume=auto from "
                f"{kept[-1] if kept else 'the start (no earlier checkpoint)'}") from e
        # Keep this one and the keep_last-1 before it. Only renamed (hence complete) dirs carry a step_ name, so
        # pruning needs no re-hashing of every kept checkpoint at each save; later steps (from an earlier attempt
        # of this run) are left alone.
        earlier = [p for p in all_checkpoints(self.run_dir) if step_of(p) < step]
        for old in earlier[:len(earlier) - (self.keep_last - 1)]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def verify(ckpt: Path) -> str | None:
    """None if `ckpt` is a whole, uncorrupted checkpoint, else what is wrong with it."""
    manifest_path = ckpt / "manifest.json"
    if not manifest_path.is_file():
        return "has no manifest.json (its write never finished)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "has an unreadable manifest.json"
    for name in FILES:
        path = ckpt / name
        if name not in manifest:
            return f"lists no {name} in its manifest"
        if not path.is_file():
            return f"lacks {name}"
        if path.stat().st_size != manifest[name]["bytes"]:
            return f"has a truncated {name} ({path.stat().st_size} of {manifest[name]['bytes']} bytes)"
        if _sha256(path) != manifest[name]["sha256"]:
            return f"has a corrupted {name} (checksum mismatch)"
    return None


def all_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def valid_checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in all_checkpoints(run_dir) if verify(p) is None]


def find(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint `resume` (auto | a run dir | a checkpoint dir) points at; None for auto with none there.

    auto passes over damaged checkpoints (newest first) with a warning; an explicit path to a damaged one is an
    error that lists the whole ones to use instead.
    """
    if resume == "auto":
        for ckpt in reversed(all_checkpoints(run_dir)):
            why = verify(ckpt)
            if why is None:
                return ckpt
            log.warning(f"skipping checkpoint {ckpt} that {why}")
        return None
    path = Path(resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"resume={resume}: no such file or directory; give a run dir, one of its "
                              f"checkpoints/{PREFIX}* dirs, or resume=auto")
    if not path.is_dir():  # e.g. the adapter's .safetensors file: a checkpoint is a directory of several files
        raise CheckpointError(f"resume={resume} is a file; give a run dir or one of its checkpoints/{PREFIX}* dirs")
    if path.name.startswith(PREFIX) and path.parent.name == CKPT_DIR:
        why = verify(path)
        if why:
            others = [p.name for p in valid_checkpoints(path.parent.parent)]
            raise CheckpointError(f"resume={resume}: the checkpoint {why}; whole checkpoints in that run: "
                                  f"{others or 'none'} (or resume=auto picks the latest whole one)")
        return path
    ckpts = valid_checkpoints(path)
    if not ckpts:
        damaged = [f"{p.name} {verify(p)}" for p in all_checkpoints(path)]
        raise CheckpointError(f"resume={resume}: no whole checkpoint in {path / CKPT_DIR}"
                              + (f" ({'; '.join(damaged)})" if damaged else "")
                              + "; start without resume, or give a run dir that saved some (save.every_steps>0)")
    return ckpts[-1]


def run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent


def differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, allowed): `key: saved -> current` lines for the keys that differ, each judged by what it is declared
    to affect (a key neither config's schema knows is refused: nothing says it is harmless)."""
    a, b = flatten(saved), flatten(current)
    table = {**key_table(saved), **key_table(current)}
    refused, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        d = declared(table, key)
        rule = d.resume if d is not None else "refuse"
        if rule == "ignore":
            continue
        line = f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}"
        (refused if rule == "refuse" else allowed).append(line)
    return refused, allowed


def global_batch(config: dict[str, Any], world_size: int) -> tuple[int, str]:
    mb, accum = config["data"]["micro_batch_size"], config["optim"]["grad_accum_steps"]
    return mb * accum * world_size, f"{mb} x {accum} x {world_size}"


def check_compatible(ckpt: Path, config: dict[str, Any], fingerprint: str | None, world_size: int = 1) -> list[str]:
    """Raise CheckpointError if `config` (on `world_size` processes) cannot continue `ckpt`; returns the allowed
    differences."""
    recorded = saved(ckpt, "config.json")
    refused, allowed = differences(recorded["config"], scrub(config))
    if fingerprint is not None and recorded["dataset_fingerprint"] != fingerprint:
        refused.append(f"dataset content: fingerprint {recorded['dataset_fingerprint']} -> {fingerprint}")
    (old, old_s) = global_batch(recorded["config"], recorded.get("world_size", 1))
    (new, new_s) = global_batch(config, world_size)
    if old != new:
        accum, world = config["optim"]["grad_accum_steps"], world_size
        hint = (f"e.g. data.micro_batch_size={old // (accum * world)}" if old % (accum * world) == 0
                else "change data.micro_batch_size or optim.grad_accum_steps")
        refused.append(f"rows per optimizer step (data.micro_batch_size x optim.grad_accum_steps x processes): "
                       f"{old_s} = {old} -> {new_s} = {new}; keep {old} rows ({hint})")
    elif recorded.get("world_size", 1) != world_size:
        allowed.append(f"processes: {recorded.get('world_size', 1)} -> {world_size} (rows per step stay {new})")
    if refused:
        lines = "\n".join(f"  - {r}" for r in refused)
        raise CheckpointError(f"resume: {ckpt} was trained with a different setup; these must match to continue it:"
                              f"\n{lines}\nrerun with the checkpoint's values (see {ckpt / 'config.json'}), or start "
                              "a new run without resume")
    return allowed


def _fix(ckpt: Path) -> str:
    others = [p.name for p in valid_checkpoints(run_dir_of(ckpt)) if p != ckpt]
    return (f"the checkpoint {ckpt.name} was not written whole by qlora-lab (or was changed after it): resume from "
            + (f"another one ({', '.join(others)}: resume={run_dir_of(ckpt) / CKPT_DIR}/<step dir>)" if others else
               "another run's checkpoint")
            + ", or start again in another dir (hydra.run.dir=<new dir>) or with overwrite=true")


def saved(ckpt: Path, name: str) -> dict[str, Any]:
    """One of the checkpoint's JSON files (config.json, trainer_state.json); BadFile naming it if it is not JSON."""
    return read_json(ckpt / name, _fix(ckpt))


def readable(ckpt: Path) -> None:
    """Read every file of `ckpt` as `load` will (tensors with weights_only=True, JSON), so that a bad one is refused
    before a resume touches anything of its run; BadFile naming the file otherwise."""
    for name in FILES:
        if name.endswith(".json"):
            read_json(ckpt / name, _fix(ckpt))
        else:
            load_tensors(ckpt / name, _fix(ckpt))


def load(ckpt: Path, model, optimizer, scheduler, dist: Dist = Dist()) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler and RNG from `ckpt` (on every process); returns its trainer state."""
    why = verify(ckpt)
    if why:
        raise CheckpointError(f"checkpoint {ckpt} {why}; use an earlier one or resume=auto")
    fix = _fix(ckpt)
    tensors = load_tensors(ckpt / "adapter.pt", fix)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    shapes = [f"{n} {tuple(tensors[n].shape)} vs {tuple(p.shape)}" for n, p in params.items()
              if n in tensors and tensors[n].shape != p.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"checkpoint {ckpt} holds an adapter for another model or LoRA shape: "
                              f"{len(missing)} parameters missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                              f"(e.g. {unexpected[:2]}), shape mismatches {shapes[:2]}; resume from a checkpoint "
                              "of this config or start fresh")
    gathered.load_adapter_state(model, tensors, dist)
    optim = load_tensors(ckpt / "optimizer.pt", fix)
    gathered.load_optimizer_state(model, optimizer, optim, dist)
    scheduler.load_state_dict(load_tensors(ckpt / "scheduler.pt", fix))
    rng = load_tensors(ckpt / "rng.pt", fix)
    rng["python"] = _to_tuples(rng["python"])
    set_rng_state(rng)
    return read_json(ckpt / "trainer_state.json", fix)
