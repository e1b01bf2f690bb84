"""The memory ledger: predict every component of a training step's GPU memory from the config alone.

The model is instantiated on the meta device (shapes, no weights), so planning an 8B model takes a second on
a CPU. Each component is a formula over that architecture and the run's settings; `Ledger.table()` prints the
formula inputs beside each figure. All figures are the caching allocator's *allocated* bytes (what
`torch.cuda.max_memory_allocated` reports); the CUDA context and the allocator's slack are listed apart, since
they count against the card but not against that statistic.

Notation, per token: h hidden size, q = heads x head_dim, kv = kv_heads x head_dim, I intermediate size,
nH heads, r LoRA rank; c = 2 bytes (bf16 compute), a = adapter bytes (4 fp32, 2 bf16); T = micro-batch x seq
tokens; V vocabulary; L layers.

Saved for backward per layer and token (HF Llama/Phi-3 layer, PEFT LoRA on a frozen base whose matmuls save
no input):
- each RMSNorm: an fp32 copy of its input and 1/rms: 4h + 4 (liger's RMSNorm: its bf16 input and 1/rms: 2h + 4)
- attention (SDPA flash, no padding mask, native GQA): q, k, v after RoPE and the output: c(2q + 2kv), and
  the fp32 log-sum-exp: 4 nH
- MLP: SiLU's input, its output and the up projection: 3cI (liger's fused SiLU*mul keeps gate and up: 2cI)
- LoRA: every adapter keeps its input for dA (once per distinct input when it is the bf16 tensor itself;
  a copy per adapter when cast to fp32 (a·in) or after dropout (mask + output: (1 + a)·in)) and A's output a·r
With checkpointing only each layer's input (c·h) is kept per layer, and one layer is recomputed in backward.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from qlora_lab.core.dist import launched_world_size
from qlora_lab.core.modes import MODES, layer_modes
from qlora_lab.core.schema import LoraConfig, TrainConfig
from qlora_lab.memory.readings import GIB
from qlora_lab.model.quantize import backend_of
from qlora_lab.model.source import model_config

CUDA_CONTEXT_GIB = 0.55  # CUDA context + cuBLAS workspace on Hopper: outside the allocator's statistics
ALLOCATOR_SLACK = 0.08  # reserved/allocated overhead (fragmentation, rounding) observed on training steps

# Which linear layers read the same input tensor: adapters on one group share that input when it is saved as is.
INPUT_GROUPS = {
    "attn_in": ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv"),
    "attn_out": ("o_proj", "dense", "out_proj"),
    "mlp_in": ("gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3"),
    "mlp_mid": ("down_proj", "fc2", "w2"),
}


# The layer types PEFT's LoRA wraps (and transformers' Conv1D, GPT-2's linear layer, matched by class name); a
# norm, an activation or a whole block is none of them, and PEFT rejects it only after the weights have loaded.
ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)


@dataclass
class Arch:
    """What the ledger needs to know of a model, read off a meta-device instance."""

    model_type: str
    vocab: int
    hidden: int
    q_dim: int
    kv_dim: int
    intermediate: int
    heads: int
    layers: int
    head_dim: int
    tied: bool
    layer_linears: dict[str, tuple[int, int]]  # suffix -> (in, out) for one decoder layer
    linear_params: int  # all linear weights but the LM head (the quantized ones)
    linear_shapes: list[tuple[int, int]]  # each of those weights' (out, in): quant constants are per weight
    other_params: int  # embeddings, LM head (if untied), norms
    largest_linear: int  # elements of the largest quantized weight (dequantized in full for each matmul)
    max_positions: int | None
    module_names: list[str] = field(default_factory=list)  # every module's full name (what LoRA targets match)
    linear_suffixes: list[str] = field(default_factory=list)  # distinct last name parts of the nn.Linear modules
    module_types: dict[str, str] = field(default_factory=dict)  # full name -> class name
    adaptable: set[str] = field(default_factory=set)  # full names of the modules LoRA can wrap (ADAPTABLE)


def read_arch(cfg: TrainConfig) -> Arch:
    from transformers import AutoModelForCausalLM

    config = model_config(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    skip = set(backend_of(cfg.quantization).unquantized(cfg.quantization))
    shapes = [(mod.out_features, mod.in_features) for name, mod in model.named_modules()
              if isinstance(mod, torch.nn.Linear) and mod is not head and name.rsplit(".", 1)[-1] not in skip]
    linear_params, largest = sum(o * i for o, i in shapes), max(o * i for o, i in shapes)
    total = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, counted once
    layer = model.model.layers[0]
    layer_linears = {n.rsplit(".", 1)[-1]: (mod.in_features, mod.out_features)
                     for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Arch(
        model_type=config.model_type, vocab=config.vocab_size, hidden=config.hidden_size, q_dim=heads * head_dim,
        kv_dim=getattr(config, "num_key_value_heads", heads) * head_dim, intermediate=config.intermediate_size,
        heads=heads, layers=config.num_hidden_layers, head_dim=head_dim,
        tied=head is not None and head.weight is model.get_input_embeddings().weight,
        layer_linears=layer_linears, linear_params=linear_params, linear_shapes=shapes,
        other_params=total - linear_params,
        largest_linear=largest, max_positions=getattr(config, "max_position_embeddings", None),
        module_names=[n for n, _ in model.named_modules() if n],
        module_types={n: type(mod).__name__ for n, mod in model.named_modules() if n},
        adaptable={n for n, mod in model.named_modules() if isinstance(mod, ADAPTABLE) or type(mod).__name__ == "Conv1D"},
        linear_suffixes=sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                                if isinstance(mod, torch.nn.Linear)}),
    )


@dataclass
class Item:
    name: str
    inputs: str
    bytes: int
    kind: str  # static | activation | transient | outside


@dataclass
class Ledger:
    items: list[Item]
    peak_bytes: int
    peak_where: str
    phases: dict[str, int]  # predicted allocated bytes after each phase, for the measured ledger
    peak_terms: list[str]  # the items that add up to the peak (the other transients happen at other times)
    micro_batch: int
    seq_len: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def card_gib(self) -> float:
        """What the card must hold: allocated peak plus allocator slack plus the CUDA context."""
        return self.peak_gib * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB

    def table(self) -> str:
        """The ledger as the console shows it; the rows that add up to the peak carry a `*`."""
        w = max(len(n) for n in [*(i.name for i in self.items), "card needs (+slack, context)"])
        lines = [f"{'component':<{w}}    {'kind':<10} {'GiB':>8}  formula inputs", "-" * (w + 72)]
        for i in self.items:
            mark = "*" if i.name in self.peak_terms else " "
            lines.append(f"{i.name:<{w}}  {mark} {i.kind:<10} {i.bytes / GIB:8.3f}  {i.inputs}")
        lines.append("-" * (w + 72))
        lines.append(f"{'predicted peak (allocated)':<{w}}    {'':<10} {self.peak_gib:8.3f}  at {self.peak_where}: "
                     f"the sum of the {len(self.peak_terms)} rows marked *")
        lines.append(f"{'card needs (+slack, context)':<{w}}    {'':<10} {self.card_gib:8.3f}  "
                     f"x{1 + ALLOCATOR_SLACK:.2f} + {CUDA_CONTEXT_GIB} GiB context")
        return "\n".join(lines)


def _weight_bytes(arch: Arch, cfg: TrainConfig) -> list[Item]:
    """The base: its linear weights as the quantization backend stores them, the rest in model.dtype."""
    m = cfg.model
    dt = 4 if m.dtype == "float32" or m.upcast == "all" else 2
    weights = backend_of(cfg.quantization).weight_bytes(cfg.quantization, arch.linear_shapes, dt)
    items = [Item(w.name, w.inputs, w.bytes, "static") for w in weights]
    items.append(Item("embeddings, head, norms", f"{arch.other_params:,} params x {dt} B"
                      + (" (head tied)" if arch.tied else ""), arch.other_params * dt, "static"))
    return items


def _lora_modules(arch: Arch, cfg: TrainConfig) -> dict[str, tuple[int, int]]:
    targets = list(cfg.lora.target_modules)
    if targets == ["all-linear"]:
        return dict(arch.layer_linears)
    return {k: v for k, v in arch.layer_linears.items() if k in targets}


def _group_of(name: str) -> str:
    for group, names in INPUT_GROUPS.items():
        if name in names:
            return group
    return name  # unknown layout: its input counted on its own


def activation_bytes_per_token(arch: Arch, cfg: TrainConfig, device: str = "cuda",
                               masks: set | None = None) -> dict[str, float]:
    """Bytes saved for backward by one decoder layer per token, by part (checkpointing off).

    `device` is kept for callers; the dropout mask is a bool on every device (model/dropout.py). `masks`: the
    (layer, p) whose mask a fused group already keeps (model/grouped.py: jobs with the same dropout share it),
    filled as adapters are counted; None for one adapter.
    """
    c = 2
    # PEFT runs fp32 adapters on an fp32 copy of the input; the fused kernel casts the (small) weights instead
    a = 4 if cfg.lora.adapter_dtype == "float32" and cfg.lora.kernel != "fused" else 2
    liger = cfg.model.kernels == "liger"
    h, I = arch.hidden, arch.intermediate
    parts = {
        "norms": 2 * ((2 * h + 4) if liger else (4 * h + 4)),
        "attention": c * (2 * arch.q_dim + 2 * arch.kv_dim) + 4 * arch.heads,
        "mlp": (2 if liger else 3) * c * I,
    }
    if cfg.model.attn_implementation == "eager":
        # eager attention keeps the fp32 softmax output and its bf16 cast: nH x seq per token each
        parts["attention"] += (4 + c) * arch.heads * cfg.model.max_seq_len
    lora = 0.0
    shared: set[str] = set()
    for name, (din, _) in _lora_modules(arch, cfg).items():
        lora += a * cfg.lora.r  # A's output, kept for dB
        if cfg.lora.dropout > 0:
            # dropout's bool mask (once per layer and p in a group) + the dropped input, per adapter
            kept = masks is not None and (name, cfg.lora.dropout) in masks
            lora += (0 if kept else 1) * din + a * din
            if masks is not None:
                masks.add((name, cfg.lora.dropout))
        elif a != c:
            lora += a * din  # an fp32 copy of the input, per adapter
        else:
            group = _group_of(name)
            if group not in shared and group != "attn_out":  # attn_out's input is SDPA's output, counted above
                lora += c * din
            shared.add(group)
    parts["lora"] = lora
    return parts


def processes(cfg: TrainConfig) -> int:
    """How many processes the run is planned for: plan.processes, else the launcher's WORLD_SIZE."""
    return cfg.plan.processes or launched_world_size()


