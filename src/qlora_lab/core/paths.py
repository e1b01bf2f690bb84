"""Files the package ships, and how the cache writes a whole checkpoint directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

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
