"""The memory ledger against what the tiny model really holds, mode=plan, auto micro-batch, skipping unfit jobs."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from helpers import train_py
from qlora_lab.memory import plan
from qlora_lab.memory.ledger import predict
from qlora_lab.model import dropout, adapt, load, prepare, quantize, source
from qlora_lab.runner.resolve import resolve_spec
from qlora_lab.runner.run import run

MODEL_PRESETS = ["tiny", "phi4_mini", "llama3_8b", "qwen2_5_0_5b", "phi4_mini_shape", "llama3_8b_shape"]


def _storage_bytes(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _loaded(compose, overrides):
    cfg = resolve_spec(OmegaConf.to_object(compose(overrides + ["device=cpu"])), "cpu")[0].cfg  # dtype auto: fp32
    path = source.resolve_model_path(cfg.model, cfg.cache_dir, 0)
    backend = quantize.backend_of(cfg.quantization)
    model = load.load_model(path, cfg.model, backend.load_kwargs(cfg.quantization, source.model_config(cfg.model)),
                            "cpu")
    backend.after_load(model)
    return cfg, model


NF4_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")  # torchao's buffers


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8", "torchao_nf4", "none"])
def test_weight_and_lora_bytes_match_the_instantiated_model(compose, quant):
    """Every quantization backend's bytes per weight, as the ledger counts them, against the loaded model."""
    cfg, model = _loaded(compose, [f"quantization={quant}"])
    tensors = [p for p in model.parameters() if type(p).__name__ != "NF4Tensor"] + list(model.buffers())
    tensors += [getattr(p, part) for p in model.parameters() if type(p).__name__ == "NF4Tensor" for part in NF4_PARTS]
    for m in model.modules():
        scb = getattr(getattr(m, "weight", None), "SCB", None)  # int8: its row scales
        if scb is not None:
            tensors.append(scb)
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            tensors += [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])
    measured = sum(_storage_bytes(tensors).values())
    ledger = predict(cfg, device="cpu")
    weights = sum(i.bytes for i in ledger.items if i.name.startswith(("base", "quant", "embed")))
    assert weights == pytest.approx(measured, rel=1e-3)

    model = adapt.wrap_model(prepare.prepare_model(model, cfg.model, cfg.checkpointing, "cpu"), cfg.lora,
                             quantize.backend_of(cfg.quantization))
    lora = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert {i.name: i.bytes for i in ledger.items}["LoRA parameters"] == lora


@pytest.mark.parametrize("overrides", [["lora.dropout=0", "lora.adapter_dtype=bfloat16"], ["lora.dropout=0"],
                                       ["lora.dropout=0.1"], ["lora.kernel=fused", "lora.dropout=0"]])
def test_saved_activations_per_token_match_autograd(compose, overrides):
    """Count the bytes autograd really saves in one decoder layer, against the ledger's per-token formula (which
    describes a CUDA step: bf16 compute, what dtype=auto is there)."""
    cfg, model = _loaded(compose, ["checkpointing=none", "model.dtype=bfloat16", "quantization.compute_dtype=bfloat16"]
                         + overrides)
    model = adapt.wrap_model(prepare.prepare_model(model, cfg.model, cfg.checkpointing, "cpu"), cfg.lora,
                             quantize.backend_of(cfg.quantization))
    dropout.install(model, 0, dropout.MicroBatch())  # as build_model does: the counter-based masks, kept as bool
    layer = model.base_model.model.model.layers[1]
    captured = {}
    hook = layer.register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    batch, seq = 4, 64
    model(input_ids=torch.randint(0, model.config.vocab_size, (batch, seq)))
    hook.remove()
    saved: dict[int, int] = {}
    # the fused kernel's compute copies of fp32 adapter weights: a layer's constant, not bytes per token
    lora_shapes = {tuple(p.shape) for p in model.parameters() if p.requires_grad}

    def pack(t):
        if tuple(t.shape) not in lora_shapes:
            saved.update(_storage_bytes([t]))
        return t

    x = captured["args"][0].detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, *captured["args"][1:], **captured["kwargs"])
    params = _storage_bytes(model.parameters())
    per_token = sum(v for k, v in saved.items() if k not in params) / (batch * seq)
    predicted = predict(cfg, device="cpu").extra["per_token"]
    assert sum(predicted.values()) == pytest.approx(per_token, rel=0.01), predicted


