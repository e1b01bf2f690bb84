"""Throughput on variable-length SFT rows, end to end through train.py, beside the peers, one fresh process each.

  python bench/sft_speed.py                       # GPU machine: phi4mini preset, fixed vs SFT mix padded vs packed
  python bench/sft_speed.py --shape llama8b
  python bench/sft_speed.py --smoke               # CPU: the tiny model, a few steps: checks the script, times nothing

The SFT mix: token lengths drawn from a lognormal with median 352 and sigma 0.91 (p90 ~1,130, mean ~530), capped
at seq-1, the same law as the peers' `unsloth_sft_peer.py`; each row is a prompt (a fifth of its tokens) and a
response, random words whose length in tokens is calibrated against the model's own tokenizer. The fixed rows are
the same words at seq tokens each. Every qlora-lab run is `python train.py experiment=<preset> model=<shape>
data=jsonl data.path=...` (reading, tokenizing, packing or padding, collation: what users run), and its
tokens/s is the median of real (non-pad) tokens per second over the steady steps (summary/tokens_per_s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import DEFAULT_CACHE, ROOT, SHAPE_MODEL  # bench/ is on sys.path when this script runs

PEERS = ROOT / ".peers"
PRESET = {"phi4mini": "phi4_mini_qlora", "llama8b": "llama3_8b_qlora"}


def lengths(n: int, seq: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [max(8, min(int(rng.lognormvariate(math.log(352), 0.91)), seq - 1)) for _ in range(n)]


def tokens_per_word(model_dir: Path) -> float:
    """How many tokens a random word of the rows costs with this tokenizer (calibrates the text lengths)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    words = " ".join(_word(random.Random(1)) for _ in range(2000))
    return len(tok(words, add_special_tokens=False)["input_ids"]) / 2000


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 6)))


