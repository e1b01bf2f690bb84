"""Caps a process's GPU memory for bench/frontier.py: on a PYTHONPATH with QLAB_CAP_GIB set, every Python process
(train.py, the Unsloth peers) starts with torch's caching allocator limited to that many GiB
(`torch.cuda.set_per_process_memory_fraction`), so one large card stands in for a smaller one. The CUDA context
(~0.5 GiB) is outside the cap, as it is outside a smaller card's allocator too."""

import os

if os.environ.get("QLAB_CAP_GIB"):
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(os.environ["QLAB_CAP_GIB"]) * 2**30 / total))
