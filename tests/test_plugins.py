"""The two plug-in points: quantization backends (model/quantize/) and tracking sinks (sinks/). A second real one of
each trains end to end: torchao's NF4 beside bitsandbytes', MLflow beside W&B, read back through MLflow's client."""

from __future__ import annotations

import inspect
import json

import pytest

from helpers import CONF, records, step_records, train_py
from qlora_lab import sinks
from qlora_lab.model import quantize
from wandb_reader import read_run


def test_every_backend_is_one_module_with_its_yaml_and_the_whole_interface():
    """What makes a backend: a module of model/quantize defining BACKEND and SCHEMA, every method of the interface,
    and a YAML under conf/quantization that names it and starts from its schema."""
    assert set(quantize.BACKENDS) == {"bitsandbytes", "torchao", "none"}
    methods = {n for n, v in vars(quantize.Backend).items() if inspect.isfunction(v)}
    yamls = {p.stem: p.read_text() for p in (CONF / "quantization").glob("*.yaml")}
    for name, (backend, schema) in quantize.BACKENDS.items():
        assert methods <= set(dir(backend)), f"{name} lacks {methods - set(dir(backend))}"
        assert any(f"backend: {name}\n" in text and f"/quantization_schema/{name}@_here_" in text
                   for text in yamls.values()), f"no conf/quantization YAML names backend {name}"


def test_every_sink_is_one_module_with_its_yaml():
    assert set(sinks.SINKS) == {"wandb", "mlflow"}
    for name, module in sinks.SINKS.items():
        assert callable(module.open_sink) and callable(module.problems)
        assert f"/logger_schema/{name}@{name}" in (CONF / "logger" / f"{name}.yaml").read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """The same 12 steps on the same base weights, quantized by bitsandbytes' NF4 and by torchao's, the torchao one
    also with the fused LoRA kernel; 16 rows per step, fp32 compute (the CPU's), no dropout."""
    common = ["optim.max_steps=12", "eval=loss", "eval.every_steps=0", "lora.dropout=0", "save.every_steps=0",
              "logger=none"]
    out = {}
    for name, extra in {"bnb": ["quantization=nf4"], "torchao": ["quantization=torchao_nf4"],
                        "torchao_fused": ["quantization=torchao_nf4", "lora.kernel=fused"]}.items():
        d = tmp_path_factory.mktemp(name)
        res = train_py(common + extra, cache_dir, d)
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = d / "run"
    return out


def test_torchao_nf4_trains_end_to_end(runs):
    summary = json.loads((runs["torchao"] / "summary.json").read_text())
    assert summary["summary/status"] == "finished"
    info = json.loads((runs["torchao"] / "run_info.json").read_text())
    assert info["config"]["quantization"] == {"name": "torchao_nf4", "backend": "torchao", "block_size": 64,
                                              "scaler_block_size": 256, "skip_modules": []}
    losses = [r["train/loss"] for r in step_records(runs["torchao"]).values()]
    assert losses[-1] < losses[0] - 0.3, losses  # it learns (the tiny task's loss falls ~0.9 in 12 steps)
    assert (runs["torchao"] / "adapter" / "adapter_model.safetensors").is_file()


def test_the_two_nf4_backends_agree_on_the_same_weights(runs):
    """Both store the same NF4 code in blocks of 64; they differ in how the absmax constants are quantized (torchao:
    int8 per block in groups, with their mean removed; bitsandbytes: 8-bit dynamic code in groups of 256), so the
    dequantized weights differ by a little rounding. Measured on this tiny model over 12 steps: step-1 losses
    within 0.1%, the curves within 0.5% (bound 2%)."""
    a, b = step_records(runs["bnb"]), step_records(runs["torchao"])
    assert abs(a[1]["train/loss"] - b[1]["train/loss"]) / a[1]["train/loss"] < 5e-3
    assert max(abs(a[s]["train/loss"] - b[s]["train/loss"]) / a[s]["train/loss"] for s in a) < 2e-2


