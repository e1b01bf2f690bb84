"""python train.py [group=option ...] [key=value ...] [-m]: one QLoRA run (or a sweep) from conf/."""

import hydra
from omegaconf import DictConfig

from qlora_lab.config import register_configs
from qlora_lab.resolvers import register_resolvers

register_configs()
register_resolvers()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from qlora_lab.run import run

    summary = run(cfg, overrides=list(HydraConfig.get().overrides.task))
    return summary["summary/final_loss"]  # what a sweeper optimizes


if __name__ == "__main__":
    main()