def write_rows(path: Path, token_lengths: list[int], per_word: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for n in token_lengths:
            words = max(2, int(n / per_word))
            text = [_word(rng) for _ in range(words)]
            cut = max(1, words // 5)
            f.write(json.dumps({"prompt": " ".join(text[:cut]), "response": " ".join(text[cut:])}) + "\n")


def model_dir(shape: str, cache: str) -> Path:
    """The shape's random-init build (the first train.py run builds it; built here first to calibrate)."""
    sys.path.insert(0, str(ROOT / "src"))
    from common import bench_spec

    from qlora_lab.model import model_source

    return Path(model_source(bench_spec(shape, [], 2048, cache, device=_device())).path)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def slug(name: str) -> str:
    """A file name for a table row: letters, digits, '_' and '-' only."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name).strip("_")


def train_run(name: str, overrides: list[str], out: Path, timeout: int) -> dict:
    run_dir = out / slug(name)
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, "logger=none", "eval=loss", "eval.every_steps=0",
           "save.every_steps=0", "data.max_eval_rows=8", "log.progress_bar=false", f"hydra.run.dir={run_dir}"]
    t = time.time()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return {"stack": name, "error": f"timed out after {timeout} s"}
    (out / f"{slug(name)}.log").write_text(res.stdout + "\n---stderr---\n" + res.stderr)
    summary = run_dir / "summary.json"
    if res.returncode != 0 or not summary.is_file():
        return {"stack": name, "error": f"exit {res.returncode}: " + " | ".join(res.stderr.strip().splitlines()[-2:])}
    s = json.loads(summary.read_text())
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fill = [r["train/fill_fraction"] for r in recs if "train/fill_fraction" in r][3:]
    return {"stack": name, "tok_s": round(s["summary/tokens_per_s"]), "peak_gib": round(s["summary/peak_memory_gib"], 2),
            "pred_gib": round(s.get("summary/predicted_peak_gib", float("nan")), 2),
            "fill": round(statistics.median(fill), 3) if fill else None, "wall_s": round(time.time() - t)}


# The peers run offline, with their own packages first on the path (PEER_PYTHONPATH: a folder with unsloth, trl and
# what they pin, so that they never change what the qlora-lab runs import).
PEER_ENV = {"UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache"}


def peer_run(name: str, cmd: list[str], out: Path, timeout: int) -> dict:
    env = {**os.environ, **PEER_ENV}
    if os.environ.get("PEER_PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PEER_PYTHONPATH"] + os.pathsep + env.get("PYTHONPATH", "")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"stack": name, "error": f"timed out after {timeout} s"}
    (out / f"{slug(name)}.log").write_text(res.stdout + "\n---stderr---\n" + res.stderr)
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if not lines:
        return {"stack": name, "error": " | ".join(res.stderr.strip().splitlines()[-2:])}
    r = json.loads(lines[-1])
    return {"stack": name, "tok_s": r.get("tok_s"), "peak_gib": r.get("peak_gib"), "error": r.get("error")}


def main(a) -> None:
    out = Path(os.environ.get("OUT", "/tmp")) / "sft_speed"
    out.mkdir(parents=True, exist_ok=True)
    seq = 64 if a.smoke else a.seq
    shape_args = ["model=tiny", "device=cpu"] if a.smoke else [f"experiment={PRESET[a.shape]}",
                                                                f"model={SHAPE_MODEL[a.shape]}"]
    mdir = model_dir("tiny" if a.smoke else a.shape, a.cache) if not a.smoke else None
    per_word = tokens_per_word(mdir) if mdir else 1.5
    mix, fixed = out / "sft_mix.jsonl", out / "fixed.jsonl"
    write_rows(mix, lengths(a.rows, seq), per_word)
    # Longer than seq: truncation at model.max_seq_len cuts every fixed row to exactly seq tokens, so the fixed-row
    # run has no padding at all (rows a little under seq would be padded to the longest of each batch, with a mask).
    write_rows(fixed, [seq + max(4, seq // 32)] * a.rows, per_word)
    common = [*shape_args, f"model.max_seq_len={seq}", f"optim.max_steps={a.steps}", f"cache_dir={a.cache}",
              f"data.micro_batch_size={a.bs}", "data=jsonl"]
    runs = [("qlora-lab fixed rows", [*common, f"data.path={fixed}", "data.packing=false"]),
            ("qlora-lab SFT mix, padded", [*common, f"data.path={mix}", "data.packing=false"]),
            ("qlora-lab SFT mix, packed", [*common, f"data.path={mix}", "data.packing=true"])]
    chosen = a.runs.split(",")
    rows = [train_run(name, ov, out, a.timeout) for key, (name, ov) in zip(("fixed", "padded", "packed"), runs)
            if key in chosen]
    peers = [] if a.smoke or not (PEERS / "unsloth_sft_peer.py").is_file() else a.peers.split(",")
    for mode in [p for p in peers if p in ("padded", "packed")]:
        rows.append(peer_run(f"Unsloth SFT {mode}", [sys.executable, str(PEERS / "unsloth_sft_peer.py"), a.shape,
                                                     mode, str(a.bs), str(seq)], out, a.timeout))
    if "fixed" in peers:
        rows.append(peer_run("Unsloth fixed rows", [sys.executable, str(PEERS / "unsloth_peer.py"), a.shape,
                                                    str(a.bs), str(seq)], out, a.timeout))
    for r in rows:
        print(json.dumps(r), flush=True)
    fixed_tok = next((r.get("tok_s") for r in rows if r["stack"] == "qlora-lab fixed rows"), None)
    packed_peer = next((r.get("tok_s") for r in rows if r["stack"] == "Unsloth SFT packed"), None)
    print(f"\n## Variable-length SFT rows, {'tiny (smoke)' if a.smoke else a.shape}, micro-batch {a.bs} x {seq}"
          f" ({_device_name()})\n")
    print("| stack | tokens/s (real) | peak GiB | ledger GiB | fill | vs fixed rows | vs Unsloth packed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("error") or not r.get("tok_s"):
            print(f"| {r['stack']} | error: {str(r.get('error'))[:80]} | | | | | |")
            continue
        vs = lambda ref: f"{r['tok_s'] / ref:.2f}x" if ref else "-"  # noqa: E731
        print(f"| {r['stack']} | {r['tok_s']:,} | {r.get('peak_gib', '')} | {r.get('pred_gib', '')} | "
              f"{r.get('fill') or ''} | {vs(fixed_tok)} | {vs(packed_peer)} |")


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="phi4mini", choices=sorted(PRESET))
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--cache", default=DEFAULT_CACHE)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--peers", default="padded,packed,fixed", help="which Unsloth runs (from .peers/) to add")
    ap.add_argument("--runs", default="fixed,padded,packed", help="which qlora-lab runs")
    ap.add_argument("--smoke", action="store_true", help="the tiny model on the CPU: checks the script")
    main(ap.parse_args())
