"""Merge a run's LoRA adapter into its base, write a standalone checkpoint, and check it on the run's eval rows.

  qlora-lab export RUN_DIR                          # -> RUN_DIR/export/merged (safetensors, tokenizer, model card)
  qlora-lab export RUN_DIR --to gguf                # -> RUN_DIR/export/gguf/model-<type>.gguf (llama.cpp's converter)
  qlora-lab export RUN_DIR --base /models/orig-16bit --dtype bfloat16 --out DIR
  qlora-lab export RUN_DIR --merge-into dequantized # exactly the model a 4-bit run trained (its rounding baked in)
  qlora-lab export RUN_DIR --check-only             # check an existing export again
  qlora-lab export SWEEP_DIR --best eval_exact_match

The export is written beside its target and renamed into place only once its check passed. Exit status: 0 written
(or checked) and the check passed; 2 input refused before anything loaded; 3 the check failed (nothing placed).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_lab.export import card, gguf, merge, serve, verify
from qlora_lab.export.inputs import (EXPORT_DIR, Base, ExportError, RunRecord, adapter_digest, best_job,
                                     choose_base, read_run, target_problems)

EXIT_REFUSED, EXIT_CHECK_FAILED = 2, 3


class CheckFailed(Exception):
    """Raised inside the write so that nothing is placed (merge.placed removes what was written)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run dir (or a sweep dir with --best)")
    p.add_argument("--to", choices=["merged", "gguf"], default="merged",
                   help="merged: a transformers checkpoint (safetensors); gguf: one GGUF file (llama.cpp)")
    p.add_argument("--base", help="the original 16-bit checkpoint dir to merge into (default: the run's base)")
    p.add_argument("--merge-into", choices=["original", "dequantized"], default="original",
                   help="for a 4-bit/8-bit run: its base's original 16-bit weights (default), or its dequantized "
                        "quantized weights (exactly what was trained)")
    p.add_argument("--dtype", choices=["auto", *merge.DTYPES], default="auto",
                   help="dtype of the written weights (auto: the base checkpoint's); the merge itself is fp32")
    p.add_argument("--out", type=Path, help="the export dir (default: RUN_DIR/export/<merged|gguf>)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    p.add_argument("--check-only", action="store_true", help="check an existing export again; write nothing")
    p.add_argument("--best", metavar="METRIC", help="RUN_DIR is a sweep: export its best finished job by METRIC")


def say(line: str, err: bool = False) -> None:
    print(f"qlora-lab: export: {line}", file=sys.stderr if err else sys.stdout, flush=True)


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except ExportError as e:
        say(str(e), err=True)
        return EXIT_REFUSED
    except gguf.ConversionError as e:  # an architecture or tokenizer llama.cpp does not know: nothing was placed
        say(f"{e}\nnothing was written; the merged checkpoint (--to merged) does not need the converter", err=True)
        return 1


def _main(args: argparse.Namespace) -> int:
    run_dir = args.run_dir
    if args.best:
        run_dir, key, value = best_job(args.run_dir, args.best)
        say(f"best job of {args.run_dir} by {key}: {run_dir.name} ({value:.4g})")
    rec = read_run(run_dir)
    out = args.out or run_dir / EXPORT_DIR / args.to
    if args.check_only:
        return _check_only(rec, out)
    base, config = choose_base(rec, args.base, args.merge_into)
    dtype = args.dtype if args.dtype != "auto" else _stored_dtype(config)
    problems = target_problems(out, rec, args.overwrite)
    if args.to == "gguf" and gguf.converter_problem():
        problems.append(gguf.converter_problem())
    if problems:
        raise ExportError(problems)
    path = merge.base_path(rec, base)
    tokenizer = merge.run_tokenizer(rec)
    prompts = verify.eval_prompts(rec, tokenizer)  # the data, before any weights load
    _announce(rec, base, dtype)
    start = time.perf_counter()
    refs = _references(rec, base, path, tokenizer, prompts)
    try:
        with merge.placed(out, args.overwrite) as tmp:
            unmerged, refs.unmerged = refs.unmerged, None  # the merge consumes it; freed once written
            file = _write(unmerged, tokenizer, tmp, args.to, dtype)
            del unmerged
            ok, lines, check = _check(rec, base, tmp, args.to, file, dtype, tokenizer, prompts, refs)
            sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            check["sizes"] = sizes
            check["seconds"] = round(time.perf_counter() - start, 1)
            serve_line = serve.vllm_command(str(rec.info.get("model_path")), rec.adapter_dir.resolve(),
                                            rec.cfg.model.name, rec.cfg.lora.r)
            card.write_card(tmp, out, rec, base, args.to, dtype, file, lines, serve_line)
            card.write_manifest(tmp, card.manifest(rec, base, args, dtype, file, adapter_digest(rec.adapter_dir),
                                                   check))
            if not ok:
                raise CheckFailed
    except CheckFailed:
        say(f"the check failed: nothing was written to {out} (the numbers are above)", err=True)
        return EXIT_CHECK_FAILED
    total = sum(sizes.values()) + (out / card.CARD).stat().st_size + (out / card.MANIFEST).stat().st_size
    say(f"wrote {out} ({total / 2**20:,.1f} MiB: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in sizes.items()
                                                                if v > 2**20) + f") in {check['seconds']:.0f} s")
    problems = serve.vllm_problems(rec.adapter_dir)
    say("the unmerged adapter serves as it is: " + serve_line if not problems else
        "vLLM would not load the unmerged adapter: " + "; ".join(problems))
    return 0


