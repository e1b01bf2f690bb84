"""Re-run a study into a fresh dir and check its committed numbers: qlora-lab reproduce experiments/<name>.

  qlora-lab reproduce experiments/lora_rank                  # scale ci: a few steps of the same runs, on the CPU
  qlora-lab reproduce experiments/lora_rank --scale full     # what the committed numbers came from
  qlora-lab reproduce experiments/lora_rank --scale full --update   # and make them the committed numbers

Every run of the study is composed against conf/ first (a key conf/ no longer has fails here, named). Then each
runs as train.py runs it, the study's table and plots are made from what the runs wrote, and every committed
number (results/<scale>/table.csv) is compared with the new one under its column's tolerance, printed side by
side with the config keys, lock and device that differ between the two. Exit status: 0 all within tolerance, 1 a
number outside it (or gone), 2 the study cannot run as declared. On another device kind than the one the scale's
numbers were measured on, only the numbers that do not depend on the device (the `exact` columns) are compared.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from qlora_lab.configs import register_configs
from qlora_lab.sinks.provenance import CHECKOUT, device_info
from qlora_lab.study import check, execute, plots, spec, table
from qlora_lab.study.now import provenance_now

log = logging.getLogger(__name__)

RESULTS = "results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", type=Path, help="the study's folder, e.g. experiments/lora_rank")
    p.add_argument("--scale", default="ci", help="ci (a few steps, CPU; the default) or full (the committed numbers)")
    p.add_argument("--out", type=Path, help="the fresh dir to run into (default outputs/studies/<name>/<scale>_<time>)")
    p.add_argument("--cache-dir", help="cache_dir for the runs (built models, tokenized data; default conf's)")
    p.add_argument("--update", action="store_true",
                   help="write the new table, runs.json and plots into the study's results/<scale>/ (and its README)")


def main(args: argparse.Namespace) -> int:
    register_configs()
    try:
        study = spec.load(args.study)
        scale = study.scale(args.scale)
        problems = spec.check_composes(study)
        if problems:
            raise spec.StudyError("the study's runs do not compose against conf/:\n  " + "\n  ".join(problems))
        committed_dir = Path(study.path) / RESULTS / args.scale
        columns = study.columns_at(args.scale)
        committed = (table.read(study, columns, committed_dir / "table.csv")
                     if (committed_dir / "table.csv").is_file() else None)
        if committed is None and not args.update:
            raise spec.StudyError(f"{committed_dir / 'table.csv'}: nothing committed at scale {args.scale}; make it "
                                  "with --update and commit it")
        out = args.out or Path("outputs/studies") / study.name / f"{args.scale}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
        log.info(f"study {study.name} at scale {args.scale} into {out}: {study.question}")
        outcome = execute.run_scale(study, args.scale, out, args.cache_dir)
        rows = table.build(study, outcome.jobs, columns)
        table.write(study, rows, columns, out)
        drawn, pending = [], []
        for p in study.plots_at(args.scale):
            if p.needs == spec.Needs.device and outcome.skipped:  # its runs need the scale's device: pending here
                pending.append(p.file)
            else:
                drawn.append(plots.draw(study, p, rows, outcome.jobs, out))
        record = runs_record(study, args.scale, rows, outcome, out)
        record["pending_plots"] = pending
        (out / "runs.json").write_text(json.dumps(record, indent=1, default=str))
    except spec.StudyError as e:
        log.error(str(e))
        return 2
    log.info(f"table {out / 'table.md'}" + (f", plots {', '.join(str(p) for p in drawn)}" if drawn else "")
             + (f"; pending (their runs need a {scale.device} device): {', '.join(pending)}" if pending else ""))
    status = 0
    if committed is not None:
        old_record = _read_json(committed_dir / "runs.json")
        same_device = outcome.device == scale.device
        log.info("\n".join(differences(old_record, record, rows, scale.device, outcome.device)))
        verdicts = check.compare(columns, committed, rows, same_device=same_device,
                                 skipped_runs=bool(outcome.skipped))
        log.info(f"{study.name} ({args.scale}): committed ({committed_dir / 'table.csv'}) vs new ({out}):\n"
                 + check.report(verdicts))
        bad = [v for v in verdicts if v.failed]
        if bad:
            log.error(f"{study.name} ({args.scale}): {len(bad)} number(s) outside their tolerance or missing: "
                      + "; ".join(f"{v.row} {v.column.name} {v.status} ({v.note})" for v in bad[:8]))
            status = 1
        else:
            log.info(f"{study.name} ({args.scale}): reproduced")
    if args.update:
        update(study, args.scale, out, drawn)
        log.info(f"committed numbers of {study.name} at scale {args.scale} updated in {committed_dir}")
    return status


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def portable(value: Any, out: Path | None = None) -> Any:
    """`value` (a config) with the machine's paths taken out: a path inside the checkout relative to it
    (`src/qlora_lab/assets/...`), one inside the study's output dir as `<out>/...`; what a committed runs.json holds
    is the same on every machine that makes it."""
    roots = ([(str(out.resolve()), "<out>/")] if out else []) + [(str(CHECKOUT), "")]

    def one(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: one(x) for k, x in v.items()}
        if isinstance(v, list):
            return [one(x) for x in v]
        if isinstance(v, str):
            for root, prefix in roots:
                if v == root or v.startswith(f"{root}/"):
                    return prefix + (v[len(root) + 1:] or ("." if not prefix else ""))
        return v

    return one(value)


def runs_record(study: spec.Study, scale: str, rows: list[table.Row], outcome: execute.Outcome,
                out: Path | None = None) -> dict[str, Any]:
    """runs.json: where and with what this table was made: the device, date, code, lock, and each row's resolved
    config (what a later reproduction diffs against), its paths made portable."""
    first = outcome.jobs[0] if outcome.jobs else None
    return {"study": study.name, "scale": scale, "date": time.strftime("%Y-%m-%d"),
            "device": first.device if first else device_info(outcome.device),
            "provenance": provenance_now(),
            "skipped_runs": [" ".join(c.args) for c in outcome.skipped],
            "rows": {r.id: portable(r.jobs[0].config, out) for r in rows}}


def differences(old: dict[str, Any], new: dict[str, Any], rows: list[table.Row], recorded_kind: str,
                here: str) -> list[str]:
    """What differs between the committed numbers' runs and these: device, code, lock, each row's config."""
    lines = ["then vs now:"]
    if recorded_kind != here:
        lines.append(f"  device: the committed numbers were measured on {recorded_kind} "
                     f"({_device_name(old.get('device', {}))}), this machine is {here}: only the columns that do not "
                     "depend on the device (exact) are compared")
    elif _device_name(old.get("device", {})) != _device_name(new["device"]):
        lines.append(f"  device: {_device_name(old.get('device', {}))} -> {_device_name(new['device'])}")
    if old.get("skipped_runs"):
        lines.append(f"  the committed numbers were made without the {len(old['skipped_runs'])} run(s) that need a "
                     f"{recorded_kind} device: their columns are pending there (compared once committed)")
    po, pn = old.get("provenance", {}), new["provenance"]
    if po.get("git_commit") != pn.get("git_commit"):
        lines.append(f"  git commit: {str(po.get('git_commit'))[:12]} -> {str(pn.get('git_commit'))[:12]}")
    lo, ln = (po.get("uv_lock") or {}).get("sha256"), (pn.get("uv_lock") or {}).get("sha256")
    if lo != ln:
        lines.append(f"  uv.lock: {str(lo)[:12]} -> {str(ln)[:12]} (library versions may move measured numbers)")
    changed = [f"{k} {v} -> {pn['packages'].get(k)}" for k, v in (po.get("packages") or {}).items()
               if pn["packages"].get(k) != v and k != "qlora-lab"]
    if changed:
        lines.append("  packages: " + ", ".join(changed))
    by_diff: dict[tuple[str, ...], list[str]] = {}
    for r in rows:
        if r.id in old.get("rows", {}):
            diff = tuple(check.config_differences(old["rows"][r.id], new["rows"][r.id]))
            if diff:
                by_diff.setdefault(diff, []).append(r.id)
    for diff, ids in by_diff.items():
        lines.append(f"  config of {', '.join(ids)}:\n" + "\n".join(f"    {d}" for d in diff))
    return lines if len(lines) > 1 else ["then vs now: the same device, commit, lock and configs"]


def _device_name(d: dict[str, Any]) -> str:
    threads = d.get("cpu_threads", "?")
    return d.get("gpu") or f"{d.get('cpu') or d.get('device', '?')}, {threads} thread{'' if threads == 1 else 's'}"


MARK = re.compile(r"(<!-- results:(\w+) -->\n).*?(<!-- /results:\2 -->)", re.S)


def update(study: spec.Study, scale: str, out: Path, drawn: list[Path]) -> None:
    """The new results become the committed ones: results/<scale>/ and the table in the README between
    `<!-- results:<scale> -->` and `<!-- /results:<scale> -->`."""
    dest = Path(study.path) / RESULTS / scale
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("table.csv", "table.md", "runs.json"):
        shutil.copy(out / name, dest / name)
    for p in drawn:
        shutil.copy(p, dest / p.name)
    readme = Path(study.path) / "README.md"
    if readme.is_file():
        record = json.loads((out / "runs.json").read_text())
        note = (f"\n_{_device_name(record['device'])}, {record['date']}, commit "
                f"{str(record['provenance'].get('git_commit'))[:10]}: `qlora-lab reproduce {study.path} "
                f"--scale {scale}`_\n")
        if record.get("skipped_runs"):
            note += (f"\n_Pending: {len(record['skipped_runs'])} run(s) that need a {study.scale(scale).device} device "
                     "were skipped where these numbers were made; their columns are empty"
                     + (f" and {', '.join(record['pending_plots'])} not drawn" if record.get("pending_plots") else "")
                     + " until `qlora-lab reproduce ... --update` runs on one._\n")
        text = readme.read_text()
        new = MARK.sub(lambda m: m.group(1) + (out / "table.md").read_text() + note + m.group(3)
                       if m.group(2) == scale else m.group(0), text)
        readme.write_text(new)
