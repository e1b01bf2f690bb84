"""The default run end to end on CPU: the loss falls, every sink holds the metrics, the adapter reloads."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from wandb_reader import read_run, read_table

STEPS = 80
# train/loss of the first steps of the default run (seed 0, tiny model, nf4) on CPU, in the locked environment: a
# change in numerics (quantization, masking, loss scaling, init, data order) moves these.
PINNED_LOSSES = [6.325271129608154, 6.2677903175354, 5.940950870513916, 5.892549991607666, 5.726611614227295]
# Re-pinned when LoRA dropout became counter-based (model/dropout.py): its masks are other draws than PEFT's, which
# moved steps 3-5 by up to 3.9e-3; with lora.dropout=0 the old and new code give the same curve bit for bit.
# Measured noise: bit-identical across runs and across 1, 2 and 4 threads in the locked environment; the earlier
# pin, on the releases before the lock, differed from the locked ones by up to 2.0e-3 (same math, other CPU
# kernels). A numerics regression (a masking or loss-scaling bug) moves the first steps by far more than that.
PINNED_TOLERANCE = 2.5e-3
PER_STEP_KEYS = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s",
                 "memory/peak_allocated_gib", "memory/peak_reserved_gib"}
# Exact match of this 80-step run rose from 0.0 to 0.5859 on the 128 held-out rows (0.38 at step 40), bit-identical
# from run to run on the CPU; the margin only has to tell a learning run from one that stopped learning.
EXACT_MATCH_RISE = 0.3
PHASES = ("load", "prepare", "wrap", "first_forward", "first_backward", "first_optimizer_step")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, cache_dir):
    from hydra import compose, initialize_config_dir

    from helpers import CONF
    from qlora_lab.runner.run import run

    out = tmp_path_factory.mktemp("run")
    overrides = [f"optim.max_steps={STEPS}", "eval.every_steps=40", "log.adapter_artifact=true"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides + [
            f"output_dir={out}", f"cache_dir={cache_dir}", "run_name=e2e", "sweep_id=null",
            "log.progress_bar=false"])
    summary = run(cfg, overrides=overrides)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return cfg, out, summary, records


def train_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "train/loss" in r]


def test_loss_falls_and_matches_the_pinned_curve(default_run):
    _, _, summary, records = default_run
    losses = [r["train/loss"] for r in train_records(records)]
    assert len(losses) == STEPS
    assert losses[:5] == pytest.approx(PINNED_LOSSES, abs=PINNED_TOLERANCE)
    assert summary["summary/final_loss"] < summary["summary/first_loss"] - 2.0
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 2.0
    assert summary["summary/eval_loss"] < 4.5


def test_metrics_jsonl_has_every_key_per_step_and_phases_once(default_run):
    _, _, _, everything = default_run
    records = train_records(everything)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert PER_STEP_KEYS <= r.keys()
        assert all(math.isfinite(r[k]) for k in PER_STEP_KEYS)
    phase_keys = {f"phase/{p}/peak_allocated_gib" for p in PHASES}
    assert phase_keys <= records[0].keys()
    assert not any(k.startswith("phase/") for r in records[1:] for k in r)
    assert {r["step"] for r in everything if "eval/loss" in r} == {0, 40, 80}  # 0: before training
    assert records[0]["memory/peak_allocated_gib"] > 0.05  # a real reading, not a placeholder


def test_the_task_metric_rises_and_is_recorded_everywhere(default_run):
    """What the run taught the model: exact match of greedy generations on held-out rows, before and after."""
    _, out, summary, records = default_run
    evals = {r["step"]: r for r in records if "eval/exact_match" in r}
    assert evals[0]["eval/exact_match"] <= 0.05  # the random-init model answers nothing right
    assert evals[STEPS]["eval/exact_match"] >= evals[0]["eval/exact_match"] + EXACT_MATCH_RISE
    assert summary["summary/eval_exact_match"] == evals[STEPS]["eval/exact_match"]
    for key in ("eval/loss", "eval/exact_match", "eval/token_f1", "eval/char_f1"):  # eval's and the task's
        assert key in evals[STEPS]
    samples = [json.loads(x) for x in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 40, STEPS} and len(samples) == 3 * 8
    assert {"prompt", "reference", "prediction", "exact_match"} <= samples[-1].keys()
    w = read_run(out)
    assert {h["_step"] for h in w["history"] if "eval/exact_match" in h} == {0, 40, STEPS}
    assert sum(h.get("eval/samples/_type") == "table-file" for h in w["history"]) == 3  # a W&B table per eval
    table = read_table(w, "eval/samples")  # the last one: step 80's samples, as eval_samples.jsonl has them
    assert table["columns"][:3] == ["step", "row", "prompt"] and len(table["data"]) == 8
    assert table["data"] == [list(s.values()) for s in samples if s["step"] == STEPS]
    assert w["summary"]["summary/eval_exact_match"] == pytest.approx(summary["summary/eval_exact_match"])


def test_wandb_offline_run_holds_the_same_metrics(default_run):
    cfg, out, summary, records = default_run
    w = read_run(out)
    assert w["run"].display_name == "e2e"
    assert set(w["run"].tags) == {f"optim.max_steps={STEPS}", "eval.every_steps=40", "log.adapter_artifact=true"}
    assert w["config"]["lora.r"] == 16 and w["config"]["quantization.name"] == "nf4"
    history = [h for h in w["history"] if "train/loss" in h]
    assert [h["train/loss"] for h in history] == pytest.approx([r["train/loss"] for r in train_records(records)])
    assert PER_STEP_KEYS <= history[0].keys()
    assert "phase/first_backward/peak_allocated_gib" in history[0]
    assert w["summary"]["summary/final_loss"] == pytest.approx(summary["summary/final_loss"])
    assert w["summary"]["summary/trainable_params"] == summary["summary/trainable_params"] > 0


def test_wandb_summaries_hold_the_best_eval_and_its_step(default_run):
    """define_metric: the runs table shows each eval metric at its best (min loss, max score) and memory at its
    max; summary/best_eval_<m>_step says when, in summary.json and W&B alike."""
    _, out, summary, records = default_run
    w = read_run(out)
    evals = {r["step"]: r for r in records if "eval/loss" in r}
    best_loss_step = min(evals, key=lambda s: evals[s]["eval/loss"])
    assert w["summary"]["eval/loss"] == {"min": pytest.approx(evals[best_loss_step]["eval/loss"])}
    assert summary["summary/best_eval_loss_step"] == w["summary"]["summary/best_eval_loss_step"] == best_loss_step
    assert w["summary"]["eval/exact_match"] == {"max": pytest.approx(max(e["eval/exact_match"] for e in evals.values()))}
    assert summary["summary/best_eval_exact_match"] == pytest.approx(w["summary"]["eval/exact_match"]["max"])
    peak = max(r["memory/peak_allocated_gib"] for r in records if "memory/peak_allocated_gib" in r)
    assert w["summary"]["memory/peak_allocated_gib"] == {"max": pytest.approx(peak)}


def test_the_ledger_is_a_table_in_wandb_and_beside_the_metrics(default_run):
    """The predicted memory ledger, one row per component, logged at the start (any device; the predicted vs
    measured table per phase follows at the end of a CUDA run)."""
    from qlora_lab.memory import plan
    from qlora_lab.runner.resolve import resolve_spec

    cfg, out, _, _ = default_run
    spec = resolve_spec(OmegaConf.to_object(cfg), "cpu")[0]  # what the run predicted from (dtype auto: fp32)
    ledger = plan.predict(spec.cfg, int(spec.cfg.data.micro_batch_size))
    table = read_table(read_run(out), "ledger/items")
    assert table["columns"] == ["step", "component", "kind", "gib", "formula_inputs", "in_peak"]
    assert [row[1] for row in table["data"]] == [i.name for i in ledger.items]
    assert [row[3] for row in table["data"]] == pytest.approx([i.bytes / 2**30 for i in ledger.items])
    local = [json.loads(line) for line in (out / "ledger_items.jsonl").read_text().splitlines()]
    assert [r["component"] for r in local] == [i.name for i in ledger.items] and {r["step"] for r in local} == {0}


def test_the_adapter_is_an_artifact_of_the_offline_run(default_run):
    _, out, _, _ = default_run
    w = read_run(out)
    (art,) = [a for a in w["artifacts"] if a.type == "model"]
    assert art.name == f"adapter-{w['run'].run_id}"
    files = {c.path: c.local_path for c in art.manifest.contents}
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    # referenced in the run dir, not copied into W&B's staging dir elsewhere: `wandb sync` needs only the run dir
    assert all(p.startswith(str((out / "adapter").resolve())) for p in files.values())
    assert json.loads(art.metadata)["lora.r"] == 16


def test_the_summary_says_which_peak_and_where_the_time_went(default_run):
    _, out, summary, records = default_run
    saved = json.loads((out / "summary.json").read_text())
    assert "resident set" in saved["summary/peak_memory_scope"]  # on the CPU: no allocator peak
    steps = [r["train/step_time_s"] for r in records if "train/step_time_s" in r]  # not step 0's eval record
    assert saved["summary/first_step_s"] == pytest.approx(steps[0])
    assert saved["summary/train_time_s"] == pytest.approx(STEPS * saved["summary/step_time_s"])
    assert 0 < saved["summary/startup_s"] < saved["summary/wall_time_s"]
    assert saved["summary/overhead_s"] == pytest.approx(saved["summary/wall_time_s"] - saved["summary/train_time_s"])
    # The spans tile the process's life up to the summary: their sum is the wall time (the adapter save ends both;
    # the slack is the few statements between the last mark and the wall-time reading).
    spans = {k: v for k, v in saved.items() if k.startswith("time/") and k != "time/eval_s"}
    assert list(spans) == [f"time/{s}_s" for s in ("launch", "validate", "read_data", "model_source", "tokenize",
                                                   "build_model", "open_records", "train", "save_adapter")]
    assert sum(spans.values()) == pytest.approx(saved["summary/wall_time_s"], abs=0.05)
    assert 0 < saved["time/eval_s"] < saved["time/train_s"]  # evaluations ran within the training span


def test_timeline_spans_tile_the_process_and_parts_nest(monkeypatch):
    from qlora_lab.core import timing

    clock = iter([10.0, 13.0, 13.5])
    monkeypatch.setattr(timing, "now", lambda: next(clock))
    t = timing.Timeline(start=8.0)
    assert t.mark("launch") == 2.0
    t.mark("train")
    t.part("eval", "train", 1.5)
    t.mark("train")  # a span closed twice adds up
    assert t.metrics() == {"time/launch_s": 2.0, "time/train_s": 3.5, "time/eval_s": 1.5}
    assert t.line() == "launch 2.0 s, train 3.5 s (eval 1.5 s)"


def test_the_peak_is_the_runs_own_not_the_random_init_build(compose, monkeypatch):
    """A job that first builds its random-init model (the first job of a sweep on a benchmark shape) must not
    report the build as its peak. The CPU has no allocator peak to reset, so a stand-in allocator keeps count:
    the 50 GiB the model source allocates and frees must not reach the summary, the 0.5 GiB after it must."""
    from qlora_lab.memory import readings
    from qlora_lab.runner import run as run_mod
    from qlora_lab.train import loop

    class Allocator:
        now = peak = 0.5

        def reset(self, device):
            self.peak = self.now

        def reading(self, device):
            return {"allocated_gib": self.now, "reserved_gib": self.now, "peak_allocated_gib": self.peak,
                    "peak_reserved_gib": self.peak}

    alloc, source = Allocator(), run_mod.model_source

    def building_source(spec, dist):
        alloc.peak = 50.0  # the build's weights came and went
        return source(spec, dist)

    monkeypatch.setattr(run_mod, "model_source", building_source)
    for module in (run_mod, loop):
        monkeypatch.setattr(module, "reset_peak", alloc.reset)
    for module in (loop, readings):
        monkeypatch.setattr(module, "memory_now", alloc.reading)
    summary = run_mod.run(compose(["optim.max_steps=2", "logger=none", "eval=loss", "eval.every_steps=0"]))
    assert summary["summary/peak_memory_gib"] == 0.5


def test_run_info_recreates_the_run(default_run):
    _, out, _, _ = default_run
    info = json.loads((out / "run_info.json").read_text())
    assert info["overrides"] == [f"optim.max_steps={STEPS}", "eval.every_steps=40", "log.adapter_artifact=true"]
    assert info["config"]["lora"]["r"] == 16
    assert info["packages"]["torch"] and info["packages"]["bitsandbytes"]
    assert len(info["dataset_fingerprint"]) == 16 and info["device"]["device"] == "cpu"
    assert "git_commit" in info


def test_saved_adapter_reloads_with_peft_and_reproduces_eval_loss(default_run):
    from peft import PeftModel

    from qlora_lab.data import rows, tokenize
    from qlora_lab.model import load, quantize, source
    from qlora_lab.runner.resolve import resolve_spec
    from qlora_lab.train.evaluate import evaluate_loss

    cfg, out, summary, _ = default_run
    tcfg = resolve_spec(OmegaConf.to_object(cfg), "cpu")[0].cfg  # what the run resolved (dtype auto: fp32)
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    path = source.resolve_model_path(tcfg.model, tcfg.cache_dir, tcfg.seed)
    tok = source.load_tokenizer(str(adapter), tcfg.model)
    backend = quantize.backend_of(tcfg.quantization)
    base = load.load_model(path, tcfg.model, backend.load_kwargs(tcfg.quantization, source.model_config(tcfg.model)),
                           "cpu")
    backend.after_load(base)  # as the pipeline does: keeps bitsandbytes' CPU eval kernel out of the comparison
    model = PeftModel.from_pretrained(base, adapter)
    examples = tokenize.build_examples(rows.read_rows(tcfg.data), tok, tcfg.model.max_seq_len,
                                       tcfg.data.mask_prompt).examples
    _, eval_set = rows.split_eval(examples, tcfg.data, tcfg.seed)
    mb = tcfg.data.micro_batch_size
    loss = evaluate_loss(model, eval_set, mb, tok.pad_token_id, "cpu")
    assert loss == pytest.approx(summary["summary/eval_loss"], abs=1e-4)
    with torch.no_grad():  # and the adapter matters: without it the loss is far higher
        with model.disable_adapter():
            assert evaluate_loss(model, eval_set, mb, tok.pad_token_id, "cpu") > loss + 1.0
