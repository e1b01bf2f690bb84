"""A study's plots, drawn from its table and its jobs' curves. A plot with nothing to draw is an error, not an
empty picture: a study whose plot broke (a column that lost its values, a metric no run logs) fails its build."""

from __future__ import annotations

import math
from pathlib import Path

from qlora_lab.study.execute import Job
from qlora_lab.study.spec import Plot, PlotKind, Study, StudyError
from qlora_lab.study.table import Row


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _label(study: Study, job: Job, rows: list[Row]) -> str:
    return next((r.id for r in rows if job in r.jobs), job.name)


def draw(study: Study, plot: Plot, rows: list[Row], jobs: list[Job], folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        if plot.kind == PlotKind.curves:
            key = plot.y or "train/loss"
            drawn = 0
            for job in jobs:
                curve = [(s, v) for s, v in job.curve(key) if _finite(v)]
                if curve:
                    ax.plot(*zip(*curve), label=_label(study, job, rows), linewidth=1.2)
                    drawn += 1
            if not drawn:
                raise StudyError(f"plot {plot.file}: no job logged {key!r}")
            ax.set(xlabel="step", ylabel=key)
            ax.legend(fontsize=7)
        else:
            pts = [(r.id, r.values.get(plot.x) if plot.kind == PlotKind.scatter else i, r.values.get(plot.y))
                   for i, r in enumerate(rows)]
            pts = [p for p in pts if _finite(p[1]) and _finite(p[2])]
            if not pts:
                raise StudyError(f"plot {plot.file}: no row has a value for {plot.y!r}"
                                 + (f" and {plot.x!r}" if plot.kind == PlotKind.scatter else ""))
            if plot.kind == PlotKind.scatter:
                ax.scatter([p[1] for p in pts], [p[2] for p in pts], s=50, zorder=3)
                for name, x, y in pts:
                    ax.annotate(name, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
                ax.set(xlabel=plot.x, ylabel=plot.y)
            else:
                ax.bar(range(len(pts)), [p[2] for p in pts])
                ax.set_xticks(range(len(pts)), [p[0] for p in pts], rotation=30, ha="right", fontsize=7)
                ax.set(ylabel=plot.y)
        ax.set_title(f"{study.name}: {plot.y or 'train/loss'}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / plot.file
        fig.savefig(path, dpi=110)
        return path
    finally:
        plt.close(fig)
