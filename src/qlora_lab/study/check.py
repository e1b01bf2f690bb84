"""Committed numbers against reproduced ones, each under its column's tolerance, side by side; and what differs
between the runs that made them (config keys by what they affect, the lock, the device), so that a number that
moved comes with the reason it may have moved.

A column's tolerance says what kind of number it is:
- `exact`: a function of the config alone (the ledger's prediction, parameter counts): any machine, any device;
- `device-exact`: a function of the config and the device kind (a training run's ledger, whose `auto` dtypes and
  kernels resolve for its device): exact, on the scale's device kind only;
- `abs X` / `rel X`: a measurement whose noise was measured (losses, task metrics): X is that noise, said in `why`;
- `ratio LO HI`: a speed, which varies with the machine and its load: new / committed within [LO, HI];
- `show`: shown, never compared (a constant, another source's figure).
On a device kind other than the one a scale's numbers were measured on, only `exact` columns are compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qlora_lab.configs import key_table
from qlora_lab.core.effects import declared
from qlora_lab.core.flat import flatten
from qlora_lab.study.spec import Column
from qlora_lab.study.table import Row, fmt

OK, OUTSIDE, MISSING, NEW, NOT_COMPARED = "ok", "OUTSIDE", "MISSING", "new", "-"


@dataclass
class Verdict:
    row: str
    column: Column
    committed: Any
    new: Any
    status: str  # ok | OUTSIDE | MISSING | new | - (not compared)
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in (OUTSIDE, MISSING)


def device_independent(column: Column) -> bool:
    return column.tolerance == "exact"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def within(tolerance: str, committed: Any, new: Any) -> tuple[bool, str]:
    """Whether `new` reproduces `committed` under `tolerance`, and the measure of the difference."""
    kind, *args = tolerance.split()
    if kind in ("exact", "device-exact") or not (_number(committed) and _number(new)):
        return committed == new or (_number(committed) and _number(new) and math.isnan(committed)
                                    and math.isnan(new)), ("equal" if committed == new else "differs")
    diff = new - committed
    if kind == "abs":
        return abs(diff) <= float(args[0]), f"{diff:+.3g}"
    if kind == "rel":
        rel = abs(diff) / abs(committed) if committed else math.inf * (diff != 0)
        return rel <= float(args[0]) or diff == 0, f"{diff / committed * 100 if committed else 0:+.2f}%"
    if kind == "ratio":
        ratio = new / committed if committed else math.inf
        return float(args[0]) <= ratio <= float(args[1]), f"x{ratio:.2f}"
    raise ValueError(tolerance)


def compare(columns: list[Column], committed: dict[str, dict[str, Any]], rows: list[Row], *, same_device: bool,
            skipped_runs: bool) -> list[Verdict]:
    """Every committed number against the new one. `same_device`: the scale's numbers were measured on this device
    kind (else only exact columns count); `skipped_runs`: some runs could not run here (their numbers are absent)."""
    new = {r.id: r.values for r in rows}
    out = []
    for rid in [*committed, *(r for r in new if r not in committed)]:
        for c in columns:
            old, now = committed.get(rid, {}).get(c.name), new.get(rid, {}).get(c.name)
            if c.tolerance == "show":
                out.append(Verdict(rid, c, old, now, NOT_COMPARED, "shown"))
            elif not same_device and not device_independent(c):
                out.append(Verdict(rid, c, old, now, NOT_COMPARED, "device-dependent"))
            elif old is None:
                out.append(Verdict(rid, c, old, now, NEW if now is not None else NOT_COMPARED,
                                   "not committed" if now is not None else ""))
            elif now is None:
                absent = skipped_runs and not device_independent(c)
                out.append(Verdict(rid, c, old, now, NOT_COMPARED if absent else MISSING,
                                   "its run needs another device" if absent else
                                   ("no such row now" if rid not in new else "no value now")))
            else:
                ok, how = within(c.tolerance, old, now)
                out.append(Verdict(rid, c, old, now, OK if ok else OUTSIDE, how))
    return out


def report(verdicts: list[Verdict]) -> str:
    """The side-by-side table: every number committed or measured, with its tolerance and verdict (the columns a
    study only shows, and numbers neither side has, left out)."""
    head = ("row", "column", "committed", "new", "tolerance", "diff", "verdict")
    shown = [v for v in verdicts if v.column.tolerance != "show" and (v.status != NOT_COMPARED
                                                                        or v.committed is not None or v.new is not None)]
    body = [(v.row, v.column.name, fmt(v.committed, v.column), fmt(v.new, v.column), v.column.tolerance, v.note,
             v.status) for v in shown]
    widths = [min(40, max(len(str(x[i])) for x in [head, *body])) for i in range(len(head))]
    line = lambda cells: "  ".join(str(x)[:w].ljust(w) for x, w in zip(cells, widths)).rstrip()  # noqa: E731
    failed = sum(v.failed for v in verdicts)
    compared = sum(v.status in (OK, OUTSIDE, MISSING) for v in verdicts)
    tail = f"{compared} numbers compared, {failed} outside their tolerance or missing"
    return "\n".join([line(head), *(line(b) for b in body), tail])


def config_differences(committed: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys of two resolved configs that differ, each with what it affects (core/effects.py); locations are
    left out (where a run writes is not what it computes). Those that change what a run computes come first."""
    table = key_table(new)
    a, b = flatten(committed), flatten(new)
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) == b.get(k):
            continue
        d = declared(table, k) or declared(key_table(committed), k)
        if d is not None and d.effect.value == "location":
            continue
        effect = d.effect.value if d else "unknown key"
        moves = d is not None and d.effect.computes
        lines.append((0 if moves else 1, f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r} ({effect}"
                      + ("; changes what the run computes" if moves else "") + ")"))
    return [text for _, text in sorted(lines)]
