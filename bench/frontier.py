"""The fastest run that fits a card, and the longest context: checkpointing=auto against the preset and Unsloth.

  python bench/frontier.py --shapes phi4mini llama8b --budgets 12 24 48 80      # GPU machine (an H200/H100)
  python bench/frontier.py --long llama8b --lengths 16384 32768 65536 98304       # the longest context, at mb 1
  python bench/frontier.py --replot /tmp/qlab-frontier/frontier.json               # frontier.png again (any machine)

Each budget caps the process's GPU memory (`torch.cuda.set_per_process_memory_fraction`, bench/cap/sitecustomize.py)
so one large GPU stands in for a 12/24/48 GiB card, and every run is a fresh process on the packed SFT mix of
bench/sft_speed.py:
- auto: `train.py experiment=<preset> checkpointing=auto data.micro_batch_size=auto plan.gpu_memory_gib=<budget>`;
- preset: the current preset (checkpointing=offload, micro-batch 4);
- unsloth: its SFT path, packed, at each micro-batch of --unsloth-batches; its best that fits is kept.
--long: rows of one document of each length at micro-batch 1 under the --long-cap (80 GiB), a few steps each;
prints which lengths train (qlora-lab checkpointing=auto, and Unsloth's own recipe on the same length), and the
length `mode=plan plan.max_seq_len=search` predicts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import DEFAULT_CACHE, ROOT, SHAPE_MODEL  # bench/ is on sys.path when this script runs
from sft_speed import PEERS, PEER_ENV, PRESET, lengths, model_dir, slug, tokens_per_word, write_rows

CAP = Path(__file__).resolve().parent / "cap"


def _env(cap: float | None, peer: bool = False) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    paths = [str(CAP)] + ([os.environ["PEER_PYTHONPATH"]] if peer and os.environ.get("PEER_PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    if cap:
        env["QLAB_CAP_GIB"] = str(cap)
    return {**env, **(PEER_ENV if peer else {})}


def qlab(name: str, overrides: list[str], out: Path, cap: float | None, timeout: int) -> dict:
    run_dir = out / slug(name)
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, "logger=none", "eval=loss", "eval.every_steps=0",
           "save.every_steps=0", "data.max_eval_rows=8", "log.progress_bar=false", f"hydra.run.dir={run_dir}"]
    t = time.time()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env(cap))
    except subprocess.TimeoutExpired:
        return {"run": name, "error": f"timed out after {timeout} s"}
    (out / f"{slug(name)}.log").write_text(res.stdout + "\n---stderr---\n" + res.stderr)
    summary = run_dir / "summary.json"
    if res.returncode != 0 or not summary.is_file():
        tail = " | ".join(res.stderr.strip().splitlines()[-2:])
        return {"run": name, "error": f"exit {res.returncode}: {tail}"[:300], "oom": "out of memory" in res.stderr}
    s = json.loads(summary.read_text())
    info = json.loads((run_dir / "run_info.json").read_text())
    return {"run": name, "tok_s": round(s["summary/tokens_per_s"]), "peak_gib": round(s["summary/peak_memory_gib"], 2),
            "pred_gib": round(s.get("summary/predicted_peak_gib", float("nan")), 2), "mb": s["summary/micro_batch"],
            "layers": info["config"]["checkpointing"]["layers"], "wall_s": round(time.time() - t)}


def peer(name: str, cmd: list[str], out: Path, cap: float | None, timeout: int) -> dict:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env(cap, True))
    except subprocess.TimeoutExpired:
        return {"run": name, "error": f"timed out after {timeout} s"}
    (out / f"{slug(name)}.log").write_text(res.stdout + "\n---stderr---\n" + res.stderr)
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"run": name, "error": f"exit {res.returncode}", "oom": "out of memory" in res.stderr.lower()}
    r = json.loads(lines[-1])
    return {"run": name, "tok_s": r.get("tok_s"), "peak_gib": r.get("peak_gib"), "mb": r.get("bs"),
            **({"error": r["error"]} if "error" in r else {})}


def frontier(a, shape: str, out: Path) -> list[dict]:
    built = model_dir(shape, a.cache_dir)
    data = out / f"{shape}_sft_mix.jsonl"
    write_rows(data, lengths(a.rows, a.seq), tokens_per_word(built))
    common = [f"experiment={PRESET[shape]}", f"model={SHAPE_MODEL[shape]}", "data=jsonl", f"data.path={data}",
              f"model.max_seq_len={a.seq}", f"optim.max_steps={a.steps}", f"cache_dir={a.cache_dir}"]
    rows = []
    for budget in a.budgets:
        auto = qlab(f"{shape}_{budget}_auto", common + ["checkpointing=auto", "data.micro_batch_size=auto",
                                                        f"plan.gpu_memory_gib={budget}"], out, budget, a.timeout)
        preset = qlab(f"{shape}_{budget}_preset", common + ["checkpointing=offload", "data.micro_batch_size=4",
                                                            f"plan.gpu_memory_gib={budget}"], out, budget, a.timeout)
        peers = [peer(f"{shape}_{budget}_unsloth_bs{bs}",
                      [sys.executable, str(PEERS / "unsloth_sft_peer.py"), shape, "packed", str(bs), str(a.seq)],
                      out, budget, a.timeout) for bs in a.unsloth_batches]
        fitting = [p for p in peers if "error" not in p and p.get("tok_s")]
        best = max(fitting, key=lambda p: p["tok_s"]) if fitting else {"run": "unsloth", "error": "none fit"}
        rows.append({"shape": shape, "budget": budget, "auto": auto, "preset": preset, "unsloth": best,
                     "unsloth_all": peers})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def longest(a, shape: str, out: Path) -> dict:
    """Which lengths train at micro-batch 1 under the cap: qlora-lab (checkpointing=auto) and Unsloth's recipe."""
    model_dir(shape, a.cache_dir)
    plan = subprocess.run([sys.executable, str(ROOT / "train.py"), "mode=plan", f"experiment={PRESET[shape]}",
                           f"model={SHAPE_MODEL[shape]}", "checkpointing=auto", "data.micro_batch_size=1",
                           "plan.max_seq_len=search", f"plan.gpu_memory_gib={a.long_cap}", f"cache_dir={a.cache_dir}",
                           "logger=none"], capture_output=True, text=True, cwd=ROOT, env=_env(None))
    predicted = [x for x in plan.stdout.splitlines() if "plan.max_seq_len=search" in x]
    result = {"shape": shape, "cap_gib": a.long_cap, "predicted": predicted[-1] if predicted else plan.stderr[-300:],
              "qlab": {}, "unsloth": {}}
    for length in a.lengths:
        data = out / f"long_{length}.jsonl"
        write_rows(data, [length - 8] * 8, tokens_per_word(model_dir(shape, a.cache_dir)))
        r = qlab(f"{shape}_long_{length}", [f"experiment={PRESET[shape]}", f"model={SHAPE_MODEL[shape]}",
                                            "data=jsonl", f"data.path={data}", f"model.max_seq_len={length}",
                                            "data.micro_batch_size=1", "checkpointing=auto", "optim.max_steps=3",
                                            f"plan.gpu_memory_gib={a.long_cap}", f"cache_dir={a.cache_dir}",
                                            "data.eval_fraction=0.2", "data.max_dropped_fraction=1.0"],
                 out, a.long_cap, a.timeout)
        u = peer(f"{shape}_long_unsloth_{length}", [sys.executable, str(PEERS / "unsloth_peer.py"), shape, "1",
                                                   str(length)], out, a.long_cap, a.timeout)
        result["qlab"][length], result["unsloth"][length] = r, u
        print(json.dumps({"length": length, "qlab": r, "unsloth": u}), flush=True)
    return result


