"""What an export says about itself: export.json (read back by --check-only) and the model card README.md (the run's
config, metrics and provenance, which base was merged into, and the check's numbers)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from qlora_lab.export.inputs import Base, RunRecord

MANIFEST = "export.json"
CARD = "README.md"


def manifest(rec: RunRecord, base: Base, args, dtype: str, file: str | None, digest: str,
             check: dict[str, Any]) -> dict[str, Any]:
    """What --check-only needs to redo the check (the base is chosen again from base_arg and merge_into)."""
    return {"format": args.to, "file": file, "dtype": dtype, "run_dir": str(rec.run_dir.resolve()),
            "adapter_sha256": digest, "base_arg": args.base, "merge_into": args.merge_into,
            "base": {"path": base.path, "dequantized": base.dequantized, "why": base.why,
                     "prequantized": base.prequantized},
            "quantization": rec.cfg.quantization.name, "check": check,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def read_manifest(export_dir: Path) -> dict[str, Any]:
    return json.loads((export_dir / MANIFEST).read_text())


def base_sentence(rec: RunRecord, base: Base) -> str:
    q = rec.cfg.quantization.name
    if base.dequantized:
        what = "the model the run trained and evaluated" if rec.weight_only else \
            "the nearest weights to the model the run trained (LLM.int8 also rounded its activations)"
        return (f"the **dequantized {q} base** ({base.path}: {base.why}). Its weights carry {q}'s rounding, baked "
                f"into 16-bit values: this export is {what}, not the original base + adapter, and quantizing it "
                "again rounds the merged weights a second time.")
    if rec.quantized:
        return (f"the **original 16-bit weights** ({base.path}: {base.why}). The run trained the adapter on a {q} "
                "base, so this is not exactly the model it evaluated: the check below says by how much.")
    return f"the **original 16-bit weights** it trained on ({base.path}: {base.why})."


def write_card(out: Path, target: Path, rec: RunRecord, base: Base, fmt: str, dtype: str, file: str | None,
               check_lines: list[str], serve_line: str) -> None:
    """README.md into `out` (the dir being written) for the export that lands at `target`."""
    cfg = rec.cfg
    metrics = {k.split("/", 1)[1]: v for k, v in rec.summary.items()
               if k.startswith("summary/") and (k.startswith("summary/eval_") or k in (
                   "summary/final_loss", "summary/steps", "summary/status", "summary/trainable_params"))}
    load = (f'AutoModelForCausalLM.from_pretrained("{target}", gguf_file="{file}")' if fmt == "gguf" else
            f'AutoModelForCausalLM.from_pretrained("{target}")')
    info = rec.info
    lines = [
        "---", "library_name: transformers", f"base_model: {cfg.model.path or cfg.model.name}",
        "tags: [qlora-lab, lora, merged]", "---", "",
        f"# {rec.run_dir.name} ({fmt}, {dtype})", "",
        f"A LoRA adapter trained by qlora-lab ({cfg.model.name}, quantization={cfg.quantization.name}, "
        f"r={cfg.lora.r}, alpha={cfg.lora.alpha:g}) merged into " + base_sentence(rec, base), "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = {load}", f"tokenizer = AutoTokenizer.from_pretrained(\"{target}\""
        + (f", gguf_file=\"{file}\")" if fmt == "gguf" else ")"), "```", "",
        "## Check (greedy generations and logits on the run's held-out rows, fp32 on the CPU)", "",
        *[f"- {line}" for line in check_lines], "",
        "Re-run it: `qlora-lab export RUN_DIR --check-only --out THIS_DIR`. The unmerged adapter serves as it is: "
        f"`{serve_line}`.", "",
        "## The run's metrics (summary.json)", "", "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()], "",
        "## Provenance", "",
        f"- run dir: `{rec.run_dir.resolve()}`", f"- command: `{info.get('command')}`",
        f"- git commit: `{info.get('git_commit')}`" + (" (dirty tree: git_diff.patch)" if info.get("git_dirty")
                                                       else ""),
        f"- base loaded by the run: `{info.get('model_path')}`",
        f"- dataset fingerprint: `{info.get('dataset_fingerprint')}`",
        f"- packages: {', '.join(f'{k} {v}' for k, v in (info.get('packages') or {}).items() if v)}", "",
        "## Config (resolved, as the run recorded it)", "", "```json",
        json.dumps(info.get("config", {}), indent=1), "```", ""]
    (out / CARD).write_text("\n".join(lines))


def write_manifest(out: Path, data: dict[str, Any]) -> None:
    (out / MANIFEST).write_text(json.dumps(data, indent=2))
