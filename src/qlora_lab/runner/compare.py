"""Compare the jobs of a sweep from their local files (no W&B account needed).

  qlora-lab compare outputs/multirun/<sweep>                          # or: make compare SWEEP=...
  qlora-lab compare outputs/multirun/<sweep> --metric eval_exact_match

Writes into the sweep dir: compare.md and compare.csv (one row per job, best first by the quality metric: the keys
the sweep varies, status, losses, every task metric the jobs evaluated, tokens/s, the job's own peak memory,
per-job overhead, and whether the job is on the Pareto front), loss_curves.png (train loss of every job overlaid)
and memory_vs_<metric>.png (peak memory against the quality metric, tokens/s as colour, the Pareto front marked;
memory_vs_loss.png for a loss).

The quality metric (`--metric`) is any summary metric with a direction: losses are better lower, scores (exact
match, F1, ROUGE) higher. Without `--metric`: the first task metric every finished job has, else the eval loss,
else the final train loss.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from qlora_lab.core.errors import BadFile
from qlora_lab.evaluation.metrics import goal
from qlora_lab.sinks.summary import read_summary

log = logging.getLogger(__name__)


class CompareError(ValueError):
    """A sweep dir or metric the report cannot use; the message names the fix."""


HEAD = ["summary/status", "summary/final_loss", "summary/eval_loss"]
TAIL = ["summary/tokens_per_s", "summary/peak_memory_gib", "summary/overhead_s"]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimized), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((ox <= x and oy <= y) and (ox < x or oy < y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _overrides(job_dir: Path) -> list[str]:
    """The job's command-line overrides as Hydra recorded them (plain YAML, read without object tags); [] when
    there are none or the file is not such a list (the job is then labelled by its dir's name alone)."""
    import yaml

    path = job_dir / ".hydra" / "overrides.yaml"
    try:
        found = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else []
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        log.warning(f"{path} is not YAML ({type(e).__name__}); the job is labelled by its dir's name alone")
        return []
    return [str(o) for o in found] if isinstance(found, list) else []


def _curve(metrics: Path) -> list[tuple[int, float]]:
    """(step, train loss) from metrics.jsonl; a line cut short by a killed job is passed over."""
    curve = []
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                if rec.get("train/loss") is not None:
                    curve.append((int(rec["step"]), rec["train/loss"]))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    return curve


def load_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job dir with a summary.json; a job whose summary.json is not JSON is left out, said in one line."""
    jobs = []
    for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / "summary.json").is_file()):
        try:
            summary = read_summary(job_dir)
        except BadFile as e:
            log.warning(f"{job_dir.name} left out: {e}")
            continue
        if not isinstance(summary, dict):
            log.warning(f"{job_dir.name} left out: {job_dir / 'summary.json'} holds no summary")
            continue
        curve = _curve(job_dir / "metrics.jsonl")
        jobs.append({"name": job_dir.name, "overrides": _overrides(job_dir), "summary": summary, "curve": curve})
    return jobs


def _as_dict(overrides: list[str]) -> dict[str, str]:
    return dict(o.partition("=")[::2] for o in overrides)


def varying(jobs: list[dict[str, Any]]) -> list[str]:
    """The override keys whose values differ between jobs: the sweep's axes (all keys if none differ)."""
    per_job = [_as_dict(j["overrides"]) for j in jobs]
    keys = sorted({k for d in per_job for k in d})
    return [k for k in keys if len({d.get(k) for d in per_job}) > 1] or keys


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _finished(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [j for j in jobs if j["summary"].get("summary/status") == "finished"]


def task_metrics(jobs: list[dict[str, Any]]) -> list[str]:
    """Every `summary/eval_<metric>` of a score (not the loss) that some job reports, in first-seen order."""
    keys = [k for j in jobs for k in j["summary"] if k.startswith("summary/eval_") and goal(k) == "max"]
    return list(dict.fromkeys(keys))


def quality_metric(jobs: list[dict[str, Any]], chosen: str | None = None) -> str:
    """The summary key the report ranks by and plots against memory (see the module doc)."""
    if chosen:
        key = chosen if chosen.startswith("summary/") else f"summary/{chosen}"
        if goal(key) is None or not any(key in j["summary"] for j in jobs):
            known = sorted({k.split("/", 1)[1] for j in jobs for k, v in j["summary"].items() if goal(k) and _finite(v)})
            raise CompareError(f"{chosen}: no job reports it as a quality metric; choose one of: "
                               f"{', '.join(known) or '(none: did any job finish?)'}")
        return key
    done = _finished(jobs)
    for key in [*task_metrics(jobs), "summary/eval_loss"]:
        if done and all(_finite(j["summary"].get(key)) for j in done):
            return key
    return "summary/final_loss"


# What breaks a tie in the quality metric (exact match 0 for every job of a short sweep): the eval loss, then the
# final train loss, lower first; then the sweep's order.
TIE_BREAKERS = ("summary/eval_loss", "summary/final_loss")


def ranked(jobs: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Jobs best first by `metric`, ties broken by TIE_BREAKERS; jobs without a finite value last, in their sweep
    order."""
    sign = 1 if goal(metric) == "min" else -1

    def key(j: dict[str, Any]) -> tuple:
        s = j["summary"]
        if not _finite(s.get(metric)):
            return (1, 0.0, ())
        return (0, sign * s[metric], tuple(s[k] if _finite(s.get(k)) else math.inf for k in TIE_BREAKERS
                                           if k != metric))

    return sorted(jobs, key=key)


def front_of(jobs: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The finished jobs on the Pareto front of the job's own peak memory and `metric` (each in its direction)."""
    done = [j for j in _finished(jobs) if _finite(j["summary"].get(metric))
            and _finite(j["summary"].get("summary/peak_memory_gib"))]
    sign = 1 if goal(metric) == "min" else -1
    pts = [(j["summary"]["summary/peak_memory_gib"], sign * j["summary"][metric]) for j in done]
    return [done[i] for i in pareto_front(pts)]


def table_rows(jobs: list[dict[str, Any]], metric: str) -> tuple[list[str], list[list[Any]]]:
    axes, tasks = varying(jobs), task_metrics(jobs)
    columns = [*HEAD, *tasks, *TAIL]
    on_front = {j["name"] for j in front_of(jobs, metric)}
    header = ["rank", "job", *axes, *(c.split("/", 1)[1] for c in columns), "pareto"]
    rows = []
    for i, job in enumerate(ranked(jobs, metric), 1):
        ov, s = _as_dict(job["overrides"]), job["summary"]
        rank = i if _finite(s.get(metric)) else ""
        rows.append([rank, job["name"], *[ov.get(a, "") for a in axes], *[s.get(c) for c in columns],
                     "*" if job["name"] in on_front else ""])
    return header, rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def write_tables(sweep_dir: Path, header: list[str], rows: list[list[Any]], metric: str) -> tuple[Path, Path]:
    md, cs = sweep_dir / "compare.md", sweep_dir / "compare.csv"
    best = "lower" if goal(metric) == "min" else "higher"
    lines = [f"Ranked by {metric.split('/', 1)[1]} ({best} is better); pareto: on the front of peak memory and "
             f"{metric.split('/', 1)[1]}.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    md.write_text("\n".join(lines) + "\n")
    with open(cs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return md, cs


def plot(sweep_dir: Path, jobs: list[dict[str, Any]], metric: str) -> list[Path]:
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

    name = metric.split("/", 1)[1]
    done = [j for j in _finished(jobs) if _finite(j["summary"].get(metric))
            and _finite(j["summary"].get("summary/peak_memory_gib"))]
    fig, ax = plt.subplots(figsize=(8, 5))
    if done:
        pts = [(j["summary"]["summary/peak_memory_gib"], j["summary"][metric]) for j in done]
        tps = [j["summary"].get("summary/tokens_per_s", 0.0) for j in done]
        sc = ax.scatter(*zip(*pts), c=tps, cmap="viridis", s=60, zorder=3)
        fig.colorbar(sc, ax=ax, label="tokens/s")
        for (x, y), j in zip(pts, done):
            ax.annotate(label(j), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        front = [(j["summary"]["summary/peak_memory_gib"], j["summary"][metric]) for j in front_of(jobs, metric)]
        ax.plot(*zip(*front), "r--", zorder=2, label="Pareto front")
        ax.legend(fontsize=8)
    better = "lower" if goal(metric) == "min" else "higher"
    ax.set(xlabel="peak memory (GiB), the job's own", ylabel=f"{name.replace('_', ' ')} ({better} is better)",
           title=f"Memory vs {name.replace('_', ' ')}: {sweep_dir.name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.append(sweep_dir / ("memory_vs_loss.png" if goal(metric) == "min" else f"memory_vs_{name}.png"))
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)
    return out


def compare(sweep_dir: Path, metric: str | None = None) -> dict[str, Any]:
    if not sweep_dir.is_dir():
        raise CompareError(f"{sweep_dir} is not a directory; give a sweep dir (outputs/multirun/<time>)")
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise CompareError(f"{sweep_dir}: no job directories with a summary.json; is this a multirun dir "
                           "(outputs/multirun/<time>)?")
    key = quality_metric(jobs, metric)
    header, rows = table_rows(jobs, key)
    md, cs = write_tables(sweep_dir, header, rows, key)
    pngs = plot(sweep_dir, jobs, key)
    return {"markdown": md, "csv": cs, "plots": pngs, "rows": rows, "header": header, "metric": key}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", type=Path, help="a sweep's dir: outputs/multirun/<time>")
    p.add_argument("--metric", help="the quality metric to rank by and plot, e.g. eval_exact_match, eval_loss")


def main(args: argparse.Namespace) -> int:
    try:
        res = compare(args.sweep_dir, args.metric)
    except CompareError as e:
        where = f"--metric {e}" if args.metric and str(e).startswith(f"{args.metric}:") else str(e)
        print(f"qlora-lab: {where}", file=sys.stderr)
        return 2
    print(res["markdown"].read_text())
    print("wrote", res["markdown"], res["csv"], *res["plots"])
    return 0


if __name__ == "__main__":  # python -m qlora_lab.runner.compare: the same as `qlora-lab compare`
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