def plot(results: dict, path: Path) -> Path:
    """tokens/s against the budget, a panel per shape: checkpointing=auto (each point labelled with the layers and
    micro-batch it chose), the preset and Unsloth's best fitting batch; a run that did not fit is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in results["frontier"]})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = sorted((r for r in results["frontier"] if r["shape"] == shape), key=lambda r: r["budget"])
        for key, label, style, color in (("auto", "qlora-lab checkpointing=auto", "o-", "C0"),
                                         ("preset", "previous preset", "s--", "C1"),
                                         ("unsloth", "Unsloth, best fitting batch", "^:", "C2")):
            pts = [(r["budget"], r[key]["tok_s"]) for r in rows if r[key].get("tok_s")]
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=label)
        for r in rows:
            if r["auto"].get("tok_s"):
                ax.annotate(f"mb {r['auto'].get('mb')}\n{r['auto'].get('layers')}", (r["budget"], r["auto"]["tok_s"]),
                            textcoords="offset points", xytext=(4, 6), fontsize=7)
        ax.set(title=shape, xlabel="GPU memory budget (GiB, process capped)", ylabel="tokens/s (packed SFT mix)")
        ax.set_xticks([r["budget"] for r in rows])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["phi4mini"], choices=["phi4mini", "llama8b"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[12, 24, 48, 80])
    ap.add_argument("--unsloth-batches", nargs="*", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--long", nargs="*", default=[], choices=["phi4mini", "llama8b"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[16384, 32768, 65536])
    ap.add_argument("--long-cap", type=float, default=80)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/qlab-frontier"))
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--replot", type=Path, help="draw frontier.png again from a frontier.json; runs nothing")
    a = ap.parse_args()
    if a.replot:
        print(plot(json.loads(a.replot.read_text()), a.replot.with_suffix(".png")))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    results = {"frontier": [r for s in a.shapes for r in frontier(a, s, a.out)],
               "long": [longest(a, s, a.out) for s in a.long]}
    (a.out / "frontier.json").write_text(json.dumps(results, indent=1))
    if results["frontier"]:
        print(f"plot: {plot(results, a.out / 'frontier.png')}")
    print("\n| shape | budget (GiB cap) | auto tok/s | auto peak / predicted GiB | auto mb, layers | preset tok/s "
          "| preset peak | Unsloth best tok/s (mb) | Unsloth peak | auto / Unsloth | auto / preset |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["frontier"]:
        au, pr, un = r["auto"], r["preset"], r["unsloth"]
        cell = lambda x, k: x.get(k, x.get("error", "-"))  # noqa: E731
        ratio = lambda x, y: f"{x['tok_s'] / y['tok_s']:.2f}x" if x.get("tok_s") and y.get("tok_s") else "-"  # noqa
        print(f"| {r['shape']} | {r['budget']:g} | {cell(au, 'tok_s')} | {cell(au, 'peak_gib')} / "
              f"{au.get('pred_gib', '-')} | {au.get('mb', '-')}, {au.get('layers', '-')} | {cell(pr, 'tok_s')} | "
              f"{cell(pr, 'peak_gib')} | {cell(un, 'tok_s')} ({un.get('mb', '-')}) | {cell(un, 'peak_gib')} | "
              f"{ratio(au, un)} | {ratio(au, pr)} |")
    for r in results["long"]:
        print(f"\nlongest context, {r['shape']}, micro-batch 1, {r['cap_gib']:g} GiB cap: {r['predicted']}")
        print("| length | qlora-lab | Unsloth |\n|---|---|---|")
        for length in a.lengths:
            q, u = r["qlab"][length], r["unsloth"][length]
            show = lambda x: (f"trains: {x['tok_s']} tok/s, peak {x['peak_gib']} GiB" if x.get("tok_s")  # noqa
                              else "OOM" if x.get("oom") else x.get("error", "-"))
            print(f"| {length:,} | {show(q)} | {show(u)} |")


if __name__ == "__main__":
    main()
