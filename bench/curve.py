"""Loss curves of the seed recipe and of a qlora-lab preset on the same weights, LoRA init and batches.

  python bench/curve.py --shape phi4mini --steps 50 --variants preset bf16_adapters   # the seed recipe + each
  python bench/curve.py --worker seed|<variant> phi4mini 50 [cache dir]   # one curve, printed as one JSON line

Both load the same random-init checkpoint of the shape (built by qlora-lab's loader), seed the LoRA init the same
way (torch.manual_seed right before PEFT wraps the model: same A matrices, B = 0), and train on the same cycle of
4 seeded random-token batches (2 x 1024 tokens) with AdamW lr 2e-4, so the curves differ only by the numerics of
the two paths. seed = transformers + bitsandbytes nf4 + prepare_model_for_kbit_training (fp32 upcast) + PEFT,
HF cross-entropy; the variants are sets of qlora-lab levers (LEVERS), `preset` being experiment=phi4_mini_qlora's.
"""

from __future__ import annotations

import json
import subprocess
import sys

from common import DEFAULT_CACHE, ROOT, bench_spec  # bench/ is on sys.path when this script runs

LR, BS, SEQ, POOL = 2e-4, 2, 1024, 4
FUSED = ["model.kernels=liger", "lora.kernel=fused"]
LEVERS = {
    "preset": FUSED + ["lora.adapter_dtype=float32", "model.compile=layers", "checkpointing=offload"],
    "bf16_adapters": FUSED + ["lora.adapter_dtype=bfloat16", "model.compile=layers", "checkpointing=offload"],
    "fused_bf16": FUSED + ["lora.adapter_dtype=bfloat16"],
}


def worker(kind: str, shape: str, steps: int, cache_dir: str = DEFAULT_CACHE) -> dict:
    import torch

    from qlora_lab.model import build_model, model_source

    spec = bench_spec(shape, ["quantization=nf4", "lora.dropout=0", "checkpointing=non_reentrant",
                              *LEVERS.get(kind, [])], SEQ, cache_dir)
    source = model_source(spec)
    path = source.path
    if kind == "seed":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0},
                                                     attn_implementation="sdpa",
                                                     quantization_config=BitsAndBytesConfig(
                                                         load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True,
                                                         bnb_4bit_compute_dtype=torch.bfloat16))
        model.config.use_cache = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(1234)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    else:
        # seeded right after prepare, i.e. right before PEFT wraps the model, as the seed recipe is above
        model = build_model(spec, source, on_phase=lambda p: p == "prepare" and torch.manual_seed(1234)).model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    gen = torch.Generator(device="cuda").manual_seed(0)
    pool = [torch.randint(0, model.config.vocab_size, (BS, SEQ), device="cuda", generator=gen) for _ in range(POOL)]
    losses = []
    for step in range(steps):
        x = pool[step % POOL]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return {"kind": kind, "shape": shape, "losses": losses}


def main(shape: str, steps: int, variants: list[str]) -> None:
    curves = {}
    for kind in ["seed", *variants]:
        out = subprocess.run([sys.executable, __file__, "--worker", kind, shape, str(steps)], capture_output=True,
                             text=True, cwd=ROOT)
        lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if not lines:
            print(f"{kind}: failed: {out.stderr[-1500:]}")
            continue
        curves[kind] = json.loads(lines[-1])["losses"]
    seed = curves.pop("seed", None)
    if seed is None:
        return
    print(f"\n## Loss curve, {shape}, {steps} steps, same weights / LoRA init / batches\n")
    print("| step | seed recipe | " + " | ".join(f"{k} | rel. diff" for k in curves) + " |")
    print("|---|---|" + "---|---|" * len(curves))
    for i in sorted({0, 1, 2, 4, 9, 19, 29, 39, steps - 1} & set(range(steps))):
        print(f"| {i} | {seed[i]:.4f} | " + " | ".join(f"{c[i]:.4f} | {abs(c[i] - seed[i]) / abs(seed[i]):.2%}"
                                                      for c in curves.values()) + " |")
    print()
    for k, c in curves.items():
        rel = [abs(a - b) / abs(a) for a, b in zip(seed, c)]
        print(f"- {k} ({' '.join(LEVERS[k])}): step-0 |diff| {abs(seed[0] - c[0]):.4f}; max rel. diff over {steps} "
              f"steps {max(rel):.2%} (at step {rel.index(max(rel))}); loss fell {seed[0] - seed[-1]:.3f} (seed) / "
              f"{c[0] - c[-1]:.3f}")


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        cache = sys.argv[5] if len(sys.argv) > 5 else DEFAULT_CACHE
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), cache)), flush=True)
    else:
        import argparse

        ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--shape", default="phi4mini")
        ap.add_argument("--steps", type=int, default=50)
        ap.add_argument("--variants", nargs="+", default=["preset"], choices=sorted(LEVERS))
        a = ap.parse_args()
        main(a.shape, a.steps, a.variants)
