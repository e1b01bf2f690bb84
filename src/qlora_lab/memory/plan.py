"""Using the ledger: `mode=plan`, fit verdicts, `micro_batch_size=auto`, and predicted-vs-measured tables."""

from __future__ import annotations

from typing import Any, Callable

import torch

from qlora_lab.core.errors import ConfigError
from qlora_lab.core.schema import TrainConfig
from qlora_lab.memory.ledger import Arch, Ledger, predict, read_arch
from qlora_lab.memory.readings import GIB

PHASES = ("load", "wrap", "first_forward", "first_backward", "first_optimizer_step", "step_peak")


def gpu_budget_gib(cfg: TrainConfig, device: str) -> float | None:
    """The card to plan for: plan.gpu_memory_gib, else the current GPU's memory, else None (no verdict)."""
    if cfg.plan.gpu_memory_gib is not None:
        return cfg.plan.gpu_memory_gib
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return None


def fits(ledger: Ledger, budget_gib: float | None, margin: float) -> bool | None:
    return None if budget_gib is None else ledger.card_gib <= budget_gib * (1 - margin)


def pick_micro_batch(cfg: TrainConfig, arch: Arch, budget_gib: float) -> Ledger:
    """The ledger of the largest micro-batch (up to plan.max_micro_batch) predicted to fit the budget."""
    best = predict(cfg, 1, arch)
    if not fits(best, budget_gib, cfg.plan.safety_margin):
        return best  # not even one sequence fits: the caller reports it
    lo, hi = 1, cfg.plan.max_micro_batch
    while lo < hi:  # memory grows with the batch, so bisect
        mid = (lo + hi + 1) // 2
        ledger = predict(cfg, mid, arch)
        if fits(ledger, budget_gib, cfg.plan.safety_margin):
            lo, best = mid, ledger
        else:
            hi = mid - 1
    return best


def verify_micro_batch(mb: int, try_step: Callable[[int], None]) -> tuple[int, list[dict[str, Any]]]:
    """Run one real step at `mb`; on out-of-memory halve it and try again. Returns (mb, attempts)."""
    attempts = []
    while True:
        try:
            try_step(mb)
            attempts.append({"micro_batch": mb, "ok": True})
            return mb, attempts
        except torch.OutOfMemoryError as e:
            attempts.append({"micro_batch": mb, "ok": False, "error": str(e).splitlines()[0][:200]})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if mb == 1:
                raise RuntimeError("data.micro_batch_size=auto: even a micro-batch of 1 ran out of memory; "
                                   "lower model.max_seq_len, use checkpointing=offload or model.kernels=liger") from e
            mb //= 2


def _matches(name: str, target: str) -> bool:
    """PEFT's rule: the full module name, or its last dotted parts."""
    return name == target or name.endswith("." + target)


def check_module_names(cfg: TrainConfig, arch: Arch) -> None:
    """Each named LoRA target must match a layer LoRA can wrap, and each quantization.skip_modules entry a module:
    PEFT rejects a norm only after the weights have loaded, and bitsandbytes ignores a name that matches nothing."""
    problems = []
    targets = list(cfg.lora.target_modules)
    if targets != ["all-linear"]:
        unmatched = [t for t in targets if not any(_matches(n, t) for n in arch.module_names)]
        if unmatched:
            problems.append(f"lora.target_modules names {unmatched} but model {cfg.model.name} has no such module; "
                            f"its linear layers are named {', '.join(arch.linear_suffixes)} (or use [all-linear])")
        for t in targets:
            hits = [n for n in arch.module_names if _matches(n, t)]
            if hits and not any(n in arch.adaptable for n in hits):
                kinds = sorted({arch.module_types[n] for n in hits})
                problems.append(f"lora.target_modules names {t!r}, a {', '.join(kinds)}, which LoRA cannot adapt (it "
                                f"wraps Linear, Embedding and Conv layers); name linear layers, e.g. "
                                f"{', '.join(arch.linear_suffixes[:4])}, or use [all-linear]")
    # bitsandbytes keeps a module unquantized when a skip entry is one of its dotted name parts (or a prefix)
    unknown = [s for s in cfg.quantization.skip_modules
               if not any(f".{s}." in f".{n}." for n in arch.module_names)]
    if unknown and cfg.quantization.bits != 16:
        problems.append(f"quantization.skip_modules names {unknown} but model {cfg.model.name} has no such module, so "
                        f"nothing would be skipped; name modules of the model (its linear layers: "
                        f"{', '.join(arch.linear_suffixes)})")
    if problems:
        raise ConfigError(problems)


