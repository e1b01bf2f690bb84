"""Each decoder layer's activation mode under activation checkpointing, as `checkpointing.layers` spells it.

keep: the layer's activations stay for backward (fastest); recompute: only its input stays and backward runs its
forward again; offload: recompute, with the input waiting in pinned host memory (no GPU memory). `all` means every
layer as checkpointing.enabled / offload_to_cpu say; `auto` is planned (memory/frontier.py) into runs of modes such as
`offload:8+recompute:14+keep:10` (`+`, not `,`: a comma on Hydra's command line makes a sweep), which is what a run
records and a resume re-uses.
"""

from __future__ import annotations

from qlora_lab.core.schema import CheckpointingConfig

MODES = ("keep", "recompute", "offload")


def parse_layers(text: str) -> list[str]:
    """`offload:8+recompute:14+keep:10` -> the 32 modes in layer order."""
    out = []
    for part in text.split("+"):
        mode, _, count = part.strip().partition(":")
        if mode not in MODES or not count.isdigit():
            raise ValueError(f"checkpointing.layers: {part!r} is not <mode>:<count> with mode one of {MODES}")
        out += [mode] * int(count)
    return out


def format_layers(modes: list[str]) -> str:
    """The inverse of `parse_layers`: runs of equal modes in layer order."""
    runs: list[list] = []
    for mode in modes:
        if runs and runs[-1][0] == mode:
            runs[-1][1] += 1
        else:
            runs.append([mode, 1])
    return "+".join(f"{m}:{n}" for m, n in runs)


def layer_modes(ck: CheckpointingConfig, n_layers: int) -> list[str]:
    """Each of the `n_layers` decoder layers' mode, in order."""
    if ck.layers == "all":
        mode = "keep" if not ck.enabled else "offload" if ck.offload_to_cpu else "recompute"
        return [mode] * n_layers
    if ck.layers == "auto":
        raise ValueError("checkpointing.layers=auto is resolved by the plan before the model is built")
    modes = parse_layers(str(ck.layers))
    if len(modes) != n_layers:
        raise ValueError(f"checkpointing.layers={ck.layers} names {len(modes)} layers; the model has {n_layers}")
    return modes
