"""The stages on the tiny model: real 4-bit weights, LoRA-only gradients, equivalent checkpointing modes."""

from __future__ import annotations

import pytest
import torch

from qlora_lab.model.fused_lora import LoraLinearQuantized
from qlora_lab.model.layers import decoder_layers
from qlora_lab.train.step import count_label_tokens, forward_loss


def lora_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = forward_loss(model, batch, "cpu", count_label_tokens(batch))
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def randomize_lora_b(model, seed: int = 1) -> None:
    """LoRA B starts at zero, which makes A's gradient zero; give both a non-trivial gradient."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g).to(p.dtype) * 0.05


def test_nf4_really_quantizes_and_only_lora_trains(tiny):
    import bitsandbytes as bnb

    _, model, _, batch = tiny(["quantization=nf4"])
    base_linears = [m for n, m in model.named_modules() if n.endswith("base_layer")]
    assert base_linears and all(isinstance(m, bnb.nn.Linear4bit) for m in base_linears)
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4" for m in base_linears)
    assert all(m.weight.quant_state.nested for m in base_linears)  # double quant
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    randomize_lora_b(model)
    _, grads = lora_grads(model, batch)
    assert set(grads) == trainable  # gradients reach every LoRA weight and nothing else
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_int8_and_fp4_load_their_types(tiny):
    import bitsandbytes as bnb

    _, model, _, _ = tiny(["quantization=int8"])
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    _, model, _, _ = tiny(["quantization=fp4"])
    qs = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert qs and all(q.quant_type == "fp4" for q in qs)


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant", "offload"])
def test_checkpointing_mode_matches_none(tiny, mode):
    _, ref_model, _, batch = tiny(["checkpointing=none", "lora.dropout=0"])
    randomize_lora_b(ref_model)
    ref_loss, ref_grads = lora_grads(ref_model, batch)
    _, model, _, _ = tiny([f"checkpointing={mode}", "lora.dropout=0"])
    randomize_lora_b(model)
    loss, grads = lora_grads(model, batch)
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grad_accumulation_equals_one_large_batch(tiny):
    """Two half batches, each divided by the whole window's token count, give the full batch's gradient."""
    _, model, _, batch = tiny(["checkpointing=none", "lora.dropout=0"])
    randomize_lora_b(model)
    full_loss, full = lora_grads(model, batch)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    n = sum(count_label_tokens(h) for h in halves)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for h in halves:
        loss = forward_loss(model, h, "cpu", n)
        loss.backward()
        total += float(loss)
    assert total == pytest.approx(full_loss, rel=1e-4)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, full[name], rtol=1e-3, atol=1e-6)


def test_eval_mode_does_not_break_cpu_4bit_gradients(tiny):
    """bitsandbytes' CPU eval path repacks weights into a format without backward; prepare turns it off."""
    _, model, _, batch = tiny(["checkpointing=none", "lora.dropout=0"])
    randomize_lora_b(model)
    _, before = lora_grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    model.train()
    _, after = lora_grads(model, batch)
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


def test_target_module_that_matches_nothing_names_the_real_ones(spec_of):
    """The adapt stage's own message (a config is refused earlier, from the meta-device model: test_bad_inputs.py)."""
    import dataclasses

    from qlora_lab.model import adapt, model_source
    from qlora_lab.model.load import load_model
    from qlora_lab.model.quantize import backend_of

    spec = spec_of()
    base = load_model(model_source(spec).path, spec.cfg.model, {}, "cpu")
    with pytest.raises(ValueError) as e:
        adapt.wrap_model(base, dataclasses.replace(spec.cfg.lora, target_modules=["qkv_proj"]),
                         backend_of(spec.cfg.quantization))
    assert "q_proj" in str(e.value) and "matches no module" in str(e.value)


