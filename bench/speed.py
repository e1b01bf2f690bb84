"""Training-step speed and peak memory of qlora-lab against the peers, one fresh process per run.

  python bench/speed.py                         # the table: peers + qlora-lab variants, phi4mini & llama8b, bs 4
  python bench/speed.py --shapes phi4mini --batches 1 4 --variants default liger
  python bench/speed.py --worker phi4mini 4 2048 [hydra overrides...] [--steps N] [--profile N] [--cache DIR]
                                                # one qlora-lab run, prints one JSON line

Timing is the peers' (their scripts copied into .peers/): random-init weights of the real shape, random token
ids, seq 2048, LoRA r16 alpha 32 on every linear layer, dropout 0, 6 optimizer steps, median step time of the
last 4, peak allocated CUDA memory over the whole run (load included). Run it on the GPU machine; compare ratios
within one call, since absolute figures drift between machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import DEFAULT_CACHE, ROOT, SHAPE_MODEL, bench_spec  # bench/ is on sys.path when this script runs

PEERS = ROOT / ".peers"
# qlora-lab variants: name -> overrides on top of the shape and the peers' LoRA settings.
VARIANTS = {
    "default": [],
    "liger": ["model.kernels=liger"],
    "liger_bf16": ["model.kernels=liger", "lora.adapter_dtype=bfloat16"],
    "liger_bf16_offload": ["model.kernels=liger", "lora.adapter_dtype=bfloat16", "checkpointing=offload"],
    "fused": ["model.kernels=liger", "lora.adapter_dtype=bfloat16", "lora.kernel=fused"],
    "fused_offload": ["model.kernels=liger", "lora.adapter_dtype=bfloat16", "lora.kernel=fused", "checkpointing=offload"],
    "compiled": ["model.kernels=liger", "lora.adapter_dtype=bfloat16", "lora.kernel=fused", "model.compile=layers"],
    "compiled_offload_fp32": ["model.kernels=liger", "lora.adapter_dtype=float32", "lora.kernel=fused",
                              "model.compile=layers", "checkpointing=offload"],
    "compiled_offload": ["model.kernels=liger", "lora.adapter_dtype=bfloat16", "lora.kernel=fused",
                         "model.compile=layers", "checkpointing=offload"],
}
COMMON = ["lora.dropout=0", "checkpointing=non_reentrant", "quantization=nf4"]


def worker(shape: str, bs: int, seq: int, overrides: list[str], steps: int = 6, profile_steps: int = 0,
           cache_dir: str = DEFAULT_CACHE) -> dict:
    """`steps` training steps of one qlora-lab variant through the project's own model build and step."""
    import torch

    from qlora_lab.data.batching import Collator
    from qlora_lab.data.tokenize import Example
    from qlora_lab.memory.ledger import predict
    from qlora_lab.model import build_model
    from qlora_lab.train.optim import build_optimizer
    from qlora_lab.train.step import forward_backward

    spec = bench_spec(shape, [*COMMON, *overrides, f"data.micro_batch_size={bs}"], seq, cache_dir)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    loaded = {}
    built = build_model(spec, on_phase=lambda p: loaded.setdefault(p, torch.cuda.memory_allocated() / 2**30))
    model = built.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, spec.cfg.optim, "cuda")
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, model.config.vocab_size, (bs, seq), generator=g).tolist()
    batch = [Example(input_ids=r, labels=r, row=i) for i, r in enumerate(rows)]  # fixed rows: every token a label
    collator = Collator(pad_id=0)

    def step() -> float:
        result = forward_backward(built.engine, params, [batch], collator, "cuda")
        opt.step()
        opt.zero_grad(set_to_none=True)
        return result.loss

    predicted = predict(spec.cfg, bs)
    times, losses = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(step())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if profile_steps:
        profile(step, profile_steps)
    med = sorted(times[2:])[len(times[2:]) // 2]
    return dict(tok_s=round(bs * seq / med), step_s=round(med, 3), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                load_gib=round(loaded["load"], 2), loss0=round(losses[0], 4), trainable=built.trainable,
                pred_gib=round(predicted.peak_gib, 2), pred_where=predicted.peak_where)


# Kernel name fragments -> what they are, for the profile summary.
KINDS = [("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")),
         ("dequantize 4-bit", ("kDequantize", "dequantize")),
         ("attention", ("flash", "fmha", "attention", "efficient")),
         ("liger/triton", ("liger", "triton", "_rms", "swiglu", "rope", "cross_entropy")),
         ("optimizer", ("adam", "multi_tensor")),
         ("copies", ("memcpy", "Memcpy", "copy_", "CatArrayBatched")),
         ("elementwise/reduce", ("elementwise", "vectorized", "reduce", "unrolled"))]


