"""Padding-free packing: every document in a pack computes what it computes alone, and nothing crosses a boundary.

The tiny model runs in float32 here (quantization=none, model.dtype=float32), so what is compared is the packing,
not bf16 rounding: packed against alone, logits differed by at most 4.7e-6 and LoRA gradients by 1.3e-6 relative
when measured (CPU, SDPA with the block mask against SDPA on the document alone); the bounds are about 4x that.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from helpers import launch, step_records
from qlora_lab.data.batching import Collator, collate, label_count
from qlora_lab.data.packing import collate_packed, fill_fraction, max_segments, pack, segment_slots
from qlora_lab.data.rows import read_rows
from qlora_lab.data.tokenize import IGNORE_INDEX, build_examples
from qlora_lab.model.attention import unpacked
from qlora_lab.train.step import forward_loss

FP32 = ["quantization=none", "model.dtype=float32", "lora.dropout=0", "checkpointing=none", "data.packing=true"]
LOGIT_TOL, GRAD_TOL = 2e-5, 1e-5  # see the module docstring


def randomize_lora_b(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g).to(p.dtype) * 0.05


def docs_and_pack(tiny, n_docs: int = 7, length: int = 64):
    cfg, model, tok, _ = tiny(FP32)
    rows = read_rows(cfg.data)[:n_docs]
    docs = build_examples(rows, tok, cfg.model.max_seq_len, True).examples
    randomize_lora_b(model)
    bins = [[docs[i] for i in row] for row in pack([len(d.input_ids) for d in docs], length)]
    return model, tok, docs, bins, Collator(tok.pad_token_id, rows=len(bins), length=length)


def logits_alone(model, doc, pad_id):
    with unpacked(model), torch.no_grad():
        batch = collate([doc], pad_id)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0].float()


def logits_packed(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_q"],
                     max_length_q=batch["max_length_q"], max_length_k=batch["max_length_k"]).logits.float()


def spans(bins, length):
    """(row, start, document) of every document in the packed rows."""
    out = []
    for r, b in enumerate(bins):
        o = 0
        for d in b:
            out.append((r, o, d))
            o += len(d.input_ids)
    return out


def test_segment_slots_are_few_shapes_and_never_too_few():
    assert [segment_slots(n, 4, 2048) for n in (0, 1, 16, 17, 20, 33)] == [16, 16, 16, 32, 32, 64]
    assert segment_slots(10_000, 4, 2048) == max_segments(4, 2048) and segment_slots(30, 1, 16) == 9


def test_best_fit_decreasing_fills_rows_and_keeps_every_document():
    rng = random.Random(0)
    lengths = [min(2048, max(8, int(rng.lognormvariate(5.86, 0.9)))) for _ in range(3000)]  # median ~350
    rows = pack(lengths, 2048)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 2048 for r in rows)
    assert sum(lengths) / (len(rows) * 2048) >= 0.9
    assert pack(lengths, 2048) == rows  # deterministic
    with pytest.raises(ValueError, match="does not fit"):
        pack([10, 65], 64)


def test_collate_packed_labels_positions_and_boundaries(tiny):
    _, _, docs, bins, collator = docs_and_pack(tiny)
    batch = collator(bins)
    length = 64
    assert batch["input_ids"].shape == (len(bins), length) and "attention_mask" not in batch
    segments = sum(len(b) for b in bins) + sum(sum(len(d.input_ids) for d in b) < length for b in bins)
    assert batch["cu_seq_lens_q"].shape == (segment_slots(segments, len(bins), length) + 1,)
    cu = batch["cu_seq_lens_q"].tolist()
    for r, o, d in spans(bins, length):
        n = len(d.input_ids)
        assert batch["input_ids"][r, o:o + n].tolist() == d.input_ids
        assert batch["position_ids"][r, o:o + n].tolist() == list(range(n))  # RoPE restarts per document
        assert batch["labels"][r, o] == IGNORE_INDEX  # never a target of the previous document's last token
        assert batch["labels"][r, o + 1:o + n].tolist() == d.labels[1:]
        assert r * length + o in cu and r * length + o + n in cu
    assert sum(label_count(d) for d in docs) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int(batch["real_tokens"].sum()) == sum(len(d.input_ids) for d in docs)
    assert fill_fraction(bins, length) == int(batch["real_tokens"].sum()) / (len(bins) * length)
    empty = collate_packed([], 2, length, 0)  # a process's stand-in: the same shapes, nothing to learn
    assert (empty["labels"] == IGNORE_INDEX).all() and empty["cu_seq_lens_q"].shape[0] == 16 + 1


def test_every_document_computes_in_a_pack_what_it_computes_alone(tiny):
    model, tok, docs, bins, collator = docs_and_pack(tiny)
    packed = logits_packed(model, collator(bins))
    worst = 0.0
    for r, o, d in spans(bins, 64):
        alone = logits_alone(model, d, tok.pad_token_id)
        worst = max(worst, float((packed[r, o:o + len(d.input_ids)] - alone).abs().max()))
    print(f"max |packed - alone| logit difference: {worst:.2e}")
    assert worst < LOGIT_TOL


def test_changing_one_document_leaves_the_others_unchanged(tiny):
    model, tok, _, bins, collator = docs_and_pack(tiny)
    before = logits_packed(model, collator(bins))
    victim = bins[0][0]
    vocab = model.config.vocab_size
    changed = type(victim)(input_ids=[(t + 7) % vocab for t in victim.input_ids], labels=victim.labels, row=victim.row)
    after = logits_packed(model, collator([[changed, *bins[0][1:]], *bins[1:]]))
    n = len(victim.input_ids)
    assert not torch.equal(before[0, :n], after[0, :n])  # the changed document did change
    assert torch.equal(before[0, n:], after[0, n:]) and torch.equal(before[1:], after[1:])  # nothing else did


def test_packed_loss_and_gradients_equal_the_sum_over_documents_alone(tiny):
    model, tok, docs, bins, collator = docs_and_pack(tiny)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = sum(label_count(d) for d in docs)

    model.zero_grad(set_to_none=True)
    packed_loss = forward_loss(model, collator(bins), "cpu", total)
    packed_loss.backward()
    packed = {n: p.grad.clone() for n, p in params.items()}

    model.zero_grad(set_to_none=True)
    alone_loss = 0.0
    with unpacked(model):
        for d in docs:  # each document alone, its token losses divided by the same total
            loss = forward_loss(model, Collator(tok.pad_token_id)([d]), "cpu", total)
            loss.backward()
            alone_loss += float(loss)
    assert float(packed_loss) == pytest.approx(alone_loss, rel=GRAD_TOL)
    errors = {n: float((packed[n] - p.grad).norm() / p.grad.norm().clamp_min(1e-12)) for n, p in params.items()}
    print(f"max relative LoRA gradient difference, packed vs alone: {max(errors.values()):.2e}")
    assert max(errors.values()) < GRAD_TOL, max(errors.items(), key=lambda kv: kv[1])


def test_nothing_switches_isolation_off(tiny):
    """transformers' usual ways to lose packing isolation: a padding mask (it replaces the block mask) and a KV
    cache (a mask built from it ignores position_ids) cannot reach the packed attention, and a batch without
    boundaries is refused rather than attended across."""
    from qlora_lab.train.step import model_inputs

    model, _, _, bins, collator = docs_and_pack(tiny)
    batch = collator(bins)
    kwargs = dict(position_ids=batch["position_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"],
                  cu_seq_lens_k=batch["cu_seq_lens_q"], max_length_q=64, max_length_k=64)
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], **kwargs).logits
        cached = model(input_ids=batch["input_ids"], use_cache=True, **kwargs).logits
        masked = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]),
                       **kwargs).logits
    assert torch.equal(ref, cached) and torch.equal(ref, masked)
    with pytest.raises(ValueError, match="document boundaries"):
        model(input_ids=batch["input_ids"])  # an unpacked batch on the packed attention
    with pytest.raises(ValueError, match="attention_mask"):
        model_inputs({**batch, "attention_mask": torch.ones_like(batch["input_ids"])}, "cpu")


PACKED_RUN = ["data.packing=true", "data.micro_batch_size=2", "lora.dropout=0", "eval=loss", "eval.every_steps=0"]


def test_packed_run_resumes_bit_exactly(compose, tmp_path):
    """The packed rows and their order are a function of the data and the seed: a run resumed from a checkpoint
    continues exactly as the run that was never stopped (what a SIGKILL after step 4 leaves to resume from)."""
    import shutil

    from qlora_lab.runner.run import run
    from qlora_lab.train import checkpoint

    args = PACKED_RUN + ["optim.max_steps=8", "save.every_steps=4", "logger=none"]
    full = tmp_path / "full"
    run(compose(args, out=full))
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    run(compose(args + [f"resume={checkpoint.valid_checkpoints(resumed)[0]}"], out=resumed))
    want, got = step_records(full), step_records(resumed)
    assert sorted(got) == list(range(1, 9))
    for s in range(1, 9):
        for key in ("train/loss", "train/grad_norm", "train/tokens", "train/fill_fraction"):
            assert got[s][key] == want[s][key], (s, key)
    assert want[1]["train/fill_fraction"] > 0.9  # 2 rows of 64 tokens, ~20-token rows packed best-fit


def test_ddp_with_packing_trains_exactly_what_one_process_trains(cache_dir, tmp_path):
    """Each process packs nothing of its own: it takes its contiguous share of each step's packed rows, exactly the
    micro-batches one process accumulating two of them collates; so every number is equal (as unpacked, see
    test_distributed.py)."""
    common = (*PACKED_RUN, "optim.max_steps=4", "save.every_steps=0", "quantization.quant_storage=bfloat16",
              "log.progress_bar=false")
    launch(["optim.grad_accum_steps=2"], cache_dir, tmp_path / "one", common=common)
    launch(["distributed=ddp"], cache_dir, tmp_path / "ddp", processes=2, common=common)
    one, ddp = step_records(tmp_path / "one"), step_records(tmp_path / "ddp")
    assert sorted(one) == sorted(ddp) == [1, 2, 3, 4]
    for s in one:
        for key in ("train/loss", "train/grad_norm", "train/tokens", "train/fill_fraction"):
            assert ddp[s][key] == one[s][key], (s, key)


@pytest.mark.gpu
def test_cuda_varlen_packing_isolates_documents_within_bf16_rounding(spec_of, monkeypatch):
    """On CUDA in bf16 the packed rows run through varlen_attn. Its error against each document alone must be of the
    size of bf16 kernel noise, measured in the same test: the block-mask path (exact in fp32, see above) against the
    same documents alone."""
    from qlora_lab.model import attention, build_model

    torch.manual_seed(0)
    built = build_model(spec_of(FP32[2:] + ["quantization=none"], device="cuda"))  # model.dtype auto: bf16
    model, tok = built.model, built.tokenizer
    rows = read_rows(spec_of().cfg.data)[:7]
    docs = build_examples(rows, tok, 64, True).examples
    randomize_lora_b(model)
    model.cuda()
    bins = [[docs[i] for i in row] for row in pack([len(d.input_ids) for d in docs], 64)]
    batch = {k: v.cuda() if torch.is_tensor(v) else v
             for k, v in Collator(tok.pad_token_id, rows=len(bins), length=64)(bins).items()}

    def worst(packed):
        out = 0.0
        for r, o, d in spans(bins, 64):
            with unpacked(model), torch.no_grad():
                b = collate([d], tok.pad_token_id)
                alone = model(input_ids=b["input_ids"].cuda(), attention_mask=b["attention_mask"].cuda()).logits[0]
            out = max(out, float((packed[r, o:o + len(d.input_ids)] - alone.float()).abs().max()))
        return out

    varlen = worst(logits_packed(model, batch))
    monkeypatch.setattr(attention, "varlen_attn", None)
    masked = worst(logits_packed(model, batch))
    print(f"bf16 max |packed - alone|: varlen {varlen:.3e}, block mask {masked:.3e}")
    assert varlen <= 2 * masked + 1e-2  # 2x the measured kernel noise, and the bf16 ulp of logits of size ~4


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["lora.kernel=fused", "checkpointing=offload"], ["model.compile=layers"]])
def test_cuda_packed_run_trains(compose, tmp_path, extra):
    from qlora_lab.runner.run import run

    cfg = compose(["data.packing=true", "optim.lr=3e-3", "optim.max_steps=30", "logger=none", "eval=loss",
                   "device=cuda", *extra])
    summary = run(cfg)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["summary/final_loss"] < summary["summary/first_loss"] - 1.0
    assert min(r["train/fill_fraction"] for r in recs if "train/fill_fraction" in r) > 0.8
