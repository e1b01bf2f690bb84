"""Training-step speed and peak memory of qlora-lab against the peers, one fresh process per run.

  python bench/speed.py                         # the table: peers + qlora-lab variants, phi4mini & llama8b, bs 4
  python bench/speed.py --shapes phi4mini --batches 1 4 --variants default liger
  python bench/speed.py --worker phi4mini 4 2048 [hydra overrides...]   # one qlora-lab run, prints one JSON line

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

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".peers"
SHAPE_MODEL = {"phi4mini": "phi4_mini_shape", "llama8b": "llama3_8b_shape"}
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
COMMON = ["lora.dropout=0", "logger=none", "device=cuda", "checkpointing=non_reentrant", "quantization=nf4"]


def worker(shape: str, bs: int, seq: int, overrides: list[str]) -> dict:
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from qlora_lab import adapt, load, prepare, quantize
    from qlora_lab.config import register_configs
    from qlora_lab.resolvers import register_resolvers
    from qlora_lab.train import build_optimizer, count_label_tokens, forward_loss

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"model={SHAPE_MODEL[shape]}", *COMMON, *overrides, f"model.max_seq_len={seq}", "output_dir=/tmp/qlab-bench", "run_name=bench",
            "sweep_id=null", f"cache_dir={os.environ.get('QLAB_BENCH_CACHE', '/tmp/qlab-cache')}"])
    cfg = OmegaConf.to_object(cfg)
    path = load.resolve_model_path(cfg.model, cfg.cache_dir, 0, "cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = load.load_model(path, cfg.model, quantize.build_bnb_config(cfg.quantization), "cuda")
    load_gib = torch.cuda.memory_allocated() / 2**30
    model = adapt.wrap_model(prepare.prepare_model(model, cfg.model, cfg.checkpointing, "cuda"),
                             cfg.lora, cfg.quantization)
    model = adapt.compile_layers(model, cfg.model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (bs, seq), device="cuda", generator=g)
    batch = {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}
    from qlora_lab.ledger import predict

    predicted = predict(cfg, bs)
    times, losses = [], []
    for _ in range(int(os.environ.get("QLAB_BENCH_STEPS", "6"))):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = forward_loss(model, batch, "cuda", count_label_tokens(batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    if os.environ.get("QLAB_PROFILE"):
        profile(lambda: _step(model, batch, opt), int(os.environ["QLAB_PROFILE"]))
    med = sorted(times[2:])[len(times[2:]) // 2]
    return dict(tok_s=round(bs * seq / med), step_s=round(med, 3), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                load_gib=round(load_gib, 2), loss0=round(losses[0], 4), trainable=sum(p.numel() for p in params),
                pred_gib=round(predicted.peak_gib, 2), pred_where=predicted.peak_where)


def _step(model, batch, opt) -> None:
    from qlora_lab.train import count_label_tokens, forward_loss

    loss = forward_loss(model, batch, "cuda", count_label_tokens(batch))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


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
        shape, bs, seq, *ov = sys.argv[2:]
        print(json.dumps(worker(shape, int(bs), int(seq), ov)), flush=True)
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["phi4mini", "llama8b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[4])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--peers", nargs="*", default=["hf_qlora", "liger_qlora", "unsloth"])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--timeout", type=int, default=300)
    driver(ap.parse_args())