SHARDED = ("base weights", "quant constants", "embeddings", "LoRA parameters", "LoRA gradients",
           "optimizer states (AdamW)")


def _fsdp_items(items: list[Item], arch: Arch, n: int) -> list[Item]:
    """Per process under FSDP2 on `n` processes: every parameter, gradient and AdamW state is a 1/n shard; while
    computing, the root's parameters (embeddings, head, final norm: FSDP2 keeps the root unsharded from its
    forward to the end of its backward) and two decoder layers (the running one and the prefetched next) are
    gathered whole."""
    out = []
    for i in items:
        out.append(Item(f"{i.name} (1/{n} shard)", i.inputs + f" / {n}", -(-i.bytes // n), i.kind)
                   if i.name.startswith(SHARDED) else i)
    layer = sum(i.bytes for i in items if i.name.startswith(("base weights", "quant constants"))) // arch.layers
    root = next(i.bytes for i in items if i.name.startswith("embeddings"))
    out.append(Item("FSDP gathered: root + 2 layers", f"embeddings/head/norms {root / GIB:.2f} GiB + 2 x "
                    f"{layer / GIB:.3f} GiB per layer", root + 2 * layer, "static"))
    return out


def predict(cfg: TrainConfig, micro_batch: int | None = None, arch: Arch | None = None,
            device: str = "cuda", adapters: list[LoraConfig] | None = None,
            modes: list[str] | None = None) -> Ledger:
    """The ledger of one training step at `micro_batch` x model.max_seq_len tokens (CUDA allocator bytes).

    `adapters`: the LoRA configs of a fused group (runner/fuse.py), each training on its own copy of the batch (the
    copies stacked: the base's activations scale with their number, each adapter adds its own); default the run's
    one. `modes`: each layer's keep/recompute/offload (default: what cfg.checkpointing says).
    """
    arch = arch or read_arch(cfg)
    adapters = adapters or [cfg.lora]
    copies = len(adapters)
    modes = modes or layer_modes(cfg.checkpointing, arch.layers)
    mb = micro_batch or int(cfg.data.micro_batch_size)
    seq = cfg.model.max_seq_len
    T = mb * seq  # tokens of one copy
    TN = T * copies
    c = 2
    items = _weight_bytes(arch, cfg)

    a_bytes = [4 if lo.adapter_dtype == "float32" else 2 for lo in adapters]
    counts = [_lora_params(arch, cfg, lo) for lo in adapters]
    lora_bytes = sum(n * a for n, a in zip(counts, a_bytes))
    lora_params = sum(counts)
    who = "" if copies == 1 else f" ({copies} adapters)"
    items.append(Item("LoRA parameters" + who, f"{lora_params:,} = L x sum r(in+out) x {a_bytes[0]} B", lora_bytes,
                      "static"))
    items.append(Item("LoRA gradients" + who, f"{lora_params:,} x {a_bytes[0]} B", lora_bytes, "static"))
    if cfg.optim.name == "paged_adamw_8bit":
        items.append(Item("optimizer states (paged, managed memory)", f"{lora_params:,} x 2 B, outside the allocator",
                          lora_params * 2, "outside"))
    else:
        items.append(Item("optimizer states (AdamW)" + who, f"{lora_params:,} x 2 states x {a_bytes[0]} B",
                          2 * lora_bytes, "static"))
    items.append(Item("input batch", f"3 x {TN:,} tokens x 8 B (ids, labels, mask)", 3 * TN * 8, "static"))
    weights_loaded = sum(i.bytes for i in items if i.name.startswith(("base", "quant", "embed")))
    n_proc = processes(cfg)
    if cfg.distributed.name == "fsdp" and n_proc > 1:
        items = _fsdp_items(items, arch, n_proc)
    elif cfg.distributed.name == "ddp" and n_proc > 1:
        items.append(Item("DDP gradient buckets", f"a copy of the LoRA gradients, {lora_params:,} x {a_bytes[0]} B",
                          lora_bytes, "static"))
    static = sum(i.bytes for i in items if i.kind == "static")

    per_tok = activation_bytes_per_token(arch, cfg, device)
    masks: set = set()  # a group's jobs with the same dropout keep one mask per layer
    lora_tok = [activation_bytes_per_token(arch, dataclasses.replace(cfg, lora=lo), device, masks)["lora"]
                for lo in adapters]
    base_tok = sum(v for k, v in per_tok.items() if k != "lora")
    layer_saved = int(base_tok * TN + sum(lora_tok) * T)  # one layer's activations kept for backward
    chunk = cfg.model.mlp_chunk
    tiled = 0 < chunk < TN  # model.mlp_chunk: the MLP's intermediates exist for one piece of tokens at a time
    mlp_saved = per_tok["mlp"] * TN
    if tiled:
        layer_saved = int(layer_saved - mlp_saved)  # kept: only the pieces' inputs (views of the norm's output)
    layer_in = TN * arch.hidden * c
    detail = ", ".join(f"{k} {v:,.0f}" for k, v in per_tok.items())
    n_keep, n_rc, n_off = (modes.count(m) for m in MODES)
    saved = 0
    if n_keep:
        items.append(Item("activations kept for backward", f"{n_keep} layers x T={TN:,} x ({detail}) B/token",
                          n_keep * layer_saved, "activation"))
        saved += n_keep * layer_saved
    if n_rc:
        items.append(Item("checkpointed layer inputs", f"{n_rc} layers x T={TN:,} x h={arch.hidden} x {c} B",
                          n_rc * layer_in, "activation"))
        saved += n_rc * layer_in
    if n_off:
        items.append(Item("checkpointed layer inputs (host memory)", f"{n_off} layers x T x h x {c} B, pinned on "
                          "the CPU", n_off * layer_in, "outside"))
        items.append(Item("offload copy-back buffers", f"2 x T x h x {c} B (current + prefetched)", 2 * layer_in,
                          "activation"))
        saved += 2 * layer_in
    mlp_piece = int(per_tok["mlp"] * chunk) if tiled else 0  # one piece's intermediates, recomputed in backward
    if n_rc or n_off:
        items.append(Item("recompute of one layer", f"T x ({detail}) B/token"
                          + (f", MLP in pieces of {chunk} tokens" if tiled else ""), layer_saved + mlp_piece,
                          "transient"))
    # Gradients in flight through one layer's backward: d(hidden) and residual, d(MLP intermediates), plus
    # the one quantized weight dequantized to bf16 for its input gradient.
    mlp_tokens = chunk if tiled else TN
    layer_grad = TN * c * 3 * arch.hidden + mlp_tokens * c * 3 * arch.intermediate + arch.largest_linear * c
    items.append(Item("layer backward working set", f"T x {c} x 3h + {'chunk' if tiled else 'T'} x {c} x 3I + "
                      f"largest weight x {c} B", layer_grad, "transient"))

    V = arch.vocab
    if cfg.model.kernels == "liger":
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(T / math.ceil(V / arch.hidden)))))
        # each adapter's loss keeps d(hidden) of its rows from its forward until the backward
        loss = TN * arch.hidden * c + chunk * V * (c + 4)
        items.append(Item("loss (liger fused linear CE)", f"d(hidden) T x h x {c} + chunk {chunk} x V={V:,} x 6 B",
                          loss, "transient"))
        loss_fwd = loss
    else:
        # logits bf16 (2), their fp32 upcast (4) and log_softmax's fp32 output (4) in forward; in backward the
        # saved output, its incoming gradient and log_softmax's input gradient, all fp32 (12); a group's adapters
        # each keep their saved output until the one backward
        loss = 12 * T * V + 4 * T * V * (copies - 1)
        loss_fwd = 4 * TN * V  # log_softmax's output stays saved after the forward
        items.append(Item("logits + cross-entropy", f"T={T:,} x V={V:,} x 12 B (fp32 grads of log_softmax)"
                          + (f" + {copies - 1} x 4 B saved" if copies > 1 else ""), loss, "transient"))

    # Peak: at the start of backward (everything saved + loss buffers) or inside one layer's backward.
    at_loss = static + saved + loss
    recompute = layer_saved + mlp_piece if (n_rc or n_off) else mlp_piece
    at_layer = static + saved + recompute + layer_grad
    kept = [i.name for i in items if i.kind in ("static", "activation")]
    if at_loss >= at_layer:
        peak, where, terms = at_loss, "the loss backward (logits)", kept + [items[-1].name]
    else:
        extra = ["recompute of one layer"] if recompute else []
        peak, where, terms = at_layer, "a layer's backward", kept + extra + ["layer backward working set"]
    weights = sum(i.bytes for i in items if i.kind == "static" and i.name.startswith(("base", "quant", "embed")))
    if weights_loaded > peak:  # FSDP on many processes: each loads the whole quantized model before sharding it
        peak, where, terms = weights_loaded, "loading (each process holds the whole model until FSDP shards it)", \
            ["base weights, quant constants, embeddings before sharding"]
    phases = {
        "load": weights_loaded,
        "wrap": weights + lora_bytes,
        "first_forward": weights + lora_bytes + saved + loss_fwd,
        "first_backward": weights + 2 * lora_bytes,
        "first_optimizer_step": static - lora_bytes - 3 * TN * 8,  # gradients freed, states kept
        "step_peak": peak,
    }
    host = n_off * layer_in
    return Ledger(items, peak, where, phases, terms, mb, seq,
                  {"per_token": per_tok, "arch": arch, "modes": modes, "host_bytes": host, "copies": copies})


def _lora_params(arch: Arch, cfg: TrainConfig, lo: LoraConfig) -> int:
    mods = _lora_modules(arch, dataclasses.replace(cfg, lora=lo))
    return arch.layers * sum(lo.r * (i + o) + (o if lo.use_dora else 0) for i, o in mods.values())
