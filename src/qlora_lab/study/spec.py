"""What a study declares (experiments/<name>/study.yaml), typed: a misspelt field of the study itself fails on load,
and every run's overrides are composed against conf/ before anything runs, so a key that was renamed or removed
fails with its name (`check_composes`).

    name: lora_rank
    question: Which LoRA rank learns the string tasks best per step and per GiB?
    runs:                              # train.py commands; a sweep value (`a,b`) makes one a sweep (-m)
      - args: [experiment=smollm2_strings, "lora.r=8,16,32"]
    scales:                            # full: what the committed numbers came from; ci: a few steps of the same
      full: {device: cpu, overrides: []}
      ci: {device: cpu, overrides: [optim.max_steps=2]}
    rows: [lora.r]                     # config keys that name a row (each job's resolved config)
    columns:                           # each with where it comes from and the tolerance a reproduction must meet
      - {name: eval_loss, of: summary/eval_loss, tolerance: abs 0.01, why: "measured: ..."}
    plots: [{kind: curves, file: loss_curves.png}]
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

STUDY_FILE = "study.yaml"
CONF = Path(__file__).resolve().parents[3] / "conf"  # src/qlora_lab/study/ -> the checkout (an editable install)


class DeviceKind(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


class Needs(StrEnum):
    any = "any"  # runs on any machine (a plan: the ledger needs no device)
    # a measurement of the scale's device: on a machine of another kind it is skipped, and the columns that depend
    # on the device are not compared anyway
    device = "device"


class TableKind(StrEnum):
    runs = "runs"  # a row per job
    ledger = "ledger"  # a row per group of memory-ledger components, per job


class PlotKind(StrEnum):
    curves = "curves"  # train loss (or `y`, a metrics.jsonl key) against the step, one line per job
    scatter = "scatter"  # column `y` against column `x`, a labelled point per row
    bars = "bars"  # column `y` per row


@dataclass
class Run:
    args: list[str]  # train.py's overrides (Hydra syntax); `key=a,b` sweeps it (one `-m` command)
    needs: Needs = Needs.any
    scales: list[str] = field(default_factory=list)  # the scales that run it (empty: all)


@dataclass
class Scale:
    device: DeviceKind  # the device kind the committed numbers of this scale were measured on
    overrides: list[str]  # added to every run's args at this scale
    note: str = ""  # what the scale stands for, how long it takes, where its committed numbers come from


@dataclass
class Column:
    name: str
    # Where the value comes from: summary/<key> | config:<dotted key> | metrics:<key>@<step> |
    # vs:<column>@<row key>=<value> (this row's value over the row's that differs only in that key) |
    # vs:<column>@<row id> (this row's value over that row's) |
    # ratio:<column>/<column> (of this row) | ledger:<component>+<component> (a job's ledger, summed); in a ledger
    # table: ledger:predicted_gib (the group's components) | ledger:measured_gib (its phase, on CUDA) | const:<key>
    of: str
    # exact | device-exact | abs X | rel X | ratio LO HI (new / committed) | show (not compared). An exact column is a
    # function of the config alone (compared on any device); a device-exact one of the config and the device kind (a
    # training run's ledger resolves `auto` dtypes and kernels for its device): exact, on the device kind of the scale
    # only; every other compared column is a measurement of the device.
    tolerance: str = "show"
    why: str = ""  # where the tolerance comes from (the measured noise), or why the number is exact
    fmt: str = ".4g"
    scales: list[str] = field(default_factory=list)  # the scales that have this column (empty: all)


@dataclass
class Group:
    """A row of a `ledger` table: memory-ledger components summed (`peak`: the predicted peak), beside constants
    (another source's figure for the same thing) and, on CUDA, the measured phase (`step_peak`: the run's peak)."""

    row: str
    components: list[str]
    phase: Optional[str] = None
    consts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plot:
    kind: PlotKind
    file: str
    x: str = ""
    y: str = ""
    scales: list[str] = field(default_factory=list)  # the scales that draw it (empty: all)
    # device: drawn from runs that need the scale's device; on another machine it is pending, not an error
    needs: Needs = Needs.any


@dataclass
class Study:
    name: str
    question: str
    runs: list[Run]
    scales: dict[str, Scale]
    rows: list[str]
    columns: list[Column]
    plots: list[Plot] = field(default_factory=list)
    table: TableKind = TableKind.runs
    groups: list[Group] = field(default_factory=list)
    path: str = ""  # the study's folder (set on load)

    def scale(self, name: str) -> Scale:
        if name not in self.scales:
            raise StudyError(f"{self.path}: no scale '{name}' (it has: {', '.join(self.scales)})")
        return self.scales[name]

    def columns_at(self, scale: str) -> list[Column]:
        """The columns of the table at `scale` (a column may be one scale's: a GPU measurement, a longer run's)."""
        return [c for c in self.columns if not c.scales or scale in c.scales]

    def plots_at(self, scale: str) -> list[Plot]:
        return [p for p in self.plots if not p.scales or scale in p.scales]


class StudyError(Exception):
    """A study that cannot run as declared (a bad study.yaml, a key conf/ does not have)."""


TOLERANCE = re.compile(r"^(exact|device-exact|show|abs \S+|rel \S+|ratio \S+ \S+)$")


def load(folder: str | Path) -> Study:
    """The study in `folder` (experiments/<name>/), checked as a whole: every problem listed at once."""
    folder = Path(folder)
    path = folder / STUDY_FILE
    if not path.is_file():
        raise StudyError(f"{folder}: no {STUDY_FILE}; a study is a folder with a study.yaml (see experiments/)")
    try:
        raw = OmegaConf.merge(OmegaConf.structured(Study), OmegaConf.load(path))
        study: Study = OmegaConf.to_object(raw)
    except Exception as e:  # an unknown field, a wrong type, a missing one: OmegaConf names it
        raise StudyError(f"{path}: {e}") from e
    study.path = str(folder)
    problems = []
    if study.name != folder.name:
        problems.append(f"name: {study.name!r} is not the folder's name {folder.name!r}")
    if "ci" not in study.scales or "full" not in study.scales:
        problems.append(f"scales: needs both `full` and `ci` (has {sorted(study.scales)})")
    names = [c.name for c in study.columns]
    for scale in study.scales:
        at = [c.name for c in study.columns_at(scale)]
        problems += [f"columns: {n!r} twice at scale {scale}" for n in sorted({n for n in at if at.count(n) > 1})]
    problems += [f"{what}.scales: {s!r} is not a scale" for what, item in
                 [*((f"columns.{c.name}", c) for c in study.columns), *((f"runs[{i}]", r) for i, r in
                                                                       enumerate(study.runs)),
                  *((f"plots.{p.file}", p) for p in study.plots)]
                 for s in item.scales if s not in study.scales]
    for c in study.columns:
        if not TOLERANCE.match(c.tolerance):
            problems.append(f"columns.{c.name}.tolerance: {c.tolerance!r} is not one of exact | device-exact | show | "
                            "abs X | rel X | ratio LO HI")
        if c.of.startswith("vs:") and c.of[3:].split("@")[0] not in names:
            problems.append(f"columns.{c.name}.of: {c.of!r} names no column")
        if c.of.startswith("ratio:") and not set(c.of[6:].split("/")) <= set(names):
            problems.append(f"columns.{c.name}.of: {c.of!r} names no column")
    if (study.table == TableKind.ledger) != bool(study.groups):
        problems.append("groups: a ledger table needs groups, and only a ledger table has them")
    for p in study.plots:
        for axis in (p.x, p.y) if p.kind != PlotKind.curves else ():
            if axis and axis not in names:
                problems.append(f"plots.{p.file}: {axis!r} is not a column")
    if problems:
        raise StudyError(f"{path}: " + "; ".join(problems))
    return study


@dataclass(frozen=True)
class Command:
    """One train.py command of a study at a scale: its overrides, and each job it expands to (a sweep's product)."""

    index: int
    args: list[str]
    needs: Needs
    jobs: list[list[str]]

    @property
    def sweep(self) -> bool:
        return len(self.jobs) > 1 or any(o.is_sweep_override() for o in _parse(self.args))

    @property
    def plan(self) -> bool:
        return any(a.replace(" ", "") == "mode=plan" for a in self.args)


def _parse(args: list[str]):
    return OverridesParser.create().parse_overrides(list(args))


def expand(args: list[str]) -> list[list[str]]:
    """The jobs of a command: one override list per point of its sweep's product (a single run: itself)."""
    parsed = _parse(args)
    choices = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    return [list(job) for job in itertools.product(*choices)]


def commands(study: Study, scale: str) -> list[Command]:
    """The study's train.py commands at `scale`: each run's args with the scale's overrides, a scale's override of a
    key (or group) the run sets replacing the run's (`model=tiny` for `model=phi4_mini_shape`), and the study's name."""
    extra = list(study.scale(scale).overrides)
    replaced = {o.key_or_group for o in _parse(extra)}
    out = []
    for i, run in enumerate(study.runs):
        if run.scales and scale not in run.scales:
            continue
        kept = [o.input_line for o in _parse(run.args) if o.key_or_group not in replaced]
        args = [*kept, *extra, f"study={study.name}"]
        out.append(Command(i, args, run.needs, expand(args)))
    return out


def _stale_key(message: str) -> str | None:
    """The key or group option a Hydra composition error is about, when it names one."""
    m = re.search(r"Could not (?:override|append to config)\S* '([^']+)'", message) \
        or re.search(r"Key '([^']+)' (?:is not in struct|not in)", message) \
        or re.search(r"Could not find '([^']+)'", message) \
        or re.search(r"full_key: (\S+)", message)
    return m.group(1) if m else None


def check_composes(study: Study) -> list[str]:
    """Every job of every scale composed against conf/ and the typed schema, as train.py would compose it: the
    problems, each naming the study, the scale, the job and the key conf/ no longer has (empty: all compose)."""
    from hydra import compose, initialize_config_dir

    problems = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for scale in study.scales:
            for cmd in commands(study, scale):
                for job in cmd.jobs:
                    overrides = [o for o in job if not o.lstrip("+~").startswith("hydra")]
                    try:
                        cfg = compose(config_name="train", overrides=[
                            *overrides, "output_dir=/nonexistent", "run_name=check", "sweep_id=null"])
                        OmegaConf.to_object(cfg)  # the typed schema: a wrong type or an unknown choice fails here
                    except Exception as e:
                        msg = " ".join(str(e).split())
                        key = _stale_key(msg)
                        what = f"`{key}` is not a key (or option) of conf/ any more" if key else "does not compose"
                        problems.append(f"{study.path}/{STUDY_FILE}, scale {scale}, run {cmd.index + 1} "
                                        f"({' '.join(job)}): {what}: {msg[:400]}")
                        break  # one message per command is enough
    return problems


def job_values(config: dict[str, Any], keys: list[str]) -> list[Any]:
    out = []
    for dotted in keys:
        node: Any = config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out.append(node)
    return out