def test_the_fused_kernel_keeps_its_dropout_mask_as_a_bool(compose):
    """With dropout, the fused LoRA kernel keeps each adapter's mask for backward as the bool it is drawn as (1 byte an
    element), not scaled in the compute dtype (2 bytes: 4.25 GiB more on the Phi-4-mini shape with every layer kept),
    and its gradients are what PEFT's modules compute (tests/test_pipeline.py compares the two kernels)."""
    cfg, model = _loaded(compose, ["checkpointing=none", "model.dtype=bfloat16", "quantization.compute_dtype=bfloat16",
                                   "lora.kernel=fused", "lora.dropout=0.1"])
    model = adapt.wrap_model(prepare.prepare_model(model, cfg.model, cfg.checkpointing, "cpu"), cfg.lora,
                             quantize.backend_of(cfg.quantization))
    dropout.install(model, 0, dropout.MicroBatch())
    model.train()
    proj = model.base_model.model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 5, proj.in_features, dtype=torch.bfloat16, requires_grad=True)  # 10 tokens: not r
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        proj(x)
    full = [t for t in kept if t.numel() == x.numel()]  # the input and the mask; nothing else has x's size
    assert sorted(str(t.dtype) for t in full) == ["torch.bfloat16", "torch.bool"], [t.dtype for t in kept]


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_plan_every_preset_offline_and_the_table_adds_up(compose, preset, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summary = run(compose([f"model={preset}", "mode=plan", "plan.gpu_memory_gib=80", "device=cpu"]))
    out = capsys.readouterr().out
    assert summary["summary/status"] == "planned" and "predicted peak (allocated)" in out
    cfg = OmegaConf.to_object(compose([f"model={preset}"]))
    ledger = predict(cfg)
    items = {i.name: i.bytes for i in ledger.items}
    assert sum(items[n] for n in ledger.peak_terms) == ledger.peak_bytes
    w = max(len(n) for n in [*items, "card needs (+slack, context)"])  # the table marks exactly the rows that add up to the peak
    rows = ledger.table().splitlines()[2:2 + len(items)]
    assert [r[:w].strip() for r in rows if r[w + 2] == "*"] == [n for n in items if n in ledger.peak_terms]
    assert max(len(r) for r in ledger.table().splitlines()) < 200
    assert summary["summary/predicted_peak_gib"] == pytest.approx(ledger.peak_gib)


def test_plan_phi4_matches_the_measured_h100_peak(compose):
    """Pinned to bench/results/2026-11-24_h100_ledger_accuracy.md: 22.92 GiB measured at batch 4 x 2048."""
    cfg = OmegaConf.to_object(compose(["model=phi4_mini_shape", "data.micro_batch_size=4", "lora.dropout=0"]))
    assert predict(cfg).peak_gib == pytest.approx(22.92, rel=0.02)


def test_auto_micro_batch_picks_the_largest_that_fits(compose):
    cfg = OmegaConf.to_object(compose(["model=llama3_8b_shape", "data.micro_batch_size=auto",
                                       "plan.gpu_memory_gib=24", "device=cpu"]))
    spec, ledger, budget = resolve_spec(cfg, "cpu")
    mb = ledger.micro_batch
    assert spec.cfg.data.micro_batch_size == mb >= 1 and spec.resolved["data.micro_batch_size"] == ["auto", mb]
    assert plan.fits(predict(cfg, mb), budget, cfg.plan.safety_margin)
    assert not plan.fits(predict(cfg, mb + 1), budget, cfg.plan.safety_margin)


def test_forced_oom_backs_off_and_is_reported():
    limit = 3  # a simulated allocator that holds three sequences at most

    def step(mb: int) -> None:
        if mb > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated) at micro-batch {mb}")

    mb, attempts = plan.verify_micro_batch(12, step)
    assert mb == 3
    assert [a["micro_batch"] for a in attempts] == [12, 6, 3] and [a["ok"] for a in attempts] == [False, False, True]
    assert "simulated" in attempts[0]["error"]
    with pytest.raises(RuntimeError, match="even a micro-batch of 1"):
        plan.verify_micro_batch(4, lambda mb: step(mb + 10))


