"""A study's table from its jobs: a row per job (or per ledger group of a job), the study's columns, written as
CSV (full precision: what a reproduction compares) and Markdown (formatted: what the README shows), and read back.

Rows are named by the values of the study's row keys in each job's resolved config; two commands whose jobs share
those values fill one row (a plan's prediction beside a GPU run's measurement), the first command that has a value
for a column giving it.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_lab.study.execute import Job
from qlora_lab.study.spec import Column, Group, Study, StudyError, TableKind, job_values

ROW_SEP = " / "


@dataclass
class Row:
    keys: list[str]  # the row keys' values (and the ledger group), as text
    values: dict[str, Any]  # column name -> value (None: no value)
    jobs: list[Job]

    @property
    def id(self) -> str:
        return ROW_SEP.join(self.keys)


def _text(v: Any) -> str:
    return "null" if v is None else str(v)


def _metric_at(job: Job, spec: str) -> Any:
    key, _, step = spec.rpartition("@")
    hits = [r[key] for r in job.records if r.get("step") == int(step) and r.get(key) is not None]
    return hits[-1] if hits else None


def _ledger_sum(job: Job, group: Group) -> float | None:
    """The group's ledger components summed (`a|b`: whichever of the two this ledger has; `peak`, `card`: the
    predicted peak, what the card must hold)."""
    if group.components in (["peak"], ["card"]):
        return job.summary.get(f"summary/predicted_{group.components[0]}_gib")
    by_name = {i["component"]: i["gib"] for i in job.ledger}
    if not by_name:
        return None
    total, missing = 0.0, []
    for c in group.components:
        found = [by_name[a] for a in c.split("|") if a in by_name]
        total += found[0] if found else 0.0
        missing += [] if found else [c]
    if missing:  # the ledger renamed or dropped a component: the study says what it expected
        raise StudyError(f"ledger group {group.row!r}: no component {missing} in the ledger of {job.dir} (it has: "
                         f"{', '.join(by_name)})")
    return total


def _measured(job: Job, group: Group) -> float | None:
    if group.phase is None:
        return None
    if group.phase == "step_peak" and job.device.get("device") == "cuda":  # the CPU's peak is RSS, not comparable
        return job.summary.get("summary/peak_memory_gib")
    return next((p["measured_gib"] for p in job.phases if p.get("phase") == group.phase), None)


def value(job: Job, column: Column, group: Group | None = None) -> Any:
    """A column's value for one job (a `vs:` column is filled later, from the other rows)."""
    of = column.of
    if of.startswith("summary/"):
        return job.summary.get(of)
    if of.startswith("config:"):
        return job_values(job.config, [of[7:]])[0]
    if of.startswith("metrics:"):
        return _metric_at(job, of[8:])
    if group is not None and of == "ledger:predicted_gib":
        return _ledger_sum(job, group)
    if group is not None and of == "ledger:measured_gib":
        return _measured(job, group)
    if group is None and of.startswith("ledger:"):  # a row per job: named ledger components, summed
        by_name = {i["component"]: i["gib"] for i in job.ledger}
        parts = of[7:].split("+")
        if by_name and not set(parts) <= set(by_name):
            raise StudyError(f"column {column.name}: no component {sorted(set(parts) - set(by_name))} in the ledger "
                             f"of {job.dir} (it has: {', '.join(by_name)})")
        return sum(by_name[p] for p in parts) if by_name else None
    if group is not None and of.startswith("const:"):
        return group.consts.get(of[6:])
    if of.startswith(("vs:", "ratio:")):
        return None  # from the other columns, once every row has them
    raise StudyError(f"column {column.name}: cannot read {of!r} (summary/<key>, config:<key>, metrics:<key>@<step>, "
                     "vs:<column>@<row key>=<value>, ratio:<column>/<column>, ledger:<component>+<component>, and in a "
                     "ledger table ledger:predicted_gib, "
                     "ledger:measured_gib, const:<key>)")


def build(study: Study, jobs: list[Job], columns: list[Column]) -> list[Row]:
    rows: dict[tuple[str, ...], Row] = {}
    groups: list[Group | None] = list(study.groups) if study.table == TableKind.ledger else [None]
    for job in jobs:
        keys = [_text(v) for v in job_values(job.config, study.rows)]
        for group in groups:
            rid = tuple(keys + ([group.row] if group else []))
            row = rows.setdefault(rid, Row(list(rid), {c.name: None for c in columns}, []))
            row.jobs.append(job)
            for c in columns:
                if row.values[c.name] is None:
                    row.values[c.name] = value(job, c, group)
    out = list(rows.values())
    by_id = {r.id: r for r in out}
    for c in columns:
        if c.of.startswith("vs:"):  # this row's value over another row's: `key=value` (the row that differs only in
            base_col, _, where = c.of[3:].partition("@")  # that key), or a row id (one row for all)
            key, eq, want = where.partition("=")
            if eq and key not in study.rows:
                raise StudyError(f"column {c.name}: {key!r} is not one of the row keys {study.rows}")
            if not eq and where not in by_id:
                raise StudyError(f"column {c.name}: no row {where!r} (rows: {', '.join(by_id)})")
            at = study.rows.index(key) if eq else 0
            for r in out:
                other = by_id.get(ROW_SEP.join(r.keys[:at] + [want] + r.keys[at + 1:])) if eq else by_id[where]
                num, den = r.values[base_col], other.values[base_col] if other else None
                r.values[c.name] = num / den if _number(num) and _number(den) and den else None
        elif c.of.startswith("ratio:"):
            num_col, _, den_col = c.of[6:].partition("/")
            for r in out:
                num, den = r.values.get(num_col), r.values.get(den_col)
                r.values[c.name] = num / den if _number(num) and _number(den) and den else None
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def header(study: Study, columns: list[Column]) -> list[str]:
    return [*study.rows, *(["group"] if study.table == TableKind.ledger else []), *(c.name for c in columns)]


def write(study: Study, rows: list[Row], columns: list[Column], folder: Path) -> tuple[Path, Path]:
    """table.csv (values as Python writes them: floats round-trip exactly) and table.md (each column's format)."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = folder / "table.csv", folder / "table.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header(study, columns))
        for r in rows:
            w.writerow([*r.keys, *("" if r.values[c.name] is None else repr(r.values[c.name])
                                   if isinstance(r.values[c.name], float) else r.values[c.name]
                                   for c in columns)])
    lines = ["| " + " | ".join(header(study, columns)) + " |", "|" + "---|" * len(header(study, columns))]
    for r in rows:
        lines.append("| " + " | ".join([*r.keys, *(fmt(r.values[c.name], c) for c in columns)]) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def fmt(v: Any, column: Column) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return "nan" if isinstance(v, float) and math.isnan(v) else format(v, column.fmt)
    return str(v)


def _parse(text: str) -> Any:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def read(study: Study, columns: list[Column], csv_path: Path) -> dict[str, dict[str, Any]]:
    """A committed table.csv: row id -> column -> value. Its header must be the study's (a renamed column is a
    changed study: commit its table again with `--update`)."""
    with open(csv_path, newline="") as f:
        lines = list(csv.reader(f))
    want = header(study, columns)
    if not lines or lines[0] != want:
        raise StudyError(f"{csv_path}: header {lines[0] if lines else []} is not the study's {want}; the study changed "
                         "since its results were committed (re-run with --update and commit them)")
    n = len(want) - len(columns)
    return {ROW_SEP.join(line[:n]): {c.name: _parse(v) for c, v in zip(columns, line[n:])} for line in lines[1:]}
