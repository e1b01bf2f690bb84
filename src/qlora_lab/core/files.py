"""Reading back a file this process did not just write (a checkpoint, a run's records, a lock, a model's config):
a bad one is refused in one line that names it and the fix (`BadFile`), never with a parser's traceback, and never
by advising a less safe way to load it.

Tensors load with `torch.load(weights_only=True)`, which unpickles tensors, numbers, strings and containers only; a
file holding anything else (a pickled object, which loading could make run code) is refused unread. The message
says so, and not, as torch's does, that `weights_only=False` would load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_lab.core.errors import BadFile


def read_json(path: Path, fix: str) -> Any:
    """The JSON in `path`; BadFile naming `path` and `fix` if it is not JSON (cut short, another format, a
    duplicated key is taken as JSON allows: the last one)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise BadFile(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); {fix}") from None
    except json.JSONDecodeError as e:
        raise BadFile(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {fix}") from None


def load_tensors(path: Path, fix: str, map_location: str = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`; BadFile naming `path` and `fix` for anything that is not a plain
    tensor file: a pickled object (refused unread, never run), a truncated or foreign file."""
    import pickle

    import torch  # lazy: the records' readers need no torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        raise BadFile(f"{path} could not be read ({e.strerror or e}); {fix}") from None
    except pickle.UnpicklingError:  # torch's refusal, whose text advises weights_only=False
        raise BadFile(f"{path} is not a plain tensor file: it holds something other than tensors, numbers and "
                      f"containers (Python objects, or another format), refused unread (loading objects could run "
                      f"code); {fix}") from None
    except Exception as e:  # cut short, empty, another format: whatever the reader tripped on
        raise BadFile(f"{path} is not a readable tensor file ({type(e).__name__}: "
                      f"{(str(e).splitlines() or [''])[0][:160]}); {fix}") from None
