"""Per-job overhead of an isolated sweep: each job's wall time minus what its training steps cost.

    python bench/sweep_overhead.py --out /tmp/ovh -- lora.r=8,16,32 optim.max_steps=12 eval.every_steps=0
    python bench/sweep_overhead.py --out /tmp/ovh --fresh-compile-cache -- lora.r=8,16,32 model.compile=layers

Runs `python train.py -m ARGS` once and prints one row per job: wall time, training time (steps x the median step
time, so step 1's compile and warm-up count as overhead), overhead (wall - training), start-up (process start to
the first step, where the job records it) and step 1's excess over the median (compile, warm-up). It reads files
every version of the sweep writes (job_config.json, metrics.jsonl), so the same script measures the code before
and after a change: a job's wall time runs from the moment the sweep wrote its job_config.json (just before
starting its process) to the next job's, or to the end of the sweep for the last.
`--fresh-compile-cache` points the default inductor/Triton caches at an empty directory, so that caches other runs
of this machine left behind do not make the first job look cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job_rows(sweep_dir: Path, end: float) -> list[dict]:
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / "job_config.json").is_file()),
                  key=lambda p: int(p.name.split("_", 1)[0]))
    starts = [(p / "job_config.json").stat().st_mtime for p in jobs] + [end]
    rows = []
    for i, job in enumerate(jobs):
        steps = [json.loads(line)["train/step_time_s"] for line in (job / "metrics.jsonl").read_text().splitlines()
                 if "train/step_time_s" in line]
        wall = starts[i + 1] - starts[i]
        median = statistics.median(steps[1:] or steps)
        train = median * len(steps)
        summary = json.loads((job / "summary.json").read_text()) if (job / "summary.json").is_file() else {}
        rows.append({"job": job.name, "wall_s": wall, "train_s": train, "overhead_s": wall - train,
                     "first_step_extra_s": steps[0] - median, "steps": len(steps),
                     "startup_s": summary.get("summary/startup_s"),  # written by newer versions only
                     "spans": {k[5:-2]: v for k, v in summary.items() if k.startswith("time/")},
                     "process_s": summary.get("summary/wall_time_s")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the sweep dir (hydra.sweep.dir)")
    ap.add_argument("--cache-dir", default="/tmp/qlab-cache", help="cache_dir: built models (build them first)")
    ap.add_argument("--fresh-compile-cache", action="store_true")
    ap.add_argument("args", nargs="*", help="train.py overrides (after --)")
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if a.fresh_compile_cache:
        fresh = tempfile.mkdtemp(prefix="qlab-compile-")
        env.update(TORCHINDUCTOR_CACHE_DIR=f"{fresh}/inductor", TRITON_CACHE_DIR=f"{fresh}/triton")
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *a.args, f"cache_dir={a.cache_dir}",
           "log.progress_bar=false", f"hydra.sweep.dir={a.out}"]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    end = time.time()
    (a.out / "sweep.log").write_text(res.stdout + "\n---stderr---\n" + res.stderr)  # the jobs' own lines
    if res.returncode != 0:
        sys.exit(f"the sweep failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    rows = job_rows(a.out, end)
    print(f"sweep: {' '.join(a.args)}  ({end - t0:.1f} s in all)")
    print("| job | steps | wall s | training s | overhead s | start-up s | step-1 excess s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        startup = "-" if r["startup_s"] is None else f"{r['startup_s']:.1f}"
        print(f"| {r['job']} | {r['steps']} | {r['wall_s']:.1f} | {r['train_s']:.1f} | {r['overhead_s']:.1f} | "
              f"{startup} | {r['first_step_extra_s']:.1f} |")
    spans = list(dict.fromkeys(k for r in rows for k in r["spans"]))
    if spans:  # where each job's time went (time/<span>_s of its summary); "after" = W&B close, exit, next start
        print("\n| job | " + " | ".join(spans) + " | after |\n|---|" + "---|" * (len(spans) + 1))
        for r in rows:
            after = r["wall_s"] - r["process_s"] if r["process_s"] else float("nan")
            print(f"| {r['job']} | " + " | ".join(f"{r['spans'].get(k, float('nan')):.1f}" for k in spans)
                  + f" | {after:.1f} |")
    later = [r["overhead_s"] for r in rows[1:]]
    if later:
        print(f"mean overhead of jobs 1..{len(rows) - 1}: {statistics.mean(later):.1f} s "
              f"(job 0: {rows[0]['overhead_s']:.1f} s)")


if __name__ == "__main__":
    main()
