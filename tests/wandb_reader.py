"""Read an offline W&B run file (`run-<id>.wandb`) back, so tests check what W&B really recorded.

The file is a 7-byte header followed by LevelDB-log framed protobuf `Record`s (32 KiB blocks; each chunk has a
4-byte checksum, 2-byte length and 1-byte type: 1 full, 2 first, 3 middle, 4 last). The wandb package ships
the protobuf classes but no reader, hence these few lines.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + 7 <= len(raw):
        if BLOCK - pos % BLOCK < 7:  # a block tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunk = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""


def read_run(run_dir: Path) -> dict[str, Any]:
    """{'run': Record.run, 'config': {...}, 'history': [{...}], 'summary': {...}, 'artifacts': [Record.artifact],
    'dir': the offline run's dir} of the one run under run_dir."""
    runs = read_runs(run_dir)
    assert len(runs) == 1, f"expected one offline W&B run under {run_dir}, found {len(runs)}"
    return runs[0]


def read_runs(run_dir: Path) -> list[dict[str, Any]]:
    """Every offline W&B run file under run_dir (a resumed run adds one per resume), oldest first."""
    return [read_file(f) for f in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))]


def read_table(run: dict[str, Any], name: str) -> dict[str, Any]:
    """{'columns': [...], 'data': [[...], ...]} of the last table `name` logged to `run` (a read_file result). The
    history holds a reference ({name}/path); the rows are a JSON file under the offline run's files/."""
    refs = [h[f"{name}/path"] for h in run["history"] if f"{name}/path" in h]
    assert refs, f"no table {name} in the W&B run; history keys: {sorted({k for h in run['history'] for k in h})}"
    return json.loads((run["dir"] / "files" / refs[-1]).read_text())


def read_file(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"run": None, "config": {}, "history": [], "summary": {}, "artifacts": [],
                           "dir": Path(path).parent}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in rec.history.item})
        elif kind == "artifact":
            out["artifacts"].append(rec.artifact)
        elif kind == "summary":
            out["summary"].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in rec.summary.update})
    return out