def test_the_fused_lora_kernel_runs_on_torchao_weights(runs):
    """The kernel asks the backend how to dequantize (Backend.dequantizer): on torchao's NF4Tensor it computes what
    PEFT's modules compute, to fp32 rounding (measured max relative difference ~1e-6 over 12 steps)."""
    a, b = step_records(runs["torchao"]), step_records(runs["torchao_fused"])
    assert max(abs(a[s]["train/loss"] - b[s]["train/loss"]) / a[s]["train/loss"] for s in a) < 1e-4


def _mlflow(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_wandb_and_mlflow_record_the_same_run(cache_dir, tmp_path):
    res = train_py(["logger=[wandb,mlflow]", "optim.max_steps=4", "eval=loss", "eval.every_steps=2",
                    "log.adapter_artifact=true", "lora.r=4", "study=demo"], cache_dir, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "run"
    info = json.loads((run_dir / "run_info.json").read_text())
    client = _mlflow(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(info["sink_ids"]["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == info["config"]["run_name"]
    assert run.data.params["lora.r"] == "4" and run.data.params["quantization.backend"] == "bitsandbytes"
    jsonl = step_records(run_dir)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx({s: r["train/loss"] for s, r in jsonl.items()})
    evals = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/loss")}
    assert sorted(evals) == [2, 4]  # eval=loss: no evaluation before the first step (eval.at_start: false)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["summary/final_loss"] == pytest.approx(summary["summary/final_loss"])
    assert run.data.tags["summary/status"] == "finished" and {"lora.r=4", "study=demo"} <= {
        k.removeprefix("tag.") for k in run.data.tags}
    assert run.data.params["study"] == "demo" and info["config"]["study"] == "demo"  # a study's runs: filter by it
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts and "adapter/adapter_config.json" in artifacts
    assert (run_dir / "mlartifacts").is_dir()  # the store and its artifacts stay in the run dir
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "tables")}
    assert "tables/ledger_items_step0.json" in tables
    # W&B has the same run, with the same run id kept in run_info.json
    w = read_run(run_dir)
    assert w["run"].run_id == info["sink_ids"]["wandb"] and "study=demo" in w["run"].tags
    w_losses = {h["_step"]: h["train/loss"] for h in w["history"] if "train/loss" in h}
    assert w_losses == pytest.approx({s: r["train/loss"] for s, r in jsonl.items()})


def test_a_sweep_is_one_mlflow_experiment_with_a_parent_run(cache_dir, tmp_path):
    res = train_py(["-m", "lora.r=4,8", "logger=mlflow", "optim.max_steps=2", "eval.every_steps=0", "eval=loss"],
                   cache_dir, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    client = _mlflow(f"sqlite:///{tmp_path / 'sweep' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("qlora-lab")
    found = client.search_runs([exp.experiment_id])
    parents = [r for r in found if r.data.tags.get("qlora_lab.sweep_parent") == "true"]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "sweep" and parents[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["0_r=4", "1_r=8"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted(r.data.params["lora.r"] for r in children) == ["4", "8"]


def test_a_resume_continues_the_same_mlflow_run(cache_dir, tmp_path):
    args = ["logger=mlflow", "eval=loss", "eval.every_steps=0", "save.every_steps=2"]
    first = train_py(args + ["optim.max_steps=4"], cache_dir, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "run"
    run_id = json.loads((run_dir / "run_info.json").read_text())["sink_ids"]["mlflow"]
    more = train_py(args + ["optim.max_steps=6", "resume=auto"], cache_dir, tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert json.loads((ckpt / "trainer_state.json").read_text())["trainer"]["sink_ids"] == {"mlflow": run_id}
    client = _mlflow(f"sqlite:///{run_dir / 'mlflow.db'}")
    assert [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("qlora-lab").experiment_id])] \
        == [run_id]  # one run, continued
    steps = sorted({m.step for m in client.get_metric_history(run_id, "train/loss")})
    assert steps == [1, 2, 3, 4, 5, 6] and client.get_run(run_id).info.status == "FINISHED"
    assert records(run_dir)[-1]["step"] == 6
