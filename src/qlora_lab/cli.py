"""`qlora-lab COMMAND ...`: what a user does around training runs (training itself is `python train.py ...`).

Each command is a module with `add_arguments(parser)` and `main(args) -> int` (the exit status), listed once in
COMMANDS; `python -m qlora_lab.cli COMMAND ...` is the same as the console script.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from qlora_lab.export import command as export
from qlora_lab.runner import compare
from qlora_lab.study import rerun, reproduce

COMMANDS: dict[str, ModuleType] = {}  # name -> module with add_arguments(parser) and main(args) -> int
COMMANDS["compare"] = compare  # a sweep's jobs side by side from their local files: table, plots (runner/)
COMMANDS["export"] = export  # merge a run's adapter, write a checkpoint or GGUF file, check it (export/)
COMMANDS["reproduce"] = reproduce  # re-run a study (experiments/<name>/) and check its committed numbers (study/)
COMMANDS["rerun"] = rerun  # re-execute one recorded run and compare its loss curve (study/)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlora-lab", description="qlora-lab: what comes before and after a training "
                                "run (train with `python train.py ...`)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        cmd = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                             description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(COMMANDS[args.command].main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