def _check_only(rec: RunRecord, out: Path) -> int:
    if not (out / card.MANIFEST).is_file():
        raise ExportError([f"{out} holds no export ({card.MANIFEST} missing); export first (qlora-lab export "
                           f"{rec.run_dir}), or give its dir with --out"])
    made = card.read_manifest(out)
    if made["adapter_sha256"] != adapter_digest(rec.adapter_dir):
        say(f"{out} was made from another adapter than the run's current one (was it resumed or retrained after "
            f"the export?); export again with --overwrite", err=True)
        return EXIT_CHECK_FAILED
    base, _ = choose_base(rec, made["base_arg"], made["merge_into"])  # checked again: it may have moved since
    path = merge.base_path(rec, base)
    tokenizer = merge.run_tokenizer(rec)
    prompts = verify.eval_prompts(rec, tokenizer)
    _announce(rec, base, made["dtype"])
    refs = _references(rec, base, path, tokenizer, prompts)
    refs.unmerged = None
    ok, _, _ = _check(rec, base, out, made["format"], made["file"], made["dtype"], tokenizer, prompts, refs)
    return 0 if ok else EXIT_CHECK_FAILED


def _stored_dtype(config) -> str:
    stored = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    stored = stored.removeprefix("torch.")
    return stored if stored in merge.DTYPES else "float32"


def _announce(rec: RunRecord, base: Base, dtype: str) -> None:
    q = rec.cfg.quantization.name
    into = f"the dequantized {q} base" if base.dequantized else "the original 16-bit weights"
    say(f"{rec.run_dir}: merging its adapter into {into} of {base.path} ({base.why}); written as {dtype}")
    if base.dequantized:
        what = "the model the run trained" if rec.weight_only else \
            "the nearest weights to what the run trained (LLM.int8 also rounded its activations)"
        say(f"warning: merged into a dequantized {q} base: the export is {what}, but its weights carry the {q} "
            "rounding of the base (and quantizing it again rounds them twice); give the original 16-bit weights "
            "(--base PATH, or --merge-into original) for a merge into the unrounded base", err=True)
    elif rec.quantized:
        say(f"note: the run trained its adapter on the {q}-quantized base, so this merge is not exactly the model it "
            "evaluated: the check says by how much (--merge-into dequantized exports exactly that model)")


@dataclass
class References:
    """What the export is checked against, probed on the prompts, and the unmerged model it is merged from."""

    merge: verify.Probe  # the merge base + the adapter, unmerged: the gate
    trained: verify.Probe  # the run as trained (the same probe when it is the same model)
    unmerged: torch.nn.Module | None
    prompt_ids: list[list[int]]

    @property
    def same(self) -> bool:
        return self.trained is self.merge


def _references(rec: RunRecord, base: Base, path: str, tokenizer, prompts) -> References:
    """The reference models, loaded one after the other (each freed once probed but the one to merge): the run as
    trained when its base was quantized, then the merge base + adapter, unmerged. Merged into the dequantized base,
    the second is built from the first (its LoRA layers taken off, its weights dequantized)."""
    pids = verify.prompt_ids(tokenizer, prompts)
    trained = merge.as_trained(rec, path, tokenizer) if rec.quantized else None
    t_probe = verify.probe("as trained", trained, tokenizer, prompts, rec, {}) if trained is not None else None
    if base.dequantized and trained is not None:
        unmerged = merge.with_adapter(merge.dequantized_from(trained), rec)
    else:
        del trained
        gc.collect()
        unmerged = merge.with_adapter(merge.original(path, rec.cfg.model.trust_remote_code), rec)
    m_probe = verify.probe("base + adapter", unmerged, tokenizer, prompts, rec, {})
    return References(m_probe, t_probe or m_probe, unmerged, pids)


