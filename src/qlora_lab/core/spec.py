"""The resolved run spec: the config with every `auto` replaced by what runs, frozen.

It is made once, before anything trains (`runner.resolve`), and it is the only config the stages see. What
`run_info.json`, W&B and each checkpoint record is `spec.config()`, and what a resume compares against it, so an
auto-sized run records the micro-batch it ran with and two runs compare by what they computed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from qlora_lab.core.schema import TrainConfig, freeze


@dataclass(frozen=True)
class RunSpec:
    cfg: TrainConfig  # frozen; every auto resolved
    device: str  # cpu | cuda
    processes: int  # the launcher's WORLD_SIZE (1 without one)
    overrides: tuple[str, ...] = ()  # the command-line overrides, as typed
    # What was resolved from what, e.g. {"data.micro_batch_size": ["auto", 8], "model.compile": ["auto", "none"]}
    resolved: dict[str, list[Any]] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        """The resolved config as plain JSON types: what is recorded and compared."""
        return json.loads(json.dumps(dataclasses.asdict(self.cfg)))

    def evolve(self, key: str, value: Any) -> "RunSpec":
        """This spec with `key` (dotted) resolved to `value`, recording what it was."""
        before = get(self.cfg, key)
        resolved = dict(self.resolved)
        if key not in resolved:
            resolved[key] = [before, value]
        else:
            resolved[key] = [resolved[key][0], value]
        return dataclasses.replace(self, cfg=evolve(self.cfg, key, value), resolved=resolved)


def get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def evolve(cfg: TrainConfig, key: str, value: Any) -> TrainConfig:
    """A frozen copy of `cfg` with the dotted `key` set to `value` (the original is left as it is)."""
    head, _, rest = key.partition(".")
    new = getattr(cfg, head)
    new = evolve(new, rest, value) if rest else value
    return freeze(dataclasses.replace(cfg, **{head: new}))
