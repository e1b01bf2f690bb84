"""Files the package ships, and how the cache writes a whole checkpoint directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from qlora_lab.core import lock

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets"
TINY_DATA = ASSET_DIR / "tiny_tasks.jsonl"
SHIPPED_CONFIGS = ASSET_DIR / "configs"  # architecture configs of the hub presets: planning needs no download


@contextlib.contextmanager
def written_into_place(target: Path, whole: str = "config.json") -> Iterator[Path]:
    """A temporary directory beside `target` to write a checkpoint (or another cached directory) into, renamed to
    `target` when the block ends without error: concurrent sweep jobs never see half of one (if another process got
    there first, its copy stands: the file `whole` in it says it is complete). Whatever is left of the temporary
    directory is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:  # another job wrote it first: theirs is as good as ours
            if not (target / whole).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_whole(target: Path) -> bool:
    """Whether a cached model dir (a random-init build, a GGUF conversion) is one the cache wrote whole: its
    config.json and its safetensors weights, which is all it ever writes. Anything else there (weights only as a
    pickled *.bin, say) is not read: the entry is built again."""
    return (target / "config.json").is_file() and \
        any((target / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))


def rebuild(target: Path) -> None:
    """Take a cache entry that is not whole out of the way (under its `building` lock)."""
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)


@contextlib.contextmanager
def building(target: Path) -> Iterator[None]:
    """Hold the lock of the cache entry `target` while checking and building it (`.<name>.lock` beside it,
    core/lock.py): processes on this machine or on nodes sharing the cache build an entry once, the others wait
    and then find it whole; a rename alone would let them all build it and, on a shared file system, see one
    another's half. Under the lock, the temporary dirs a killed builder of this entry left beside it are removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with lock.hold(target.parent / f".{target.name}.lock", f"the cache entry {target}", wait=True):
        for tmp in target.parent.glob(f".{target.name}-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        yield
