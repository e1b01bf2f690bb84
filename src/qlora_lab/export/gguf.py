"""`--to gguf`: the merged checkpoint converted by llama.cpp's own converter, `convert_hf_to_gguf`.

The converter is not in a wheel of llama.cpp's: the `gguf` package ships the GGUF reader/writer library only, and
llama-cpp-python's sdist carries `vendor/llama.cpp/convert_hf_to_gguf.py` but its wheel installs `llama_cpp` alone
(and builds llama.cpp from source). PyPI's `convert-hf-to-gguf` packages llama.cpp's converter (the script and its
`conversion/` modules, pure Python) with a copy of llama.cpp's own `gguf-py` as a top-level `gguf` package. Installed
into the project's environment, that copy would overwrite the files of the `gguf` distribution transformers reads
GGUF with (an installer resolves the clash silently, by install order), so `make setup` installs it, at the version
uv.lock pins, into a directory of its own (`.venv/gguf-converter`), and it runs as a subprocess with that directory
first on its path: the converter writes with the gguf-py it was released with, as upstream's script does, and the
file is read back by transformers with the released `gguf`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

class ConversionError(RuntimeError):
    """The converter refused the checkpoint; the message carries its last lines."""


CONVERTER_DIR = Path(sys.prefix) / "gguf-converter"  # .venv/gguf-converter (Makefile: setup)
OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def converter_problem() -> str | None:
    """None when the converter is installed; else what to do."""
    if (CONVERTER_DIR / "convert_hf_to_gguf.py").is_file():
        return None
    return (f"--to gguf needs llama.cpp's converter (PyPI: convert-hf-to-gguf) in {CONVERTER_DIR}; `make setup` "
            "installs it there")


def gguf_name(dtype: str) -> str:
    return f"model-{OUTTYPES[dtype]}.gguf"


def convert(checkpoint: Path, out_file: Path, dtype: str) -> str:
    """Convert the checkpoint dir into `out_file` with no requantization (outtype = the export dtype); returns the
    converter's last lines. Raises ConversionError with its output when it fails (e.g. an architecture or tokenizer it
    does not know)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CONVERTER_DIR), *filter(None, [os.environ.get(
        "PYTHONPATH")])]), "NO_LOCAL_GGUF": "1"}
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(checkpoint), "--outtype", OUTTYPES[dtype],
           "--outfile", str(out_file)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-12:])
    if res.returncode != 0 or not out_file.is_file():
        raise ConversionError(f"llama.cpp's convert_hf_to_gguf failed (exit {res.returncode}):\n{tail}")
    return tail
