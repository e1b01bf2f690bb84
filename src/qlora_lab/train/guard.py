"""The NaN/inf guard: a non-finite loss or gradient norm writes a diagnostic, then skips the update or stops."""

from __future__ import annotations

import logging
import json
import math
from pathlib import Path
from typing import Any

from qlora_lab.core.errors import NonFiniteLossError
from qlora_lab.core.schema import GuardConfig
from qlora_lab.sinks.logger import MetricLogger
from qlora_lab.train.state import TrainState, finite_or_none
from qlora_lab.train.step import StepResult

log = logging.getLogger(__name__)


def nonfinite_report(model, step: int, rows: list[int], loss: float, grad_norm: float, last_finite_loss: float | None,
                     lr: float) -> dict[str, Any]:
    """What a NaN/inf step looked like: which rows, which LoRA tensors have non-finite or the largest gradients."""
    tensors = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = float(p.grad.float().norm()) if p.grad is not None else None
        tensors.append({"name": name, "grad_norm": g, "weight_norm": float(p.detach().float().norm()),
                        "weight_finite": bool(p.detach().isfinite().all())})
    bad = [t["name"] for t in tensors if t["grad_norm"] is not None and not math.isfinite(t["grad_norm"])]
    return {
        "step": step, "loss": finite_or_none(loss), "grad_norm": finite_or_none(grad_norm),
        "last_finite_loss": last_finite_loss, "lr": lr,
        "sample_rows": rows, "nonfinite_grad_tensors": len(bad), "first_nonfinite_grads": bad[:10],
        "nonfinite_weights": [t["name"] for t in tensors if not t["weight_finite"]],
        "tensors": sorted(tensors, key=lambda t: -(t["grad_norm"] if t["grad_norm"] is not None
                                                      and math.isfinite(t["grad_norm"]) else math.inf)),
    }


class NonFiniteGuard:
    """Every process takes the same decision (loss and norm are global); only the `writer` writes the report."""

    def __init__(self, cfg: GuardConfig, run_dir: Path, logger: MetricLogger, writer: bool = True):
        self.cfg, self.dir, self.logger, self.writer = cfg, run_dir / "nonfinite", logger, writer

    def handle(self, model, step: int, rows: list[int], result: StepResult, state: TrainState, lr: float) -> None:
        """Write the diagnostic; return to skip the update (guard.nonfinite=skip), else raise NonFiniteLossError."""
        loss, grad_norm = result.loss, result.grad_norm
        report = nonfinite_report(model, step, rows, loss, grad_norm, state.last_finite_loss, lr)
        path = self.dir / f"step_{step:07d}.json"
        if self.writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1, default=str))
        will_skip = self.cfg.nonfinite == "skip" and state.skipped < self.cfg.max_skips
        self.logger.log({"guard/nonfinite_step": step, "guard/loss": finite_or_none(loss),
                         "guard/grad_norm": finite_or_none(grad_norm),
                         "guard/nonfinite_grad_tensors": report["nonfinite_grad_tensors"],
                         "guard/last_finite_loss": state.last_finite_loss,
                         "guard/action": "skip" if will_skip else "stop", "guard/report": str(path)}, step)
        if will_skip:
            state.skipped += 1
            log.warning(f"non-finite loss {loss} / grad norm {grad_norm} at step {step}: update skipped "
                        f"({state.skipped}/{self.cfg.max_skips}); diagnostic {path}")
            return
        gave_up = f" after {state.skipped} skipped steps (guard.max_skips)" if self.cfg.nonfinite == "skip" else ""
        raise NonFiniteLossError(
            f"non-finite loss {loss} / grad norm {grad_norm} at step {step}{gave_up} (dataset rows {rows[:16]}; "
            f"last finite loss {state.last_finite_loss}; first non-finite gradients "
            f"{report['first_nonfinite_grads'][:3]}); diagnostic {path}. Lower optim.lr, or try model.upcast=norms, "
            "or guard.nonfinite=skip; resume=auto restarts from the last checkpoint with a changed lr")
