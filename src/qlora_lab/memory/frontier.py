"""checkpointing=auto: the fastest run that fits the card, layer by layer.

For each micro-batch the plan may use (data.micro_batch_size, or every one up to plan.max_micro_batch when it is
auto) it finds the most decoder layers that can keep their activations (no recompute), the rest recomputed, with as
few of those as needed moved to host memory (offload) to fit; the ledger (memory/ledger.py) says what fits
`plan.gpu_memory_gib` (default the card) minus `plan.safety_margin`, host RAM bounds what may be offloaded. Among
those it takes the plan with the most predicted tokens/s, and keeps the runners-up (mode=plan prints them; a run that
runs out of memory on its proving step falls back to the next one that needs less).

The speed model is from FLOP counts, not a calibration run: a step costs, per decoder layer and pass, a fixed
overhead (kernel launches and syncs, which bound small models) plus its FLOPs at the card's reachable matmul rate;
a kept layer runs forward and backward, a recomputed one its forward once more, an offloaded one also waits for
what its copies do not overlap. The constants (`CARDS`) are fitted to two measured H100 steps (compiled layers,
every layer recomputed, micro-batch 4 x 2048, bench/results/2026-11-24_h100_speed_compiled.md): Phi-4-mini 17,405
and Llama-3-8B 10,267 tokens/s, which they reproduce exactly. They rank plans; they are not a promise: the 0.5B shape
(every layer kept, 2026-12-06_h100_sweep_speed.md) measured 0.195 s a step where they predict 0.093 s, since a small
model's step is bound by what the model leaves out (the loss over a 152k vocabulary, the optimizer, LoRA dropout).
The H200 measured within 2% of the H100 on the same Phi-4-mini step (2026-12-01_h200_sft_packing.md), so it shares
them. Each plan's real tokens/s is measured when it runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import psutil

from qlora_lab.core.errors import ConfigError
from qlora_lab.core.modes import format_layers
from qlora_lab.core.schema import TrainConfig
from qlora_lab.memory.ledger import Arch, Ledger, predict
from qlora_lab.memory.readings import GIB


@dataclass(frozen=True)
class Card:
    """What the speed model knows of a GPU."""

    name: str
    tflops: float  # bf16 matmul FLOP/s the training step's GEMMs reach, in 1e12 (dequantization included)
    overhead_s: float  # fixed seconds per decoder layer per pass (forward, backward, recompute)
    host_gbps: float  # host <-> device copy bandwidth, GB/s


CARDS = {
    "H100": Card("H100", tflops=580.0, overhead_s=1.24e-3, host_gbps=22.0),
    "H200": Card("H200", tflops=580.0, overhead_s=1.24e-3, host_gbps=22.0),
}
DEFAULT_CARD = CARDS["H100"]
HOST_SHARE = 0.7  # of the host RAM available at planning time, what offloaded layer inputs may take


def card_of(device_name: str | None) -> Card:
    for key, card in CARDS.items():
        if device_name and key in device_name:
            return card
    return DEFAULT_CARD


def layer_flops_per_token(arch: Arch, seq: int) -> float:
    """Forward FLOPs of one decoder layer per token: its linear layers and causal attention over a row of `seq`."""
    linear = 2 * sum(i * o for i, o in arch.layer_linears.values())
    attention = 2 * 2 * arch.q_dim * seq / 2  # QK^T and AV, causal: half the square on average
    return linear + attention


def predicted_step_s(arch: Arch, cfg: TrainConfig, micro_batch: int, modes: list[str], card: Card,
                     copies: int = 1) -> float:
    """Seconds of one optimizer step (grad_accum_steps micro-batches) of this plan, by the speed model."""
    tokens = micro_batch * cfg.model.max_seq_len * copies
    fwd = layer_flops_per_token(arch, cfg.model.max_seq_len) * tokens / (card.tflops * 1e12)
    bwd = 1.1 * fwd  # a frozen base computes input gradients only: its weight-gradient GEMMs never run
    layer_bytes = tokens * arch.hidden * 2
    copy_s = layer_bytes / (card.host_gbps * 1e9)
    t = 0.0
    for mode in modes:
        t += 2 * card.overhead_s + fwd + bwd
        if mode != "keep":
            t += card.overhead_s + fwd
        if mode == "offload":  # both copies overlap the neighbouring layers' compute; what does not is waited for
            t += 2 * max(0.0, copy_s - (fwd + bwd) / 2)
    head = 2 * arch.hidden * arch.vocab * tokens * 3 / (card.tflops * 1e12)
    return (t + head) * cfg.optim.grad_accum_steps


@dataclass
class Candidate:
    micro_batch: int
    modes: list[str]
    ledger: Ledger
    tokens_per_s: float  # predicted

    @property
    def layers(self) -> str:
        return format_layers(self.modes)

    def row(self) -> dict[str, Any]:
        return {"micro_batch": self.micro_batch, "layers": self.layers, "predicted_tokens_per_s": self.tokens_per_s,
                "predicted_peak_gib": self.ledger.peak_gib, "predicted_card_gib": self.ledger.card_gib,
                "host_gib": self.ledger.extra["host_bytes"] / GIB}


@dataclass
class Plan:
    chosen: Candidate
    runners_up: list[Candidate] = field(default_factory=list)  # the next best, fastest first
    budget_gib: float | None = None
    host_gib: float | None = None
    limit: str = ""  # what bounds the plan: "GPU memory", "host memory" or "plan.max_micro_batch"

    def table(self) -> str:
        head = f"{'':2}{'micro_batch':>11} {'layers (keep/recompute/offload)':<36} {'tok/s':>9} {'peak GiB':>9} " \
               f"{'card GiB':>9} {'host GiB':>9}"
        lines = [head]
        for mark, c in [("*", self.chosen)] + [(" ", c) for c in self.runners_up]:
            r = c.row()
            lines.append(f"{mark:2}{r['micro_batch']:>11} {r['layers']:<36} {r['predicted_tokens_per_s']:>9,.0f} "
                         f"{r['predicted_peak_gib']:>9.2f} {r['predicted_card_gib']:>9.2f} {r['host_gib']:>9.2f}")
        return "\n".join(lines)


def _fits(ledger: Ledger, budget: float, margin: float, host: float) -> bool:
    return ledger.card_gib <= budget * (1 - margin) and ledger.extra["host_bytes"] / GIB <= host


def _modes(n: int, keep: int, offload: int) -> list[str]:
    """The first layers offloaded, then recomputed, the last `keep` kept (the last run their backward first, so
    their activations are the first freed)."""
    return ["offload"] * offload + ["recompute"] * (n - keep - offload) + ["keep"] * keep


def best_for(cfg: TrainConfig, arch: Arch, mb: int, budget: float, host: float, card: Card,
             allow_offload: bool, adapters: list | None = None) -> Candidate | None:
    """The fastest plan at micro-batch `mb`: the most kept layers that fit (the rest offloaded if that is what lets
    them fit), then as few offloaded ones as still fit; None when not even every layer offloaded fits."""
    n, margin = arch.layers, cfg.plan.safety_margin

    def fits(keep: int, offload: int) -> bool:
        return _fits(predict(cfg, mb, arch, adapters=adapters, modes=_modes(n, keep, offload)), budget, margin, host)

    layer_in = mb * cfg.model.max_seq_len * len(adapters or [None]) * arch.hidden * 2  # one offloaded input
    spill = min(n, int(host * GIB // layer_in)) if allow_offload else 0  # host RAM bounds what may go there
    if not fits(0, spill):
        return None
    lo, hi = 0, n  # the most layers kept, the others offloaded (or recomputed without offload)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid, min(spill, n - mid)):
            lo = mid
        else:
            hi = mid - 1
    keep = lo
    lo, hi = 0, min(spill, n - keep)  # the fewest offloaded that still fit: recompute is a little cheaper
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(keep, mid):
            hi = mid
        else:
            lo = mid + 1
    modes = _modes(n, keep, lo)
    ledger = predict(cfg, mb, arch, adapters=adapters, modes=modes)
    copies = len(adapters or [None])
    tokens = mb * cfg.model.max_seq_len * cfg.optim.grad_accum_steps * copies
    return Candidate(mb, modes, ledger, tokens / predicted_step_s(arch, cfg, mb, modes, card, copies))


def plan_layers(cfg: TrainConfig, arch: Arch, budget: float | None, device_name: str | None = None,
                host_gib: float | None = None, adapters: list | None = None) -> Plan:
    """checkpointing=auto: the chosen (micro-batch, layer modes) and the runners-up; `adapters`: a fused group's
    LoRA configs (its tokens/s counts every job's). Without a budget (the CPU, no plan.gpu_memory_gib) every layer
    keeps its activations at the configured micro-batch."""
    card = card_of(device_name)
    auto_mb = cfg.data.micro_batch_size == "auto"
    if budget is None:
        mb = 1 if auto_mb else int(cfg.data.micro_batch_size)
        modes = ["keep"] * arch.layers
        led = predict(cfg, mb, arch, adapters=adapters, modes=modes)
        copies = len(adapters or [None])
        return Plan(Candidate(mb, modes, led, mb * cfg.model.max_seq_len * copies /
                              predicted_step_s(arch, cfg, mb, modes, card, copies)), limit="no GPU budget")
    host = host_gib if host_gib is not None else psutil.virtual_memory().available / GIB * HOST_SHARE
    allow_offload = cfg.checkpointing.offload_to_cpu
    sizes = range(1, cfg.plan.max_micro_batch + 1) if auto_mb else [int(cfg.data.micro_batch_size)]
    found = []
    for mb in sizes:
        c = best_for(cfg, arch, mb, budget, host, card, allow_offload, adapters)
        if c is None:
            break  # memory grows with the micro-batch: no larger one fits either
        found.append(c)
    if not found:
        smallest = predict(cfg, sizes[0], arch, adapters=adapters,
                           modes=["offload" if allow_offload else "recompute"] * arch.layers)
        raise ConfigError([f"checkpointing=auto: nothing fits {budget:.1f} GiB with {cfg.plan.safety_margin:.0%} "
                           f"margin; the least this run can take (micro-batch {sizes[0]}, every layer "
                           f"{'offloaded' if allow_offload else 'recomputed'}) needs {smallest.card_gib:.2f} GiB on "
                           "the card: raise plan.gpu_memory_gib, lower model.max_seq_len, or use a smaller model"])
    found.sort(key=lambda c: -c.tokens_per_s)
    chosen = found[0]
    limit = "GPU memory"
    if chosen.ledger.extra["host_bytes"] / GIB > 0.9 * host:
        limit = "host memory"
    elif auto_mb and chosen.micro_batch == sizes[-1] and all(m == "keep" for m in chosen.modes):
        limit = "plan.max_micro_batch"
    # the runners-up, each needing less GPU memory than the one before: where a failed proving step falls back to
    lighter = sorted((c for c in found[1:] if c.ledger.card_gib < chosen.ledger.card_gib),
                     key=lambda c: -c.tokens_per_s)
    runners, last = [], chosen.ledger.card_gib
    for c in lighter:
        if c.ledger.card_gib < last:
            runners.append(c)
            last = c.ledger.card_gib
    return Plan(chosen, runners[:4], budget, host, limit)


def longest_seq(cfg: TrainConfig, arch: Arch, budget: float, host_gib: float | None = None) -> tuple[int, Ledger]:
    """plan.max_seq_len=search: the longest model.max_seq_len that trains at micro-batch 1 within `budget`, every
    layer offloaded (the least GPU memory a length can take), bounded by host RAM and the model's positions."""
    host = host_gib if host_gib is not None else psutil.virtual_memory().available / GIB * HOST_SHARE
    cap = arch.max_positions or 1 << 20
    modes = ["offload"] * arch.layers

    def ledger_at(seq: int) -> Ledger:
        at = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_len=seq))
        return predict(at, 1, arch, modes=modes)

    lo, hi = 0, cap
    while lo < hi:  # memory grows with the length
        mid = (lo + hi + 1) // 2
        if _fits(ledger_at(mid), budget, cfg.plan.safety_margin, host):
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise ConfigError([f"plan.max_seq_len=search: not even 1 token fits {budget:.1f} GiB"])
    step = 256 if lo >= 256 else 1  # a length the packing and the kernels like
    best = max(step, lo // step * step)
    return best, ledger_at(best)

