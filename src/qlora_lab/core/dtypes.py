"""Config dtype names -> torch dtypes."""

from __future__ import annotations

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[str(name)]
