"""How fast a whole sweep finishes: sequential isolated jobs vs fused groups vs co-scheduled processes.

  python bench/sweep_speed.py --shape qwen05b --sweep r2lr4      # GPU machine: the 8-job sweep on the 0.5B shape
  python bench/sweep_speed.py --shape phi4mini --sweep r4        # the 4-job lora.r sweep on Phi-4-mini
  python bench/sweep_speed.py --smoke                            # CPU: the tiny model, 3 steps: checks the script

Each mode runs `python train.py -m <sweep> experiment=phi4_mini_qlora model=<shape> data=jsonl data.path=<SFT mix>`
as a user would, into its own sweep dir, and is timed from the command's start to its exit:
- sequential: `sweep.fuse=false` (one process per job, one after another: what every sweep did before);
- fused: `sweep.fuse=auto` (jobs that share the base train together in one process: runner/fuse.py);
- coscheduled: `sweep.fuse=false sweep.max_parallel=auto` (one process per job, as many side by side as the plan
  says fit the card).
The rows are the SFT mix of bench/sft_speed.py (lognormal lengths, median ~350 tokens), packed. Every job's final
loss and peak are printed for each mode, so a mode that trains faster but differently shows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import DEFAULT_CACHE, ROOT  # bench/ is on sys.path when this script runs
from sft_speed import lengths, model_dir, tokens_per_word, write_rows

SWEEPS = {"r4": ["lora.r=8,16,32,64"], "r2lr4": ["lora.r=8,16", "optim.lr=1e-4,2e-4,4e-4,8e-4"],
          "smoke": ["lora.r=4,8"]}
MODES = {"sequential": ["sweep.fuse=false", "sweep.max_parallel=1"],
         "fused": ["sweep.fuse=auto", "sweep.max_parallel=1"],
         "coscheduled": ["sweep.fuse=false", "sweep.max_parallel=auto"]}


def sweep(mode: str, args: list[str], out: Path, timeout: int) -> dict:
    sweep_dir = out / mode
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *args, *MODES[mode], "logger=none", "eval=loss",
           "eval.every_steps=0", "save.every_steps=0", "data.max_eval_rows=8", "log.progress_bar=false",
           f"hydra.sweep.dir={sweep_dir}"]
    t0 = time.time()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        code, stdout, stderr = res.returncode, res.stdout, res.stderr
    except subprocess.TimeoutExpired as e:
        code, stdout, stderr = "timeout", str(e.stdout or ""), str(e.stderr or "")
    wall = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{mode}.log").write_text(f"{stdout}\n---stderr---\n{stderr}")
    jobs = {}
    for job in sorted(p for p in sweep_dir.glob("*") if (p / "summary.json").is_file()):
        s = json.loads((job / "summary.json").read_text())
        jobs[job.name] = {"status": s.get("summary/status"), "final_loss": s.get("summary/final_loss"),
                          "peak_gib": s.get("summary/peak_memory_gib"), "tok_s": s.get("summary/tokens_per_s"),
                          "steps": s.get("summary/steps")}
    return {"mode": mode, "wall_s": wall, "exit": code, "jobs": jobs,
            "groups": len(list(sweep_dir.glob("group_*.json")))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen05b", choices=["qwen05b", "phi4mini", "tiny"])
    ap.add_argument("--sweep", default="r2lr4", choices=sorted(SWEEPS))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/qlab-sweep-speed"))
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        a.shape, a.sweep, a.steps, a.seq, a.rows = "tiny", "smoke", 3, 64, 200
    model = {"qwen05b": "qwen2_5_0_5b_shape", "phi4mini": "phi4_mini_shape", "tiny": "tiny"}[a.shape]
    out = a.out / f"{a.shape}_{a.sweep}"
    data = out / "sft_mix.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    if a.shape == "tiny":
        write_rows(data, lengths(a.rows, a.seq), 6.0)  # the byte-level tokenizer: a token per letter
        preset = ["model=tiny", "data.micro_batch_size=4"]
    else:  # the shape built (and its tokenizer saved) before any timing, so no mode pays for it
        built = model_dir(a.shape, a.cache_dir)
        write_rows(data, lengths(a.rows, a.seq), tokens_per_word(built))
        preset = ["experiment=phi4_mini_qlora", f"model={model}"]
    args = [*SWEEPS[a.sweep], *preset, "data=jsonl", f"data.path={data}", f"model.max_seq_len={a.seq}",
            f"optim.max_steps={a.steps}", "optim.warmup_steps=5", f"cache_dir={a.cache_dir}"]
    results = [sweep(m, args, out, a.timeout) for m in a.modes]
    base = next((r["wall_s"] for r in results if r["mode"] == "sequential"), None)
    print(f"\nsweep {' '.join(SWEEPS[a.sweep])} on {model}, {a.steps} steps each, packed SFT mix at {a.seq} tokens")
    print("| mode | wall s | vs sequential | processes | exit |\n|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['wall_s'] / base:.2f}x" if base else "-"
        procs = f"{r['groups']} group(s)" if r["groups"] else f"{len(r['jobs'])} jobs"
        print(f"| {r['mode']} | {r['wall_s']:.1f} | {ratio} | {procs} | {r['exit']} |")
    names = sorted({j for r in results for j in r["jobs"]})
    print("\n| job | " + " | ".join(f"{r['mode']} final loss / peak GiB / tok/s" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for j in names:
        cells = []
        for r in results:
            x = r["jobs"].get(j)
            cells.append("-" if x is None else f"{x['status']}: {x['final_loss']:.4f} / {x['peak_gib']:.2f} / "
                         f"{x['tok_s']:,.0f}" if x.get("final_loss") is not None else f"{x['status']}")
        print(f"| {j} | " + " | ".join(cells) + " |")
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