def test_planned_multirun_skips_the_unfit_job(cache_dir, tmp_path):
    res = train_py(["-m", "data.micro_batch_size=8,200000", "plan.skip_unfit=true", "plan.gpu_memory_gib=2",
                    "optim.max_steps=2", "logger=none", "device=cpu"], cache_dir, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    jobs = sorted((tmp_path / "sweep").glob("*/summary.json"))
    status = {p.parent.name.split("_", 1)[0]: json.loads(p.read_text()) for p in jobs}
    assert status["0"]["summary/status"] == "finished"
    assert status["1"]["summary/status"] == "skipped" and "DOES NOT FIT" in status["1"]["summary/reason"]
    assert not (tmp_path / "sweep" / "1_data.micro_batch_size=200000,device=cpu,logger=none,optim.max_steps=2,"
                "plan.gpu_memory_gib=2,plan.skip_unfit=true" / "metrics.jsonl").exists()


def test_plan_multirun_prints_one_verdict_per_job(cache_dir, tmp_path):
    res = train_py(["-m", "mode=plan", "model=llama3_8b_shape", "data.micro_batch_size=1,16", "plan.gpu_memory_gib=24"],
                   cache_dir, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [x for x in res.stdout.splitlines() if x.startswith("PLAN ")]
    assert len(lines) == 2 and "fits 24.0 GiB" in lines[0] and "DOES NOT FIT" in lines[1]


def test_fsdp_plan_shards_every_parameter_term_per_process(compose):
    """distributed=fsdp on N processes: each parameter, gradient and AdamW term is 1/N, plus what FSDP gathers
    while computing (root + 2 layers); activations are per process and do not shrink. DDP adds a bucket copy."""
    base = ["experiment=llama3_8b_qlora", "model=llama3_8b_shape", "model.kernels=liger",
            "checkpointing=non_reentrant", "quantization.quant_storage=bfloat16"]
    one = predict(OmegaConf.to_object(compose(base)))
    full = {i.name: i.bytes for i in one.items}
    for n in (2, 8):
        led = predict(OmegaConf.to_object(compose(base + ["distributed=fsdp", f"plan.processes={n}"])))
        got = {i.name: i.bytes for i in led.items}
        for name in ("base weights, 4-bit", "quant constants", "embeddings, head, norms", "LoRA parameters",
                     "LoRA gradients", "optimizer states (AdamW)"):
            assert got[f"{name} (1/{n} shard)"] == -(-full[name] // n), name
        layer = (full["base weights, 4-bit"] + full["quant constants"]) // one.extra["arch"].layers
        assert got["FSDP gathered: root + 2 layers"] == full["embeddings, head, norms"] + 2 * layer
        assert got["checkpointed layer inputs"] == full["checkpointed layer inputs"]
        assert led.peak_bytes == sum(got[t] for t in led.peak_terms)
        assert led.phases["load"] == one.phases["load"]  # each process loads the whole model before sharding
        assert led.peak_bytes < one.peak_bytes
    ddp = predict(OmegaConf.to_object(compose(base + ["distributed=ddp", "plan.processes=2"])))
    assert ddp.peak_bytes == one.peak_bytes + full["LoRA gradients"]