def _write(unmerged, tokenizer, tmp: Path, fmt: str, dtype: str) -> str | None:
    """The merged model into `tmp`: a checkpoint, or (gguf) a GGUF file converted from one; returns the GGUF name."""
    model = merge.merged(unmerged, dtype)
    if fmt == "merged":
        merge.write_checkpoint(model, tokenizer, tmp)
        return None
    hf = tmp / ".checkpoint"
    merge.write_checkpoint(model, tokenizer, hf)
    del model
    gc.collect()
    name = gguf.gguf_name(dtype)
    gguf.convert(hf, tmp / name, dtype)
    shutil.rmtree(hf)
    return name


def _load_export(out: Path, fmt: str, file: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": file} if fmt == "gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **extra).eval()
    return model, AutoTokenizer.from_pretrained(out, **extra)


def _check(rec: RunRecord, base: Base, out: Path, fmt: str, file: str | None, dtype: str, tokenizer, prompts,
           refs: References) -> tuple[bool, list[str], dict]:
    """Load the export as a user would and compare it with the references; prints and returns the verdict."""
    model, exported_tokenizer = _load_export(out, fmt, file)
    same = refs.same
    along = {"merge": refs.merge.paths(refs.prompt_ids)}
    if not same:
        along["trained"] = refs.trained.paths(refs.prompt_ids)
    e = verify.probe("export", model, tokenizer, prompts, rec, along)
    del model
    gc.collect()
    tol = verify.TOLERANCE[dtype]
    q = rec.cfg.quantization.name
    into = f"dequantized {q} base" if base.dequantized else "16-bit base"
    what = f"{into} + adapter (unmerged" + (", = the run as trained)" if same else ")")
    results = {"merge": verify.agreement(e, refs.merge, "merge", what, tol)}
    if not same:
        # Gated only where the export can be the trained model: a 4-bit layer multiplies by its dequantized weights,
        # so W_q + BA reproduces it; LLM.int8 (8-bit) quantizes the activations too, which no weights reproduce.
        exact = base.dequantized and rec.weight_only
        note = "" if exact else f"not gated: the {q} base the adapter trained on " + (
            "also quantizes activations (LLM.int8), which no merged weights reproduce" if base.dequantized else
            f"differs from the 16-bit original by {q}'s rounding")
        results["trained"] = verify.agreement(e, refs.trained, "trained", f"{q} base + adapter as trained",
                                              tol if exact else None, note)
    problems = verify.tokenizer_problems(exported_tokenizer, tokenizer, prompts)
    scores = {"as trained": verify.task_scores(refs.trained, prompts, rec),
              "export": verify.task_scores(e, prompts, rec)}
    lines = [f"{len(prompts)} held-out rows of the run, greedy, {rec.cfg.eval.max_new_tokens} new tokens, fp32 on "
             f"the CPU; export loaded from {fmt} ({dtype})"]
    lines += [f"export vs {a.against}: {a.line()}" for a in results.values()]
    recorded = {k: rec.summary[f"summary/eval_{k}"] for k in scores["as trained"]
                if isinstance(rec.summary.get(f"summary/eval_{k}"), float)}
    lines.append("task metrics on these rows: " + "; ".join(
        f"{who} " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()) for who, s in scores.items())
        + (" (the run's own last eval: " + ", ".join(f"{k} {v:.3f}" for k, v in recorded.items()) + ")"
           if recorded else ""))
    lines.append("tokenizer: " + ("same ids on every prompt, same chat template" if not problems else
                                  "; ".join(problems)))
    ok = all(a.ok for a in results.values()) and not problems
    for line in lines:
        say(line)
    say(f"check {'passed' if ok else 'FAILED'}", err=not ok)
    check = {k: a.as_dict() for k, a in results.items()}
    check.update(rows=len(prompts), tokenizer_problems=problems, scores=scores, passed=ok)
    return ok, lines, check
