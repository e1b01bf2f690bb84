"""summary.json: how a run ended and its headline numbers, valid JSON (a non-finite number is written as null)."""

from __future__ import annotations

import logging
import json
import math
from pathlib import Path
from typing import Any

from qlora_lab.core.errors import BadFile, RunDirInUse, Status, classify
from qlora_lab.core.files import read_json
from qlora_lab.core.scrub import scrub

log = logging.getLogger(__name__)

SUMMARY = "summary.json"


def json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """NaN and inf have no JSON spelling: they become null, which every reader can parse."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def write_summary(run_dir: Path, values: dict[str, Any]) -> None:
    """summary.json, written whole (beside it, then renamed) and scrubbed of credentials (a reason may quote one)."""
    path = Path(run_dir) / SUMMARY
    tmp = path.with_name(f".{SUMMARY}.tmp")
    tmp.write_text(json.dumps(scrub(json_safe(values)), indent=2, default=str, allow_nan=False))
    tmp.replace(path)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json (None: there is none); BadFile, one line, if it is not JSON."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    return read_json(path, f"it is not a summary qlora-lab wrote whole; move it out of {Path(run_dir)} (the run's "
                           "other records stay as they are) and run the command again")


def ending(exc: BaseException) -> dict[str, Any]:
    """How a run that raised `exc` ended: its status and the reason."""
    return {"summary/status": str(classify(exc)), "summary/reason": f"{type(exc).__name__}: {str(exc)[:500]}"}


def failure_summary(run_dir: Path, exc: BaseException) -> dict[str, Any]:
    """The summary of a run that ended with `exc`: why it ended, on top of what it had already recorded. A failure
    an inner layer already recorded is kept (it is closer to the cause)."""
    summary = read_summary(run_dir) or {}
    if Status(summary.get("summary/status", Status.finished)).ok:
        summary.update(ending(exc))
    return summary


def record_failure(run_dir: Path, exc: BaseException) -> dict[str, Any]:
    """Write why a run ended into its summary.json; returns that summary. A run dir that holds another run is left
    alone, and a run dir that cannot be written is said so on stderr: the failure itself is what gets raised."""
    if isinstance(exc, RunDirInUse):  # its summary.json is the earlier run's
        return ending(exc)
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        summary = failure_summary(run_dir, exc)
        write_summary(run_dir, summary)
    except (OSError, ValueError, BadFile) as e:  # read-only, full, or an unreadable earlier summary.json
        log.warning(f"could not record the failure in {Path(run_dir) / SUMMARY} "
                    f"({type(e).__name__}: {e})")
        summary = ending(exc)
    return summary
