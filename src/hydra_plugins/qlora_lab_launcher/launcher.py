"""The sweep launcher (`hydra/launcher=qlab`, conf/train.yaml's default): it sees every job of a multirun at once.

Hydra's basic launcher hands jobs to the task function one by one, so no job can know that another shares its base.
This one composes every job first (Hydra's own per-job set-up: run dir, `.hydra/`, callbacks), then groups the jobs
that may train together (qlora_lab/runner/fuse.py: `sweep.fuse`), and runs each group in one process and every
other job in a process of its own, `sweep.max_parallel` of them side by side when the memory plan says they fit the
card together. With `sweep.fuse=false` and `sweep.max_parallel=1` it runs the jobs as the basic launcher does.
It lives in Hydra's `hydra_plugins` namespace because Hydra instantiates launchers from there only.
"""


import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("qlora_lab.launcher")


@dataclass
class QlabLauncherConf:
    _target_: str = "hydra_plugins.qlora_lab_launcher.launcher.QlabLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="qlab", node=QlabLauncherConf, provider="qlora-lab")


@dataclass
class _Prepared:
    """A job after Hydra's set-up: its config (resolved as the job sees it), overrides, name and Hydra's return."""

    cfg: DictConfig
    overrides: list[str]
    name: str
    ret: JobReturn


