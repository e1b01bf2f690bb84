"""python train.py [group=option ...] [key=value ...] [-m]: one QLoRA run (or a sweep) from conf/."""

import os
import sys

import hydra
from omegaconf import DictConfig

from qlora_lab.config import register_configs
from qlora_lab.resolvers import register_resolvers

register_configs()
register_resolvers()
if int(os.environ.get("RANK", "0")) > 0:  # torchrun / accelerate launch: rank 0 alone writes the run dir's files
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from qlora_lab import sweep
    from qlora_lab.checkpoint import CheckpointError
    from qlora_lab.data import DataError
    from qlora_lab.run import run
    from qlora_lab.train import NonFiniteLossError
    from qlora_lab.validate import ConfigError

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    if hc.mode == RunMode.MULTIRUN and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("qlora-lab: a sweep (-m) fans its jobs out itself (hydra/launcher=local_gpus: one job per GPU); run it "
              "with python, not under torchrun / accelerate launch", file=sys.stderr)
        sys.exit(2)
    if hc.mode == RunMode.MULTIRUN and cfg.mode == "train":
        sweep_dir = Path(hc.sweep.dir)
        try:
            record = sweep.run_job(cfg, overrides, sweep_dir, Path(hc.runtime.output_dir).name)
        except KeyboardInterrupt:
            table, _ = sweep.report(sweep_dir)
            print(f"qlora-lab: sweep interrupted; jobs so far:\n{table}", file=sys.stderr)
            sys.exit(130)
        return record.get("summary/final_loss", float("nan"))
    try:
        summary = run(cfg, overrides=overrides)
    except (ConfigError, DataError, CheckpointError) as e:  # the message says what to fix; a traceback adds nothing
        print(f"qlora-lab: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"qlora-lab: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: the loop wrote a checkpoint at the step boundary
        print(f"qlora-lab: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    return summary.get("summary/final_loss", float("nan"))  # what a sweeper optimizes


if __name__ == "__main__":
    main()
