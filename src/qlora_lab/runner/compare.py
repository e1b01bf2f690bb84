"""Compare the jobs of a sweep from their local files (no W&B account needed).

  python -m qlora_lab.runner.compare outputs/multirun/<sweep>      # or: make compare SWEEP=outputs/multirun/<sweep>

Writes into the sweep dir: compare.md and compare.csv (one row per job: the overrides that vary, status, final
loss, eval loss, tokens/s, peak memory), loss_curves.png (train loss of every job overlaid) and
memory_vs_loss.png (peak memory against loss, tokens/s as colour, the Pareto front of memory and loss marked).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

COLUMNS = ["summary/status", "summary/final_loss", "summary/eval_loss", "summary/tokens_per_s",
           "summary/peak_memory_gib"]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimized), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((ox <= x and oy <= y) and (ox < x or oy < y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _overrides(job_dir: Path) -> list[str]:
    import yaml

    path = job_dir / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text()) or []) if path.is_file() else []


def load_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    jobs = []
    for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / "summary.json").is_file()):
        summary = json.loads((job_dir / "summary.json").read_text())
        metrics = job_dir / "metrics.jsonl"
        curve = []
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("train/loss") is not None:
                    curve.append((rec["step"], rec["train/loss"]))
        jobs.append({"name": job_dir.name, "overrides": _overrides(job_dir), "summary": summary, "curve": curve})
    return jobs


def _as_dict(overrides: list[str]) -> dict[str, str]:
    return dict(o.partition("=")[::2] for o in overrides)


def varying(jobs: list[dict[str, Any]]) -> list[str]:
    """The override keys whose values differ between jobs: the sweep's axes (all keys if none differ)."""
    per_job = [_as_dict(j["overrides"]) for j in jobs]
    keys = sorted({k for d in per_job for k in d})
    return [k for k in keys if len({d.get(k) for d in per_job}) > 1] or keys


def table_rows(jobs: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    axes = varying(jobs)
    header = ["job", *axes, "status", "final_loss", "eval_loss", "tokens_per_s", "peak_memory_gib"]
    rows = []
    for job in jobs:
        ov = _as_dict(job["overrides"])
        s = job["summary"]
        rows.append([job["name"], *[ov.get(a, "") for a in axes], *[s.get(c) for c in COLUMNS]])
    return header, rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def write_tables(sweep_dir: Path, header: list[str], rows: list[list[Any]]) -> tuple[Path, Path]:
    md, cs = sweep_dir / "compare.md", sweep_dir / "compare.csv"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    md.write_text("\n".join(lines) + "\n")
    with open(cs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return md, cs


def plot(sweep_dir: Path, jobs: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    axes = varying(jobs)
    label = lambda j: ",".join(o for o in j["overrides"] if o.partition("=")[0] in axes) or j["name"]  # noqa: E731
    out = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for job in jobs:
        if job["curve"]:
            steps, losses = zip(*job["curve"])
            ax.plot(steps, losses, label=f"{label(job)} [{job['summary'].get('summary/status')}]", linewidth=1.2)
    ax.set(xlabel="step", ylabel="train loss", title=f"Loss curves: {sweep_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(sweep_dir / "loss_curves.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)

    done = [j for j in jobs if j["summary"].get("summary/status") == "finished"]
    fig, ax = plt.subplots(figsize=(8, 5))
    if done:
        loss_key = "summary/eval_loss" if all(_finite(j["summary"].get("summary/eval_loss")) for j in done) \
            else "summary/final_loss"
        pts = [(j["summary"]["summary/peak_memory_gib"], j["summary"][loss_key]) for j in done]
        tps = [j["summary"].get("summary/tokens_per_s", 0.0) for j in done]
        sc = ax.scatter(*zip(*pts), c=tps, cmap="viridis", s=60, zorder=3)
        fig.colorbar(sc, ax=ax, label="tokens/s")
        for (x, y), j in zip(pts, done):
            ax.annotate(label(j), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "r--", zorder=2, label="Pareto front")
        ax.legend(fontsize=8)
        ax.set(ylabel=loss_key.split("/")[1].replace("_", " "))
    ax.set(xlabel="peak memory (GiB)", title=f"Memory vs loss: {sweep_dir.name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(sweep_dir / "memory_vs_loss.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def compare(sweep_dir: Path) -> dict[str, Any]:
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise SystemExit(f"{sweep_dir}: no job directories with a summary.json; is this a multirun dir?")
    header, rows = table_rows(jobs)
    md, cs = write_tables(sweep_dir, header, rows)
    pngs = plot(sweep_dir, jobs)
    return {"markdown": md, "csv": cs, "plots": pngs, "rows": rows, "header": header}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path)
    res = compare(ap.parse_args().sweep_dir)
    print(res["markdown"].read_text())
    print("wrote", res["markdown"], res["csv"], *res["plots"])


if __name__ == "__main__":
    main()
