"""python train.py [group=option ...] [key=value ...] [-m]: one QLoRA run (or a sweep) from conf/."""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qlora_lab.core.errors import EXPECTED, RunDirInUse, exit_code
from qlora_lab.configs import register_configs
from qlora_lab.runner import preflight, rundir, sweep
from qlora_lab.runner.run import run

register_configs()
if int(os.environ.get("RANK", "0")) > 0:  # torchrun / accelerate launch: rank 0 alone writes the run dir's files
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    if hc.mode == RunMode.MULTIRUN:
        sweep.refuse_under_launcher()
    if hc.mode == RunMode.MULTIRUN and cfg.mode == "train":
        sweep_dir = Path(hc.sweep.dir)
        try:
            record = sweep.run_job(cfg, overrides, sweep_dir, Path(hc.runtime.output_dir).name)
        except KeyboardInterrupt:
            table, _ = sweep.report(sweep_dir)
            print(f"qlora-lab: sweep interrupted; jobs so far:\n{table}", file=sys.stderr)
            sys.exit(130)
        return record.get("summary/final_loss", float("nan"))
    run_dir = Path(hc.runtime.output_dir)
    try:
        summary = run(cfg, overrides=overrides)
    except EXPECTED as e:  # the message says what happened and what to do; a traceback adds nothing
        # A command refused before it wrote anything leaves no run dir behind (nor touches the run it refused).
        rundir.forget_launch(run_dir, refused=isinstance(e, RunDirInUse))
        print(f"qlora-lab: {str(e) or 'interrupted'}", file=sys.stderr)
        sys.exit(exit_code(e))
    except BaseException:
        rundir.forget_launch(run_dir)
        raise
    if cfg.mode == "plan":  # a plan is printed, not recorded: no run dir is left behind for it
        rundir.forget_launch(run_dir)
    else:
        rundir.settle_hydra_record(run_dir)
    return summary.get("summary/final_loss", float("nan"))  # what a sweeper optimizes


if __name__ == "__main__":
    sys.argv[1:], problems = preflight.run_dir_args(sys.argv[1:])
    problems += preflight.command_line_problems(sys.argv[1:], Path(__file__).parent / "conf")
    if problems:  # before Hydra composes: its own message would end the run with exit status 1, naming no fix
        print(f"qlora-lab: {len(problems)} problem(s) on the command line:\n"
              + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        sys.exit(2)
    main()
