"""Measure what the export check's tolerances rest on (src/qlora_lab/export/verify.py: TOLERANCE).

  python bench/export_tolerance.py RUN_DIR [--rows 64]

For one run: its eval rows (the first --rows of the held-out split), greedy as the run evaluates, fp32 on the CPU.
Prints, for each base to merge into (the original 16-bit weights, the dequantized 4-bit base) and each stored dtype,
the merged export's agreement with the unmerged model it was merged from, and with the run as trained; then what a
broken merge looks like: the adapter left out, the merged weights re-quantized as the run quantized its base.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

from qlora_lab.export import merge, verify
from qlora_lab.export.inputs import choose_base, read_run


def row(name: str, a: verify.Agreement) -> str:
    return f"| {name} | {a.against} | {a.equal}/{a.rows} | {a.max_dlogit:.3g} |"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--rows", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(2)
    rec = read_run(args.run_dir)
    rec.cfg.eval.max_rows = args.rows  # more rows than the run generated on, for the measurement
    tok = merge.run_tokenizer(rec)
    prompts = verify.eval_prompts(rec, tok)
    pids = verify.prompt_ids(tok, prompts)
    print(f"{args.run_dir}: {len(prompts)} eval rows, quantization={rec.cfg.quantization.name}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| export | compared with | generations equal | max abs logit difference |\n|---|---|---|---|")
    for into in ("original", "dequantized") if rec.quantized else ("original",):
        base, _ = choose_base(rec, None, into)
        path = merge.base_path(rec, base)
        trained = merge.as_trained(rec, path, tok)
        t = verify.probe("trained", trained, tok, prompts, rec, {})
        if base.dequantized:
            unmerged, ref = merge.with_adapter(merge.dequantized_from(trained), rec), t
        else:
            del trained
            unmerged = merge.with_adapter(merge.original(path, False), rec)
            ref = verify.probe("unmerged", unmerged, tok, prompts, rec, {})
        along = {"ref": ref.paths(pids), "trained": t.paths(pids)}
        with tempfile.TemporaryDirectory() as d:
            model = merge.merged(unmerged, "float32")
            merge.write_checkpoint(model, tok, Path(d))
            del model, unmerged
            gc.collect()
            for dtype in merge.DTYPES:
                from transformers import AutoModelForCausalLM

                e = AutoModelForCausalLM.from_pretrained(d, dtype=merge.DTYPES[dtype]).float().eval()
                probe = verify.probe("export", e, tok, prompts, rec, along)
                name = f"merged into {into}, stored {dtype}"
                print(row(name, verify.agreement(probe, ref, "ref", "unmerged (merge reference)", None)))
                if ref is not t:
                    print(row(name, verify.agreement(probe, t, "trained", "as trained", None)))
                del e
            if into == "original":
                base_only = merge.original(path, False)
                probe = verify.probe("base", base_only, tok, prompts, rec, along)
                print(row("base alone (adapter left out)", verify.agreement(probe, ref, "ref", "unmerged", None)))
                del base_only
                if rec.quantized:
                    requant = requantized(rec, d)
                    probe = verify.probe("requant", requant, tok, prompts, rec, along)
                    print(row(f"merged, re-quantized to {rec.cfg.quantization.name}",
                              verify.agreement(probe, ref, "ref", "unmerged", None)))
                    print(row(f"merged, re-quantized to {rec.cfg.quantization.name}",
                              verify.agreement(probe, t, "trained", "as trained", None)))
        sys.stdout.flush()


def requantized(rec, checkpoint: str):
    """The merged checkpoint loaded through the run's own pipeline (quantized as the run quantized its base), with an
    adapter of zeros: what serving the merge in 4 bits computes."""
    from peft import set_peft_model_state_dict

    from qlora_lab.model import Source, build_model

    built = build_model(merge.cpu_spec(rec), Source(checkpoint, merge.run_tokenizer(rec)))
    zeros = {k: torch.zeros_like(v) for k, v in built.model.state_dict().items() if "lora_B" in k}
    set_peft_model_state_dict(built.model, {k.replace(".default", ""): v for k, v in zeros.items()})
    return built.model.eval()


if __name__ == "__main__":
    main()
