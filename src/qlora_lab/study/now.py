"""What this checkout and environment are now, in run_info.json's terms: what a reproduction compares then with."""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
from typing import Any

from qlora_lab.sinks.provenance import CHECKOUT, PACKAGES, lock_info


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def diff_sha(diff: str | None) -> str | None:
    """A short hash of a working tree's diff: two dirty trees with the same changes hash alike."""
    return hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None


def provenance_now() -> dict[str, Any]:
    commit, diff = git("rev-parse", "HEAD"), git("diff", "HEAD")
    return {"git_commit": commit.strip() if commit else None, "git_dirty": bool(diff), "git_diff_sha": diff_sha(diff),
            "uv_lock": lock_info(), "packages": versions()}
