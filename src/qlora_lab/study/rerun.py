"""Re-execute one recorded run from its run_info.json into a new dir and compare its loss curve: qlora-lab rerun RUN_DIR.

  qlora-lab rerun outputs/runs/<run>                     # into outputs/reruns/<time>_<run name>
  qlora-lab rerun outputs/runs/<run> --out DIR --allow-data-change

What runs is the recorded resolved config (every `auto` as it was resolved then), not today's defaults: the run
as it ran. First every difference between then and now is reported (git commit and working tree, uv.lock, the
installed packages, the device, the dataset's fingerprint, and what the recorded command would compose to today);
a different dataset is refused unless --allow-data-change. Then the run trains into the new dir, with the thread
count it had, and its train loss is compared step by step with the recorded one.

Tolerance: on the CPU with the same lock the curve is expected bit-exact (the default, --rtol 0: dropout masks are
a function of the seed, the sample order is seeded, and the same kernels run the same reductions in the same order
on the same thread count). On CUDA the default is a relative 1e-3 per step: the same code and lock on the same GPU
model run the same kernels, but some backward kernels (attention, atomics-based reductions) are not
deterministic run to run, and bf16 carries any last-bit difference forward; on another GPU model cuBLAS picks other
algorithms. Exit status: 0 within tolerance, 1 outside it, 2 refused (a different dataset, a run that cannot run here).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from qlora_lab.configs import register_configs, typed
from qlora_lab.data.rows import fingerprint, read_rows
from qlora_lab.runner.run import run
from qlora_lab.sinks.provenance import device_info
from qlora_lab.study.check import config_differences
from qlora_lab.study.execute import device_kind
from qlora_lab.study.now import diff_sha, provenance_now
from qlora_lab.study.spec import CONF

log = logging.getLogger(__name__)

CUDA_RTOL = 1e-3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run dir holding run_info.json and metrics.jsonl")
    p.add_argument("--out", type=Path, help="the new run dir (default outputs/reruns/<time>_<run name>)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="re-execute even though the dataset's content differs from the recorded fingerprint")
    p.add_argument("--rtol", type=float, help=f"relative tolerance per step (default: 0 on the CPU, {CUDA_RTOL} on CUDA)")
    p.add_argument("--cache-dir", help="cache_dir for the rerun (default: the recorded one)")


def then_vs_now(info: dict[str, Any], run_dir: Path, data_now: str) -> list[str]:
    """Every difference between the recorded run's code, environment, device and data and this machine's."""
    now, lines = provenance_now(), []
    if info.get("git_commit") != now["git_commit"]:
        lines.append(f"git commit: {str(info.get('git_commit'))[:12]} -> {str(now['git_commit'])[:12]}")
    patch = run_dir / "git_diff.patch"
    then_diff = diff_sha(patch.read_text()) if patch.is_file() else None
    if bool(info.get("git_dirty")) != now["git_dirty"] or then_diff != now["git_diff_sha"]:
        then = f"dirty (git_diff.patch {then_diff})" if info.get("git_dirty") else "clean"
        lines.append(f"working tree: {then} -> {'dirty (diff ' + str(now['git_diff_sha']) + ')' if now['git_dirty'] else 'clean'}")
    lock_then, lock_now = info.get("uv_lock") or {}, now["uv_lock"] or {}
    if lock_then.get("sha256") != lock_now.get("sha256"):
        lines.append(f"uv.lock: {str(lock_then.get('sha256'))[:12]} -> {str(lock_now.get('sha256'))[:12]}")
    if lock_now and not lock_now.get("matches_installed"):
        lines.append(f"installed packages differ from uv.lock now: {lock_now.get('differences')}")
    for name, v in (info.get("packages") or {}).items():
        if now["packages"].get(name) != v and name != "qlora-lab":
            lines.append(f"package {name}: {v} -> {now['packages'].get(name)}")
    dev_then, dev_now = info.get("device") or {}, device_info(device_kind())
    for k in ("device", "gpu", "cuda", "capability", "cpu", "cpu_threads", "platform", "python"):
        if dev_then.get(k) != dev_now.get(k) and (k in dev_then or k in dev_now):
            lines.append(f"device {k}: {dev_then.get(k)} -> {dev_now.get(k)}")
    if info.get("dataset_fingerprint") != data_now:
        lines.append(f"dataset fingerprint: {info.get('dataset_fingerprint')} -> {data_now}")
    return lines


def composed_today(info: dict[str, Any]) -> list[str]:
    """What the recorded command's overrides compose to with today's conf/, against the recorded config: defaults
    that changed since (a rerun runs the recorded config, so they do not change it; a fresh `python train.py` with
    the same command would)."""
    from hydra import compose, initialize_config_dir

    overrides = [o for o in info.get("overrides", []) if not o.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*overrides, "output_dir=x", "run_name=x", "sweep_id=null"])
        today = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:
        return [f"the recorded command no longer composes today: {' '.join(str(e).split())[:300]}"]
    for key, (before, after) in (info.get("resolved") or {}).items():  # `auto` as it was resolved then
        *path, leaf = key.split(".")
        holder = today
        for part in path:
            holder = holder.get(part, {}) if isinstance(holder, dict) else {}
        if isinstance(holder, dict) and holder.get(leaf) == before:
            holder[leaf] = after
    return config_differences(info["config"], today)


def curve(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("train/loss") is not None:
            out[rec["step"]] = rec["train/loss"]
    return out


def compare_curves(then: dict[int, float], now: dict[int, float], rtol: float) -> tuple[bool, str]:
    steps = sorted(set(then) & set(now))
    if not steps or set(then) != set(now):
        return False, f"steps differ: recorded {len(then)} steps, rerun {len(now)} ({len(steps)} in common)"
    diffs = [(s, abs(now[s] - then[s]), abs(now[s] - then[s]) / abs(then[s]) if then[s] else math.inf * (now[s] != then[s]))
             for s in steps]
    exact = sum(d == 0 for _, d, _ in diffs)
    worst = max(diffs, key=lambda d: d[2])
    first = next((s for s, d, _ in diffs if d != 0), None)
    ok = all(r <= rtol for _, _, r in diffs)
    text = (f"{len(steps)} steps compared: {exact} bit-identical; max |diff| {max(d for _, d, _ in diffs):.3g}, max "
            f"relative {worst[2]:.3g} (step {worst[0]})" + (f", first difference at step {first}" if first else "")
            + f"; tolerance rtol {rtol:g}: {'within' if ok else 'OUTSIDE'}")
    return ok, text


def main(args: argparse.Namespace) -> int:
    register_configs()
    run_dir = args.run_dir
    info_path = run_dir / "run_info.json"
    if not info_path.is_file() or not (run_dir / "metrics.jsonl").is_file():
        log.error(f"{run_dir}: no run_info.json and metrics.jsonl; give the dir of a run train.py wrote")
        return 2
    info = json.loads(info_path.read_text())
    try:
        cfg = typed(info["config"])  # a key the schema no longer has fails here, named
    except Exception as e:
        log.error(f"{info_path}: the recorded config does not fit today's schema: {' '.join(str(e).split())[:400]}")
        return 2
    data_now = fingerprint(read_rows(OmegaConf.to_object(cfg.data)))
    diffs = then_vs_now(info, run_dir, data_now)
    today = composed_today(info)
    log.info(f"rerun of {run_dir}: then vs now:\n" + ("\n".join(f"  {d}" for d in diffs) or "  nothing differs")
             + ("\n  the recorded command composed today would differ in (the rerun runs the recorded config):\n"
                + "\n".join(f"    {d}" for d in today) if today else ""))
    recorded_kind = (info.get("device") or {}).get("device", "cpu")
    if recorded_kind != device_kind():
        log.error(f"the run ran on {recorded_kind}; this machine is {device_kind()}: rerun it on a {recorded_kind} "
                  "machine (the recorded config names its device)")
        return 2
    if info.get("dataset_fingerprint") != data_now and not args.allow_data_change:
        log.error(f"the dataset ({cfg.data.path}) is not the one the run trained on (fingerprint "
                  f"{info.get('dataset_fingerprint')} then, {data_now} now): refused; pass --allow-data-change to rerun "
                  "on today's rows")
        return 2
    out = args.out or Path("outputs/reruns") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{cfg.run_name}"
    if out.exists() and any(out.iterdir()):
        log.error(f"{out} is not empty: a rerun goes into a new dir")
        return 2
    for key, value in {"output_dir": str(out), "resume": None, "overwrite": False, "sweep_id": None,
                       "tags": [*cfg.tags, "rerun"], **({"cache_dir": args.cache_dir} if args.cache_dir else {})}.items():
        OmegaConf.update(cfg, key, value, force_add=False)
    threads = (info.get("device") or {}).get("cpu_threads")
    if recorded_kind == "cpu" and threads and threads != torch.get_num_threads():
        log.info(f"torch threads {torch.get_num_threads()} -> {threads}, as the run had (reductions split by thread)")
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    run(cfg, overrides=list(info.get("overrides", [])))
    rtol = args.rtol if args.rtol is not None else (0.0 if recorded_kind == "cpu" else CUDA_RTOL)
    ok, text = compare_curves(curve(run_dir), curve(out), rtol)
    log.info(f"loss curve, {run_dir} vs {out}: {text}")
    return 0 if ok else 1