def profile(step, n: int) -> None:
    """torch.profiler over `n` steps: CUDA time by kind of kernel and the top kernels, printed as tables."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / n / 1e6
    by_kind: dict[str, float] = {}
    for e in events:
        kind = next((k for k, frags in KINDS if any(f in e.key for f in frags)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_device_time_total / n / 1e6
    print(f"PROFILE step wall {wall:.3f} s (under the profiler), GPU busy {total:.3f} s ({total / wall:.0%})")
    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"PROFILE kind {k:<22} {v:7.3f} s {v / total:6.1%}")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"PROFILE top {e.self_device_time_total / n / 1e3:9.1f} ms x{e.count // n:<5} {e.key[:110]}")
    # Which framework ops launch the copies, with their input shapes: where layout changes and casts happen.
    ops = [e for e in prof.key_averages(group_by_input_shape=True)
           if e.key in ("aten::copy_", "aten::cat", "aten::contiguous", "aten::to", "aten::clone")]
    for e in sorted(ops, key=lambda e: -e.device_time_total)[:12]:
        print(f"PROFILE copy-op {e.device_time_total / n / 1e3:8.1f} ms x{e.count // n:<5} {e.key} {e.input_shapes}"[:170])


def _last_json(text: str) -> dict | None:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def _run(cmd: list[str], timeout: int, log: Path) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        out, err, rc = res.stdout, res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "", 124
    log.write_text(out + "\n---stderr---\n" + err)
    row = _last_json(out)
    if row is None or rc != 0:
        tail = " | ".join(err.strip().splitlines()[-3:])[-300:]
        return {"error": f"exit {rc}: {tail}"}
    return row


def driver(args) -> None:
    logs = Path(os.environ.get("OUT", "/tmp")) / "speed_logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes:
        for bs in args.batches:
            runs: list[tuple[str, list[str]]] = []
            for peer in args.peers:
                if peer == "unsloth":
                    runs.append(("unsloth", [sys.executable, str(PEERS / "unsloth_peer.py"), shape, str(bs), str(args.seq)]))
                else:
                    runs.append((peer, [sys.executable, str(PEERS / "seed_recipe.py"), shape, peer, str(bs), str(args.seq), "1"]))
            for v in args.variants:
                runs.append((f"qlora-lab:{v}", [sys.executable, __file__, "--worker", shape, str(bs), str(args.seq), *VARIANTS[v]]))
            for name, cmd in runs:
                t = time.time()
                row = _run(cmd, args.timeout, logs / f"{shape}_bs{bs}_{name.replace(':', '_')}.log")
                row.update(stack=name, shape=shape, bs=bs, wall_s=round(time.time() - t))
                rows.append(row)
                print(json.dumps(row), flush=True)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"\n## Training step, seq 2048, LoRA r16 all-linear, checkpointing on ({dev})\n")
    print("| shape | batch | stack | tok/s | peak GiB | step-0 loss | vs hf_qlora | vs liger_qlora | vs unsloth |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peers = {p["stack"]: p.get("tok_s") for p in rows if p["shape"] == r["shape"] and p["bs"] == r["bs"]}
        if "error" in r:
            print(f"| {r['shape']} | {r['bs']} | {r['stack']} | error: {r['error'][:80]} | | | | | |")
            continue
        ratio = lambda p: f"{r['tok_s'] / peers[p]:.2f}x" if peers.get(p) else "-"  # noqa: E731
        loss = r.get("loss0", r.get("loss", "-"))
        print(f"| {r['shape']} | {r['bs']} | {r['stack']} | {r['tok_s']:,} | {r['peak_gib']} | {loss} | "
              f"{ratio('hf_qlora')} | {ratio('liger_qlora')} | {ratio('unsloth')} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        wp = argparse.ArgumentParser(prog="speed.py --worker")
        wp.add_argument("shape")
        wp.add_argument("bs", type=int)
        wp.add_argument("seq", type=int)
        wp.add_argument("overrides", nargs="*")
        wp.add_argument("--steps", type=int, default=6)
        wp.add_argument("--profile", type=int, default=0, help="profile this many extra steps")
        wp.add_argument("--cache", default=DEFAULT_CACHE)
        w = wp.parse_args(sys.argv[2:])
        print(json.dumps(worker(w.shape, w.bs, w.seq, w.overrides, w.steps, w.profile, w.cache)), flush=True)
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["phi4mini", "llama8b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[4])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--peers", nargs="*", default=["hf_qlora", "liger_qlora", "unsloth"])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--timeout", type=int, default=300)
    driver(ap.parse_args())
