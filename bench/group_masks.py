"""A fused group's LoRA dropout masks: one per (layer, dropout p) for the whole group, or one per job.

The jobs of a sweep share the seed, so every job with the same `lora.dropout` draws the same counter-based mask at the
same layer and micro-batch (model/dropout.py); the grouped forward (model/grouped.py) hashes it once and every such job
applies it. This script measures what that saves on one decoder layer stack of a fused group of 8 jobs (the 8-job
sweep of bench/sweep_speed.py: lora.r=8,16 x four learning rates, dropout 0.05): bytes saved for backward, the
step's time, and with --compile the first step (the compile of the grouped layer) and the steady one. Each variant
runs in a fresh process; `per_job` is the forward before masks were shared (each job hashes its own).

    python bench/group_masks.py                      # CPU: 2 layers of the Qwen2.5-0.5B shape, 8 x 256 tokens
    python bench/group_masks.py --device cuda --layers 24 --tokens 8192 --compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CACHE, bench_spec  # noqa: E402

JOBS = [[f"lora.r={r}", f"optim.lr={lr}"] for r in (8, 16) for lr in ("1e-4", "2e-4", "4e-4", "8e-4")]


def worker(variant: str, args) -> dict:
    import torch

    from qlora_lab.model import build_group, model_source

    torch.manual_seed(0)
    common = [f"model.build.num_hidden_layers={args.layers}", "lora.dropout=0.05", "checkpointing=none",
              f"model.compile={'layers' if args.compile else 'none'}", "data.packing=false",
              f"quantization={args.quantization}"]
    specs = [bench_spec("qwen05b", common + job, args.tokens, args.cache_dir, args.device) for job in JOBS]
    names = [f"job{i}" for i in range(len(JOBS))]
    group = build_group(specs, names, model_source(specs[0]))
    model, routing = group.built.model, group.routing
    if variant == "per_job":  # the forward as it was: every job hashes (and keeps) its own mask
        for module in model.modules():
            if hasattr(module, "_mask_share"):
                module._mask_share = {name: i for i, name in enumerate(module._mask_share)}
    routing.jobs[:] = names
    model.train()
    decoder = model.get_base_model().get_decoder()
    ids = torch.randint(0, 1000, (len(JOBS), args.tokens), device=args.device)  # one row per job: its copy

    saved: dict[int, int] = {}

    def pack(t):  # each storage once: a mask or weight kept by several ops is held once
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    def step(count: bool = False):
        group.built.micro.set(0)
        if count:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                hidden = decoder(input_ids=ids).last_hidden_state
        else:
            hidden = decoder(input_ids=ids).last_hidden_state
        hidden.float().pow(2).mean().backward()
        if args.device == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step(count=not args.compile)  # the hooks would break the compiled graph: count saved bytes eagerly only
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "first_step_s": first, "step_s": statistics.median(times),
            "saved_gib": sum(saved.values()) / 2**30 if saved else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256, help="tokens of each job's copy of the micro-batch")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="model.compile=layers: time the compile and the steady step")
    p.add_argument("--quantization", default="nf4")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    rows = []
    for variant in ("per_job", "shared"):
        cmd = [sys.executable, __file__, "--worker", variant, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"8 jobs (lora.r=8,16 x 4 lr, dropout 0.05), Qwen2.5-0.5B shape, {args.layers} layers, "
          f"{args.tokens} tokens a job, {args.quantization}, {args.device}, compile={args.compile}\n")
    print("| masks | first step s | step s | saved for backward GiB |")
    print("|---|---|---|---|")
    for r in rows:
        gib = "-" if r["saved_gib"] is None else f"{r['saved_gib']:.3f}"
        print(f"| {r['variant']} | {r['first_step_s']:.2f} | {r['step_s']:.3f} | {gib} |")


if __name__ == "__main__":
    main()
