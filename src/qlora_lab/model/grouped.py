"""Several LoRA adapters on one loaded, quantized base, trained together: the model side of a fused sweep.

Each job of a fused group (runner/fuse.py) is one named PEFT adapter on the shared base (`add_adapter`: its own r,
alpha, dropout, targets, init). A step runs every job's copy of the same micro-batch as one batch, the copies
stacked along the batch dimension: each base linear layer is one GEMM over all of them, and each LoRA layer adds each
job's low-rank term to its own rows only (`Routing.jobs`, contiguous slices: views, no gathers). Nothing else in a
decoder layer mixes rows (norms and MLPs are per token, attention per document), so job j's rows compute exactly
what job j alone computes, and its loss only reaches its own adapter's gradients.

PEFT's own multi-adapter batches (`adapter_names=`) are for inference: the model refuses them in training mode, and
each layer gathers every adapter's rows by an index list; contiguous slices need neither.

For evaluation and generation `Routing.single` applies one job's adapter to every row, as that job alone would.
A job's checkpoints, optimizer and guard read its adapter through `JobView`, under PEFT's default adapter name, so
what a fused job saves is what it saves alone and a checkpoint resumes either way.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import Iterator

import torch

from qlora_lab.core.schema import LoraConfig
from qlora_lab.model.dropout import HashDropout

DEFAULT = "default"  # PEFT's adapter name of a model with one adapter: what a job's records use


@dataclass
class Routing:
    """Which rows each LoRA layer gives to which adapter: `jobs` in the order their copies are stacked (rows split
    evenly), or `single`: one adapter on every row."""

    jobs: list[str] = field(default_factory=list)
    single: str | None = None

    @contextlib.contextmanager
    def only(self, name: str) -> Iterator[None]:
        previous, self.single = self.single, name
        try:
            yield
        finally:
            self.single = previous


def _lora_term(layer, name: str, x: torch.Tensor, dropped: torch.Tensor | None = None) -> torch.Tensor:
    """What PEFT's forward adds for adapter `name` (vanilla LoRA), in the same order of operations. `dropped`: the
    dropout mask to apply, already drawn at this layer for this micro-batch by a job that shares it (`_mask_share`)."""
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    x = layer._cast_input_dtype(x, lora_a.weight.dtype)
    drop = layer.lora_dropout[name]
    x = drop(x) if dropped is None else drop.apply(x, dropped)
    return lora_b(lora_a(x)) * layer.scaling[name]


def _grouped_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    route: Routing = self._routing
    result = self.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    if route.single is not None:
        if route.single in self.lora_A:
            result = result + _lora_term(self, route.single, x)
        return result.to(dtype)
    parts = x.chunk(len(route.jobs))
    masks: dict[int, torch.Tensor] = {}  # by share id: drawn (and kept for backward) once for the jobs sharing it
    terms = []
    for name, part in zip(route.jobs, parts):
        if name not in self.lora_A:
            terms.append(None)
            continue
        share, drop = self._mask_share.get(name), self.lora_dropout[name]
        if share is not None and drop.active:
            if share not in masks:
                masks[share] = drop.dropped(part)
            terms.append(_lora_term(self, name, part, masks[share]).to(dtype))
        else:
            terms.append(_lora_term(self, name, part).to(dtype))
    if all(t is not None for t in terms):
        return result + torch.cat(terms)  # one add over the whole output
    outs = result.chunk(len(route.jobs))
    return torch.cat([o if t is None else o + t for o, t in zip(outs, terms)])


def share_dropout_masks(model: torch.nn.Module) -> int:
    """Let the jobs of a group that draw the same dropout mask at a layer share it: the jobs of a sweep share the
    seed, so adapters with equal (key, p) at a layer (model/dropout.py) draw equal masks, hashed once and kept once.
    Each LoRA layer gets `_mask_share`, adapter name -> share id (the index of the first adapter with its key and p),
    decided here, once: the forward reads small integers that every layer has alike, so one compiled graph serves
    every layer (the keys themselves differ per layer and would recompile each). Call after `dropout.install`;
    returns how many adapters' masks come from another's."""
    from peft.tuners.lora import LoraLayer

    reused = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "_routing"):
            first: dict[tuple[int, float], int] = {}
            share = {}
            for i, (name, drop) in enumerate(module.lora_dropout.items()):
                if isinstance(drop, HashDropout):
                    share[name] = first.setdefault((drop.key_value, drop.p), i)
                    reused += share[name] != i
            module._mask_share = share
    return reused


def unsupported(lo: LoraConfig) -> str | None:
    """Why an adapter cannot train in a group (None: it can): the grouped forward is vanilla LoRA on a frozen base."""
    if lo.use_dora:
        return "lora.use_dora=true (DoRA's magnitude is not part of the grouped forward)"
    if lo.bias != "none":
        return f"lora.bias={lo.bias} (it trains the base's biases, which the jobs share)"
    if lo.init in ("pissa", "loftq"):
        return f"lora.init={lo.init} (it rewrites the base weights, which the jobs share)"
    return None


def group_adapters(model: torch.nn.Module, first: str, others: list[tuple[str, LoraConfig]], seed: int,
                   build_config, set_dtype) -> Routing:
    """Turn a PEFT model holding one adapter (`first`) into a group: add each other adapter (name, its LoRA config)
    initialised from `seed` as a run alone initialises it, make every adapter trainable, and route each LoRA layer's
    rows. Returns the routing the step sets."""
    from peft.tuners.lora import LoraLayer

    routing = Routing(jobs=[first] + [n for n, _ in others])
    for name, lo in others:
        torch.manual_seed(seed)  # the same init as the job alone (model.build_model seeds before wrapping)
        try:
            model.add_adapter(name, build_config(lo), autocast_adapter_dtype=lo.adapter_dtype == "float32")
        except TypeError:  # peft releases before the keyword: their adapters take the base's dtype, cast below
            model.add_adapter(name, build_config(lo))
            if lo.adapter_dtype == "float32":
                for n, p in model.named_parameters():
                    if f".{name}." in n:
                        p.data = p.data.float()
    model.base_model.set_adapter(routing.jobs)  # every adapter active and trainable
    for name, lo in others:
        set_dtype(model, lo, name)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module._routing = routing
            module._mask_share = {}  # share_dropout_masks fills it once the dropouts are installed
            module.forward = types.MethodType(_grouped_forward, module)
    return routing


class JobView:
    """One job's adapter as checkpoints, the optimizer and the guard see a model: its trainable parameters under the
    names they have in a model holding that adapter alone (`...lora_A.default.weight`)."""

    def __init__(self, model: torch.nn.Module, name: str):
        self.model, self.name = model, name
        tag = f".{name}."
        self._params = [(n.replace(tag, f".{DEFAULT}."), p) for n, p in model.named_parameters()
                        if tag in n and p.requires_grad]

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        yield from self._params

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        yield from (p for _, p in self._params)


def save_job_adapter(model: torch.nn.Module, name: str, directory) -> None:
    """The job's adapter in PEFT format, as `save_pretrained` of a model holding it alone writes it."""
    import json
    import shutil
    from pathlib import Path

    directory = Path(directory)
    staging = directory.with_name(directory.name + ".group")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, selected_adapters=[name])
    inner = staging / name if name != DEFAULT else staging
    config = json.loads((inner / "adapter_config.json").read_text())
    (inner / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    inner.rename(directory)
    shutil.rmtree(staging, ignore_errors=True)


def stack_inputs(inputs: dict, copies: int) -> dict:
    """A model's inputs for `copies` stacked copies of one micro-batch: every per-row tensor repeated along the batch
    dimension; packed boundaries (`cu_seq_lens_*`, over the flattened tokens) offset by each copy's start."""
    if copies == 1:
        return dict(inputs)
    total = inputs["input_ids"].numel()
    out = {}
    for key, value in inputs.items():
        if key.startswith("cu_seq_lens"):
            out[key] = torch.cat([value[:-1] + j * total for j in range(copies)] + [value[-1:] + (copies - 1) * total])
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = torch.cat([value] * copies)
        else:
            out[key] = value
    if "cu_seq_lens_q" in out:  # one tensor for both, as the single step passes it
        out["cu_seq_lens_k"] = out["cu_seq_lens_q"]
    return out


def head_loss(causal_lm: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, num_items: int,
              kernels: str) -> torch.Tensor:
    """What the causal LM's own forward computes after its decoder, for these rows: the LM head and the loss summed
    over label tokens / `num_items` (liger's fused linear cross-entropy with model.kernels=liger: no logits), so a
    decoder run over several jobs' rows gives each job the loss it would get alone (tests/test_fuse.py)."""
    if kernels == "liger":  # what liger's patched forward (lce_forward) computes in training
        from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss, unpack_cross_entropy_result

        result = LigerForCausalLMLoss(hidden_states=hidden, lm_head_weight=causal_lm.lm_head.weight, labels=labels,
                                      hidden_size=causal_lm.config.hidden_size, num_items_in_batch=num_items)
        return unpack_cross_entropy_result(result)[0]
    logits = causal_lm.lm_head(hidden)
    return causal_lm.loss_function(logits=logits, labels=labels, vocab_size=causal_lm.config.vocab_size,
                                   num_items_in_batch=num_items)
