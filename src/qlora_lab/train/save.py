"""Stage 7 (save): the adapter in PEFT format with its tokenizer; `PeftModel.from_pretrained(base, run_dir /
"adapter")` loads it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qlora_lab.core.dist import Dist
from qlora_lab.core.errors import CheckpointError
from qlora_lab.train.checkpoint import valid_checkpoints
from qlora_lab.train.gathered import adapter_state


def save_adapter(model, tokenizer, out_dir: Path, dist: Dist = Dist()) -> Path:
    """`PeftModel.from_pretrained(base, out_dir / "adapter")` loads what this writes.

    Written next to its final place and renamed into it, so a failed write (a full disk) leaves any earlier
    adapter whole and no half-written one. Every process calls it (FSDP gathers the shards); rank 0 writes.
    """
    target, tmp, old = out_dir / "adapter", out_dir / ".adapter.tmp", out_dir / ".adapter.old"
    tensors = adapter_state(model, dist) if dist.fsdp else None  # gathered whole: shards cannot be saved as such
    if not dist.main:
        return target
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=tensors)
        tokenizer.save_pretrained(tmp)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = valid_checkpoints(out_dir)
        raise CheckpointError(f"writing the adapter to {target} failed ({type(e).__name__}: {e}); free space and "
                              + (f"rerun with resume=auto (checkpoint {kept[-1].name} is whole)" if kept else
                                 "rerun")) from e
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target
