"""Using the ledger: `mode=plan`, fit verdicts, `micro_batch_size=auto`, and predicted-vs-measured tables."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from qlora_lab.core.errors import ConfigError
from qlora_lab.core.modes import parse_layers
from qlora_lab.core.schema import TrainConfig
from qlora_lab.memory.frontier import Plan, longest_seq, plan_layers
from qlora_lab.memory.ledger import CUDA_CONTEXT_GIB, Arch, Ledger, predict, read_arch
from qlora_lab.memory.readings import GIB
from qlora_lab.model.quantize import backend_of

PHASES = ("load", "wrap", "first_forward", "first_backward", "first_optimizer_step", "step_peak")


def gpu_budget_gib(cfg: TrainConfig, device: str) -> float | None:
    """The card to plan for: plan.gpu_memory_gib, else what the current GPU has free (another process on the card, a
    co-scheduled sweep job, is not this run's to take; this process's own CUDA context is in the ledger), else None
    (no verdict)."""
    if cfg.plan.gpu_memory_gib is not None:
        return cfg.plan.gpu_memory_gib
    if device == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free / GIB + CUDA_CONTEXT_GIB
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
    """Each named LoRA target must match a layer LoRA can wrap, and each module the quantization leaves unquantized a
    module: PEFT rejects a norm only after the weights have loaded, and a backend ignores a name matching nothing."""
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
    # a backend keeps a module unquantized when a skip entry is one of its dotted name parts (or a prefix)
    skipped = backend_of(cfg.quantization).unquantized(cfg.quantization)
    unknown = [s for s in skipped if not any(f".{s}." in f".{n}." for n in arch.module_names)]
    if unknown:
        problems.append(f"quantization.skip_modules names {unknown} but model {cfg.model.name} has no such module, so "
                        f"nothing would be skipped; name modules of the model (its linear layers: "
                        f"{', '.join(arch.linear_suffixes)})")
    if problems:
        raise ConfigError(problems)


@dataclass
class RunPlan:
    """What the plan settled for a run: its ledger, the budget it was judged against, and with
    checkpointing=auto the chosen layer modes and micro-batch with their runners-up; with plan.max_seq_len=search
    the longest length that trains."""

    ledger: Ledger
    budget: float | None
    layers: Plan | None = None
    max_seq_len: int | None = None


def plan_run(cfg: TrainConfig, device: str) -> RunPlan:
    """The run's plan. With `data.micro_batch_size=auto`, the largest micro-batch predicted to fit; with
    checkpointing.layers=auto, the fastest (micro-batch, per-layer modes) predicted to fit (the caller records what
    was chosen in the run spec)."""
    arch = read_arch(cfg)
    check_module_names(cfg, arch)
    layers = str(cfg.checkpointing.layers)
    if layers not in ("all", "auto") and len(parse_layers(layers)) != arch.layers:
        raise ConfigError([f"checkpointing.layers={layers} names {len(parse_layers(layers))} layers but model "
                           f"{cfg.model.name} has {arch.layers}; give {arch.layers} (e.g. keep:{arch.layers}), or "
                           "checkpointing.layers=auto"])
    budget = gpu_budget_gib(cfg, device)
    found_len = None
    if cfg.plan.max_seq_len == "search":
        if budget is None:
            raise ConfigError(["plan.max_seq_len=search needs a budget: plan.gpu_memory_gib=N (or a GPU)"])
        found_len, _ = longest_seq(cfg, arch, budget)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_len=found_len))
    if cfg.checkpointing.layers == "auto":
        name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else None
        layers = plan_layers(cfg, arch, budget, name)
        return RunPlan(layers.chosen.ledger, budget, layers, found_len)
    if cfg.data.micro_batch_size == "auto":
        return RunPlan(pick_micro_batch(cfg, arch, budget), budget, None, found_len)
    return RunPlan(predict(cfg, int(cfg.data.micro_batch_size), arch), budget, None, found_len)


def predict_group(cfgs: list[TrainConfig], micro_batch: int | None = None) -> Ledger:
    """The ledger of a fused group: the first job's base and batches, every job's adapter on its own copy."""
    cfg = cfgs[0]
    return predict(cfg, micro_batch or int(cfg.data.micro_batch_size), adapters=grouped_adapters(cfgs))


def grouped_adapters(cfgs: list[TrainConfig]) -> list:
    """The LoRA configs of a fused group as it runs them: through PEFT's modules (model/grouped.py), whatever
    lora.kernel each asked for alone (fp32 adapters then compute on an fp32 copy of their input)."""
    return [dataclasses.replace(c.lora, kernel="peft") for c in cfgs]


def pick_group_micro_batch(cfgs: list[TrainConfig], budget: float) -> int:
    """The largest micro-batch (up to plan.max_micro_batch) at which the group is predicted to fit; 1 at least."""
    cfg = cfgs[0]
    arch = read_arch(cfg)
    adapters = grouped_adapters(cfgs)
    lo, hi = 1, cfg.plan.max_micro_batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(predict(cfg, mid, arch, adapters=adapters), budget, cfg.plan.safety_margin):
            lo = mid
        else:
            hi = mid - 1
    return lo


def verdict(ledger: Ledger, budget: float | None, margin: float) -> str:
    ok = fits(ledger, budget, margin)
    if ok is None:
        return "no GPU budget given (plan.gpu_memory_gib=N to judge fit)"
    return (f"{'fits' if ok else 'DOES NOT FIT'} {budget:.1f} GiB with {margin:.0%} margin "
            f"(needs {ledger.card_gib:.2f} GiB on the card)")


def plan_report(cfg: TrainConfig, ledger: Ledger, budget: float | None, overrides: list[str],
                run_plan: RunPlan | None = None) -> str:
    head = (f"memory ledger: model={cfg.model.name} quantization={cfg.quantization.name} lora.r={cfg.lora.r} "
            f"checkpointing={cfg.checkpointing.name} ({cfg.checkpointing.layers}) kernels={cfg.model.kernels} "
            f"micro_batch={ledger.micro_batch} seq={ledger.seq_len}")
    line = (f"PLAN {' '.join(overrides) or '(defaults)'}: peak {ledger.peak_gib:.2f} GiB allocated at "
            f"{ledger.peak_where}; {verdict(ledger, budget, cfg.plan.safety_margin)}")
    parts = [head, ledger.table(), line]
    if run_plan is not None and run_plan.layers is not None:
        lp = run_plan.layers
        parts.append(f"checkpointing=auto: the chosen plan (*) and the runners-up, predicted (bounded by {lp.limit}; "
                     f"host RAM for offload {lp.host_gib or 0:.1f} GiB):\n{lp.table()}")
    if run_plan is not None and run_plan.max_seq_len is not None:
        parts.append(f"plan.max_seq_len=search: the longest model.max_seq_len that trains at micro-batch 1 within "
                     f"{budget:.1f} GiB (every layer offloaded): {run_plan.max_seq_len:,} tokens")
    return "\n".join(parts)


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