def plan_run(cfg: TrainConfig, device: str) -> tuple[Ledger, float | None]:
    """The run's ledger and the budget it is judged against; with `data.micro_batch_size=auto`, the ledger of the
    largest micro-batch predicted to fit (the caller records that micro-batch in the run spec)."""
    arch = read_arch(cfg)
    check_module_names(cfg, arch)
    budget = gpu_budget_gib(cfg, device)
    if cfg.data.micro_batch_size == "auto":
        return pick_micro_batch(cfg, arch, budget), budget
    return predict(cfg, int(cfg.data.micro_batch_size), arch), budget


def verdict(ledger: Ledger, budget: float | None, margin: float) -> str:
    ok = fits(ledger, budget, margin)
    if ok is None:
        return "no GPU budget given (plan.gpu_memory_gib=N to judge fit)"
    return (f"{'fits' if ok else 'DOES NOT FIT'} {budget:.1f} GiB with {margin:.0%} margin "
            f"(needs {ledger.card_gib:.2f} GiB on the card)")


def plan_report(cfg: TrainConfig, ledger: Ledger, budget: float | None, overrides: list[str]) -> str:
    head = (f"memory ledger: model={cfg.model.name} quantization={cfg.quantization.name} lora.r={cfg.lora.r} "
            f"checkpointing={cfg.checkpointing.name} kernels={cfg.model.kernels} "
            f"micro_batch={ledger.micro_batch} seq={ledger.seq_len}")
    line = (f"PLAN {' '.join(overrides) or '(defaults)'}: peak {ledger.peak_gib:.2f} GiB allocated at "
            f"{ledger.peak_where}; {verdict(ledger, budget, cfg.plan.safety_margin)}")
    return "\n".join([head, ledger.table(), line])


def predicted_metrics(ledger: Ledger) -> dict[str, float]:
    return {f"ledger/{p}/predicted_gib": ledger.phases[p] / GIB for p in PHASES}


def item_rows(ledger: Ledger) -> list[dict[str, Any]]:
    """The predicted ledger, one row per component (a W&B table at the start of a run, any device)."""
    return [{"component": i.name, "kind": i.kind, "gib": i.bytes / GIB, "formula_inputs": i.inputs,
             "in_peak": i.name in ledger.peak_terms} for i in ledger.items]


def phase_rows(ledger: Ledger, measured: dict[str, float]) -> list[dict[str, Any]]:
    """Predicted vs measured GiB for each phase measured (a W&B table at the end of a CUDA run)."""
    rows = []
    for p in PHASES:
        if p in measured:
            pred, meas = ledger.phases[p] / GIB, measured[p]
            rows.append({"phase": p, "predicted_gib": pred, "measured_gib": meas,
                         "error_pct": (pred - meas) / meas * 100 if meas else float("nan")})
    return rows


def compare(ledger: Ledger, measured: dict[str, float]) -> tuple[dict[str, float], str, list[dict[str, Any]]]:
    """Predicted vs measured (GiB) for each phase measured: the flat metrics, a printable table and its rows."""
    rows = phase_rows(ledger, measured)
    metrics = {f"ledger/{r['phase']}/{k}": r[k] for r in rows for k in ("predicted_gib", "measured_gib", "error_pct")}
    lines = [f"{'phase':<22} {'predicted':>10} {'measured':>10} {'diff':>8}"]
    lines += [f"{r['phase']:<22} {r['predicted_gib']:10.3f} {r['measured_gib']:10.3f} {r['error_pct']:+7.1f}%"
              for r in rows]
    return metrics, "\n".join(lines), rows
