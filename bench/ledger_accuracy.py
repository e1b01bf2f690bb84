"""Predicted vs measured peak memory of the memory ledger, on the GPU machine, one fresh process per config.

  python bench/ledger_accuracy.py            # prints the table; target: every prediction within +-10%

Each config runs 3 optimizer steps of `bench/speed.py --worker` (random-init weights of the real shape, seq 2048,
LoRA r16 on every linear layer) and reports torch.cuda.max_memory_allocated over the run against the ledger's
predicted allocated peak, computed from the config alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (shape, micro-batch, overrides): nf4 vs none, checkpointing none / non_reentrant / offload, batch 1 and 4
CONFIGS = [
    ("phi4mini", 1, ["checkpointing=none"]),
    ("phi4mini", 1, []),
    ("phi4mini", 4, []),
    ("phi4mini", 4, ["checkpointing=offload"]),
    ("phi4mini", 1, ["quantization=none"]),
    ("phi4mini", 4, ["model.kernels=liger", "lora.adapter_dtype=bfloat16"]),
    ("llama8b", 1, ["checkpointing=none"]),
    ("llama8b", 4, []),
    ("llama8b", 4, ["checkpointing=offload"]),
    ("llama8b", 1, ["quantization=none"]),
    ("llama8b", 4, ["model.kernels=liger", "lora.adapter_dtype=bfloat16", "checkpointing=offload"]),
]


def main() -> None:
    only = sys.argv[1:]  # optional shape filter
    rows = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for shape, bs, ov in CONFIGS:
        if only and shape not in only:
            continue
        t = time.time()
        res = subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), "--worker", shape, str(bs), "2048", *ov,
                              "--steps", "3"],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)
        lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
        row = json.loads(lines[-1]) if lines and res.returncode == 0 else {"error": res.stderr.strip()[-300:]}
        row.update(shape=shape, bs=bs, overrides=" ".join(ov) or "(nf4, non_reentrant)", wall_s=round(time.time() - t))
        rows.append(row)
        print(json.dumps(row), flush=True)
    import torch

    print(f"\n## Memory ledger: predicted vs measured peak allocated, seq 2048 ({torch.cuda.get_device_name(0)})\n")
    print("| shape | batch | config | predicted GiB | measured GiB | error | within 10% | peak at |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['bs']} | {r['overrides']} | error: {r['error'][-120:]} | | | | |")
            continue
        err = (r["pred_gib"] - r["peak_gib"]) / r["peak_gib"] * 100
        print(f"| {r['shape']} | {r['bs']} | {r['overrides']} | {r['pred_gib']:.2f} | {r['peak_gib']:.2f} | "
              f"{err:+.1f}% | {'yes' if abs(err) <= 10 else 'NO'} | {r['pred_where']} |")


if __name__ == "__main__":
    main()
