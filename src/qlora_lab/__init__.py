"""qlora-lab: Hydra-configured, measured LoRA / QLoRA fine-tuning of causal language models."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes logs a warning at import when the optional `kernels` hub package is absent; this project never
# downloads kernels at run time, so the warning is noise on every run.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

import warnings as _warnings

# peft still calls transformers' pre-rename checkpointing helpers; the rename is transformers' business.
_warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6.*", category=FutureWarning)

from qlora_lab.core.log import install as _install_console  # noqa: E402

_install_console()  # `qlora-lab: ...` lines on the console; silence with logging.getLogger("qlora_lab")