class QlabLauncher(Launcher):
    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _sweep_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = idx
            cfg.hydra.job.num = idx
        return cfg

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from qlora_lab.runner.sweep import refuse_under_launcher

        refuse_under_launcher()
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        sweep = self.config.sweep
        if self.config.mode == "train":
            self._refuse_bad_jobs(job_overrides, initial_job_idx)
        basic = self.config.mode != "train" or (str(sweep.fuse).lower() == "false" and str(sweep.max_parallel) == "1")
        if basic or len(job_overrides) == 1:
            if self.config.mode == "plan":
                self._print_groups(job_overrides, initial_job_idx)
            return [self._run_one(o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
        prepared = [self._prepare(o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
        units = _units(prepared)
        log.info("sweep: " + "; ".join((f"fused {len(u)}: " if len(u) > 1 else "alone: ")
                                        + ", ".join(prepared[i].name for i in u) for u in units))
        width = _parallel(prepared, units)
        lock = threading.Lock()  # one forkserver connection at a time
        if width > 1:
            log.info(f"sweep: up to {width} units side by side on the GPU (sweep.max_parallel)")
        from qlora_lab.runner import sweep as sweep_mod

        interrupted = False
        with ThreadPoolExecutor(max_workers=width) as pool:
            futures = [pool.submit(self._run_unit, [prepared[i] for i in u], sweep_dir, lock) for u in units]
            try:
                for f in futures:
                    f.result()
            except KeyboardInterrupt:  # Ctrl-C reaches this thread alone: the units' threads wait on their jobs
                interrupted = True
                for f in futures:
                    f.cancel()  # a unit not started never starts
                sweep_mod.stop_running()  # the running jobs checkpoint, record themselves interrupted and end
        if interrupted:
            table, _ = sweep_mod.report(sweep_dir)
            print(f"qlora-lab: sweep interrupted; jobs so far:\n{table}", file=sys.stderr)
            raise SystemExit(130)
        return [p.ret for p in prepared]

    def _run_one(self, overrides: Sequence[str], idx: int) -> JobReturn:
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                      config=self._sweep_config(overrides, idx), job_dir_key="hydra.sweep.dir",
                      job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def _prepare(self, overrides: Sequence[str], idx: int) -> _Prepared:
        """Hydra's set-up of one job (its run dir, `.hydra/`, callbacks) with a task that only keeps its config."""
        captured: dict[str, Any] = {}

        def capture(cfg: DictConfig) -> None:
            from hydra.core.hydra_config import HydraConfig

            captured["cfg"] = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
            captured["name"] = Path(HydraConfig.get().runtime.output_dir).name

        ret = run_job(hydra_context=self.hydra_context, task_function=capture,
                      config=self._sweep_config(overrides, idx), job_dir_key="hydra.sweep.dir",
                      job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        if ret.status != JobStatus.COMPLETED:  # its config did not resolve: Hydra says why when it is read
            return _Prepared(None, list(overrides), f"job{idx}", ret)
        from qlora_lab.configs import typed

        return _Prepared(typed(OmegaConf.to_container(captured["cfg"])), list(overrides), captured["name"], ret)

    def _run_unit(self, members: list[_Prepared], sweep_dir: Path, lock: threading.Lock) -> None:
        from qlora_lab.runner import sweep as sweep_mod

        live = []
        for p in members:
            done = sweep_mod.finished_before(p.cfg, p.name) if p.cfg is not None else None
            if done is not None:
                sweep_mod.record_skip(sweep_dir, p.name, p.overrides, p.cfg, done)
                p.ret.return_value = done.get("summary/final_loss", float("nan"))
            elif p.cfg is not None:
                live.append(p)
        if len(live) == 1:
            record = sweep_mod.run_job(live[0].cfg, live[0].overrides, sweep_dir, live[0].name, start_lock=lock)
            live[0].ret.return_value = record.get("summary/final_loss", float("nan"))
        elif live:
            records = sweep_mod.run_group([p.cfg for p in live], [p.overrides for p in live], sweep_dir,
                                          [p.name for p in live], start_lock=lock)
            for p, record in zip(live, records):
                p.ret.return_value = record.get("summary/final_loss", float("nan"))

    def _job_config(self, overrides: Sequence[str], idx: int) -> dict:
        """A job's config as a training run of it resolves it, without Hydra's per-job set-up (no run dir)."""
        c = self._sweep_config(overrides, idx)
        with open_dict(c):
            c.mode = "train"
            c.run_name = f"job{idx}"
            c.output_dir = "/nonexistent"
            c.sweep_id = "plan"
        return OmegaConf.to_container(OmegaConf.masked_copy(c, [k for k in c if k != "hydra"]), resolve=True)

    def _refuse_bad_jobs(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> None:
        """Every job's values checked before any job trains (`lora.r=16,0`: job 1 would fail only after job 0 had
        trained): a sweep with a job that cannot run is refused whole, each problem named with its job. A job whose
        config does not compose is left to Hydra's own message when it is set up."""
        from qlora_lab.configs import typed
        from qlora_lab.core.checks import config_problems
        from qlora_lab.runner.preflight import resolve_device

        lines = []
        common = set.intersection(*(set(o) for o in job_overrides)) if job_overrides else set()
        for i, o in enumerate(job_overrides):
            try:
                cfg = OmegaConf.to_object(typed(self._job_config(o, initial_job_idx + i)))
            except Exception:  # noqa: BLE001 - reported where Hydra sets the job up
                continue
            label = " ".join(x for x in filter_overrides(o) if x not in common) or "the defaults"
            lines += [f"  - job {initial_job_idx + i} ({label}): {p}"
                      for p in config_problems(cfg, resolve_device(cfg.device))]
        if lines:
            log.error(f"the sweep is refused before any job trains; {len(lines)} problem(s):\n" + "\n".join(lines))
            raise SystemExit(2)

    def _print_groups(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> None:
        """mode=plan -m: how a training run of this sweep would group its jobs, and each group's planned memory."""
        from qlora_lab.configs import typed
        from qlora_lab.memory import plan
        from qlora_lab.runner import fuse

        cfgs = [self._job_config(o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
        lines = []
        for g in fuse.groups(cfgs):
            tcfgs = [OmegaConf.to_object(typed(cfgs[i])) for i in g]
            if any(t.data.micro_batch_size == "auto" for t in tcfgs):
                note = "micro-batch auto: planned when the group starts"
            else:
                ledger = plan.predict_group(tcfgs)
                note = f"predicted peak {ledger.peak_gib:.2f} GiB ({ledger.card_gib:.2f} on the card)"
            lines.append(f"  {'fused' if len(g) > 1 else 'alone'} jobs {g}: {note}")
        print("qlora-lab: sweep groups (a training run of this sweep):\n" + "\n".join(lines))


def _units(prepared: list[_Prepared]) -> list[list[int]]:
    """The jobs in groups (runner/fuse.py) and groups split to fit the plan's budget."""
    from qlora_lab.runner import fuse

    ok = [i for i, p in enumerate(prepared) if p.cfg is not None]
    configs = [OmegaConf.to_container(prepared[i].cfg) for i in ok]
    resume_steps = [fuse.resume_step(prepared[i].cfg) for i in ok]
    units = []
    for g in fuse.groups(configs, resume_steps):
        members = [ok[i] for i in g]
        for part in fuse.split_configs([prepared[i].cfg for i in members]):
            units.append([members[i] for i in part])
    return units + [[i] for i, p in enumerate(prepared) if p.cfg is None]


def _parallel(prepared: list[_Prepared], units: list[list[int]]) -> int:
    from qlora_lab.runner import fuse

    first = next((p.cfg for p in prepared if p.cfg is not None), None)
    if first is None:
        return 1
    return fuse.side_by_side(first, [[prepared[i].cfg for i in u] for u in units])
