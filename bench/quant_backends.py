"""The two quantization backends side by side: bitsandbytes' NF4 (quantization=nf4) and torchao's
(quantization=torchao_nf4), everything else equal.

  python bench/quant_backends.py --gpu        # GPU machine: Phi-4-mini shape, packed SFT mix: tokens/s, peak, loss
  python bench/quant_backends.py --cpu        # CPU: SmolLM2-135M on the string tasks: eval exact match, loss

--gpu runs `train.py experiment=phi4_mini_qlora model=phi4_mini_shape` on the SFT mix of bench/sft_speed.py for each
backend (the same random-init weights, LoRA init and batches) and prints tokens/s, peak and the loss curve's
largest relative gap. --cpu runs `train.py -m experiment=smollm2_strings quantization=nf4,torchao_nf4` (the real
pretrained model, 32 steps) and prints what each run learned: eval loss and exact match of greedy generations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import DEFAULT_CACHE, ROOT  # bench/ is on sys.path when this script runs

BACKENDS = ("nf4", "torchao_nf4")


def curve(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r}


def gpu(a) -> None:
    from sft_speed import lengths, model_dir, tokens_per_word, write_rows

    data = a.out / "sft_mix.jsonl"
    write_rows(data, lengths(2000, 2048), tokens_per_word(model_dir("phi4mini", a.cache_dir)))
    rows = {}
    for q in BACKENDS:
        run_dir = a.out / q
        cmd = [sys.executable, str(ROOT / "train.py"), "experiment=phi4_mini_qlora", "model=phi4_mini_shape",
               f"quantization={q}", "data=jsonl", f"data.path={data}", f"optim.max_steps={a.steps}", "logger=none",
               "eval=loss", "eval.every_steps=0", "save.every_steps=0", "data.max_eval_rows=8",
               "log.progress_bar=false", f"cache_dir={a.cache_dir}", f"hydra.run.dir={run_dir}"]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        (a.out / f"{q}.log").write_text(res.stdout + "\n---stderr---\n" + res.stderr)
        if res.returncode != 0:
            rows[q] = {"error": " | ".join(res.stderr.strip().splitlines()[-2:])}
            continue
        s = json.loads((run_dir / "summary.json").read_text())
        rows[q] = {"tok_s": s["summary/tokens_per_s"], "peak_gib": s["summary/peak_memory_gib"],
                   "pred_gib": s["summary/predicted_peak_gib"], "curve": curve(run_dir),
                   "load_gib": s.get("phase/load/allocated_gib")}
    print(f"\nPhi-4-mini shape, packed SFT mix 4 x 2048, {a.steps} steps, the preset's levers")
    print("| backend | tokens/s | peak GiB | predicted GiB | weights after load GiB |\n|---|---|---|---|---|")
    for q, r in rows.items():
        if "error" in r:
            print(f"| {q} | {r['error']} | | | |")
        else:
            print(f"| {q} | {r['tok_s']:,.0f} | {r['peak_gib']:.2f} | {r['pred_gib']:.2f} | "
                  f"{'-' if r['load_gib'] is None else format(r['load_gib'], '.2f')} |")
    if all("curve" in r for r in rows.values()):
        a_, b_ = (rows[q]["curve"] for q in BACKENDS)
        gap = max(abs(a_[s] - b_[s]) / a_[s] for s in a_ if s in b_)
        print(f"loss curves on the same weights, LoRA init and batches: largest relative gap {gap:.3%} "
              f"(step 1: {a_[1]:.4f} vs {b_[1]:.4f}; last: {a_[max(a_)]:.4f} vs {b_[max(b_)]:.4f})")
    (a.out / "gpu.json").write_text(json.dumps(rows, indent=1))


def cpu(a) -> None:
    sweep = a.out / "smollm2"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=smollm2_strings",
           f"quantization={','.join(BACKENDS)}", "logger=none", "sweep.fuse=false", "log.progress_bar=false",
           f"cache_dir={a.cache_dir}", f"hydra.sweep.dir={sweep}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    (a.out / "smollm2.log").write_text(res.stdout + "\n---stderr---\n" + res.stderr)
    print("\nSmolLM2-135M-Instruct, string tasks, 32 steps, CPU (fp32 compute), 64 held-out rows")
    print("| backend | eval loss | exact match | char F1 | tokens/s | peak RSS GiB |\n|---|---|---|---|---|---|")
    for job in sorted(p for p in sweep.iterdir() if (p / "summary.json").is_file()):
        s = json.loads((job / "summary.json").read_text())
        print(f"| {job.name} | {s['summary/eval_loss']:.4f} | {s.get('summary/eval_exact_match', float('nan')):.3f} "
              f"| {s.get('summary/eval_char_f1', float('nan')):.3f} | {s['summary/tokens_per_s']:,.0f} | "
              f"{s['summary/peak_memory_gib']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("/tmp/qlab-quant"))
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.gpu:
        gpu(a)
    if a.cpu:
        cpu(a)


if __name__ == "__main__":
    main()