def test_bf16_adapters_and_dora_train(tiny):
    _, model, _, batch = tiny(["lora.adapter_dtype=bfloat16"])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)
    _, model, _, batch = tiny(["lora=dora"])
    assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)
    loss, grads = lora_grads(model, batch)
    assert torch.isfinite(torch.tensor(loss)) and grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_matches_peft(tiny, dropout):
    """lora.kernel=fused gives PEFT's loss and LoRA gradients (same dropout masks), as accurately or better.

    Both run bf16 adapters; PEFT rounds the LoRA output, its scaling and the sum to bf16 one op at a time while
    the fused path adds inside the GEMM's fp32 accumulator, so the reference for accuracy is PEFT with fp32
    adapters (what the default config trains with).
    """
    def run(kernel: str, dtype: str = "bfloat16"):  # bf16 compute, as on CUDA (dtype=auto is fp32 on the CPU)
        _, model, _, batch = tiny([f"lora.kernel={kernel}", f"lora.adapter_dtype={dtype}", f"lora.dropout={dropout}",
                                   "model.dtype=bfloat16", "quantization.compute_dtype=bfloat16",
                                   "checkpointing=none"])
        randomize_lora_b(model)  # non-zero B, so the LoRA path carries signal both ways
        torch.manual_seed(3)
        return lora_grads(model, batch)

    exact_loss, exact = run("peft", "float32")
    ref_loss, ref = run("peft")

    def err(grads):  # per tensor, relative to the fp32-adapter gradients
        return {n: float((grads[n].float() - exact[n]).norm() / exact[n].norm()) for n in exact}

    peft_bf16 = err(ref)
    for dtype in ("bfloat16", "float32"):  # float32: master weights, cast to bf16 for the matmuls
        calls = []
        orig = LoraLinearQuantized.forward
        LoraLinearQuantized.forward = staticmethod(lambda *a: calls.append(1) or orig(*a))
        try:
            loss, got = run("fused", dtype)
        finally:
            LoraLinearQuantized.forward = staticmethod(orig)
        assert len(calls) == 28  # 4 layers x 7 projections, every one fused
        assert abs(loss - exact_loss) < 1e-2 and abs(loss - ref_loss) < 1e-2
        assert got.keys() == ref.keys() == exact.keys()
        assert all(got[n].dtype == getattr(torch, dtype) for n in got)  # gradients in the parameters' dtype
        fused = err(got)
        print(f"dropout {dropout}, {dtype} adapters: loss fused {loss:.5f}, peft bf16 {ref_loss:.5f}, fp32 adapters "
              f"{exact_loss:.5f}; grad error vs fp32 adapters: fused max {max(fused.values()):.4f}, peft bf16 max "
              f"{max(peft_bf16.values()):.4f}")
        for name in exact:  # bf16 compute costs some accuracy; the fused path adds none
            assert fused[name] <= 1.25 * peft_bf16[name] + 5e-3, (name, fused[name], peft_bf16[name])


def test_compiled_layers_capture_whole_and_match_eager(tiny):
    """model.compile=layers: every decoder layer (4-bit dequant, fused LoRA, RoPE, norms, checkpointing around it)
    is captured as one graph with no break (fullgraph=True fails on any), and the captured program computes the
    eager loss and LoRA gradients exactly. The CPU uses the aot_eager backend (graph capture + autograd, no
    codegen); inductor's generated kernels are checked on CUDA (tests/test_gpu.py)."""
    overrides = ["lora.kernel=fused", "lora.adapter_dtype=bfloat16", "lora.dropout=0"]
    _, model, _, batch = tiny(overrides + ["model.compile=none"])
    randomize_lora_b(model)
    ref_loss, ref = lora_grads(model, batch)
    torch._dynamo.reset()
    _, model, _, _ = tiny(overrides + ["model.compile=layers"], compile_backend="aot_eager", fullgraph=True)
    assert len(decoder_layers(model)) == 4 and all(hasattr(layer, "_compiled_call_impl")
                                                   and layer._compiled_call_impl is not None
                                                   for layer in decoder_layers(model))
    randomize_lora_b(model)
    loss, got = lora_grads(model, batch)
    assert loss == ref_loss
    assert all(torch.equal(got[n], ref[n]) for n in ref)


def test_evaluation_runs_compiled_layers_eagerly(tiny):
    """The eval loss runs on padded batches of held-out rows, in shapes training never had: compiled layers would
    compile again for each (14-19 s of a 10-step phi4-mini job on an H200, measured before this ran them eagerly).
    A counting backend sees every compile: none during evaluation, one for a training forward (the control)."""
    from qlora_lab.data import rows, tokenize
    from qlora_lab.train.evaluate import evaluate_loss

    compiles = []

    def counting(gm, example_inputs):
        compiles.append(len(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    cfg, model, tok, batch = tiny(["model.compile=layers"], compile_backend=counting)
    held_out = tokenize.build_examples(rows.read_rows(cfg.data)[8:20], tok, cfg.model.max_seq_len, True).examples
    assert len({len(e.input_ids) for e in held_out}) > 1  # batches of several padded lengths
    loss = evaluate_loss(model, held_out, 4, tok.pad_token_id, "cpu")
    assert compiles == [] and loss == loss  # not NaN
    model.train()
    forward_loss(model, batch, "cpu", 1)
    assert compiles  # the layers are compiled: training compiles them


def test_fp16_with_fp32_norms_trains(tiny):
    """model.upcast=norms in a float16 model: the norms hold and compute fp32 and hand fp16 on, so the unquantized
    16-bit LM head after the last norm gets its own dtype (it failed with "expected m1 and m2 to have the same
    dtype"); the LoRA weights get finite gradients."""
    _, model, _, batch = tiny(["model.dtype=float16", "quantization.compute_dtype=float16", "model.upcast=norms"])
    norms = [m for m in model.modules() if "norm" in type(m).__name__.lower()]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert model.get_output_embeddings().weight.dtype == torch.float16
    loss, grads = lora_grads(model, batch)
    assert torch.isfinite(torch.tensor(loss)) and grads and all(torch.isfinite(g).all() for g in grads.values())
