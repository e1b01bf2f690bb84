"""Trust, in real processes (docs/bad_inputs.md): no credential in any file a run or a sweep writes, two processes
into one run dir and into one cache entry, and kills at the worst moments followed by a resume."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FAULTS, ROOT, child_env, records, step_records
from qlora_lab.core.scrub import REDACTED
from qlora_lab.runner import rundir
from qlora_lab.train import checkpoint

HF = "hf_" + "EnvFake0Token1Only2For3Tests4Abcd"
WANDB = "0123456789abcdef0123456789abcdef01234567"  # a W&B key's shape: 40 hex digits
MLFLOW = "mlflow-fake-password-1234"
TAG = "hf_" + "TagFake0Token1Only2For3Tests4Abcd"
SECRETS = (HF, WANDB, MLFLOW, TAG)
QUICK = ["optim.max_steps=2", "quantization=none", "eval=loss", "eval.at_start=false", "data.max_eval_rows=16",
         "log.progress_bar=false", "device=cpu"]
# tokens in the environment, a token-shaped tag, an escaped interpolation of the token, checkpoints, both sinks
LEAKY = [f"tags=[{TAG}]", "data.system_prompt=\\${oc.env:HF_TOKEN}", "logger=[wandb,mlflow]", "save.every_steps=1"]


def _env() -> dict[str, str]:
    return {**child_env(), "HF_TOKEN": HF, "WANDB_API_KEY": WANDB, "MLFLOW_TRACKING_PASSWORD": MLFLOW}


def _train(args: list[str], cache_dir, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"cache_dir={cache_dir}"], cwd=ROOT,
                          env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _leaks(root: Path) -> list[str]:
    """Every file under `root` (W&B's binary run file and MLflow's SQLite store included) and every name that holds
    one of the secrets."""
    found = []
    for p in root.rglob("*"):
        if any(s in str(p.relative_to(root)) for s in SECRETS):
            found.append(f"name {p}")
        if p.is_file():
            data = p.read_bytes()
            found += [f"{p}: {s[:8]}..." for s in SECRETS if s.encode() in data]
    return found


@pytest.mark.parametrize("mode", ["single", "fused_sweep"])
def test_no_credential_reaches_any_file(tmp_path, cache_dir, mode):
    """A single run, and a sweep through the launcher plug-in (its jobs resolved once, handed to their process in a
    file without credentials, trained as one fused group). A sweep whose jobs run one process each (sweep.fuse=false)
    hands them over the same way (sweep.write_handoff, tested in test_trust.py) and is left out for time."""
    out = tmp_path / "out"
    if mode == "single":
        args = [*QUICK, *LEAKY, f"hydra.run.dir={out}"]
    else:
        args = ["-m", "lora.r=4,8", *QUICK, *LEAKY, f"hydra.sweep.dir={out}"]
    res = _train(args, cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not [s for s in SECRETS if s in res.stdout + res.stderr], "the console quoted a secret"
    runs = [out] if mode == "single" else sorted(p for p in out.iterdir() if (p / "run_info.json").is_file())
    assert len(runs) == (1 if mode == "single" else 2)
    if mode == "fused_sweep":
        assert len(list(out.glob("group_*.json"))) == 1  # the hand-off file exists, and holds no secret (below)
    assert _leaks(out) == []
    assert _leaks(Path(cache_dir)) == []
    for r in runs:  # the run was recorded, scrubbed, not emptied; the escaped interpolation stayed text
        info = json.loads((r / "run_info.json").read_text())
        assert info["config"]["tags"] == [REDACTED] and f"tags=[{REDACTED}]" in info["overrides"]
        assert info["config"]["data"]["system_prompt"] == "${oc.env:HF_TOKEN}"
        assert step_records(r)[2]["train/loss"] > 0 and list((r / "wandb").glob("offline-run-*/*.wandb"))
        assert checkpoint.all_checkpoints(r)
    db = out / "mlflow.db"
    tags = sqlite3.connect(db).execute("select value from tags where key like 'tag.%' or key = 'qlora_lab.run_dir'"
                                       ).fetchall() if db.is_file() else []
    assert db.is_file() and tags


def test_two_runs_into_one_run_dir_at_once(tmp_path, cache_dir):
    """Started together into one hydra.run.dir: the first to open it trains, the other is refused naming it, and
    the run dir holds one run (each step once, one adapter)."""
    run_dir = tmp_path / "run"
    args = [*QUICK, "logger=none", f"hydra.run.dir={run_dir}"]
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"cache_dir={cache_dir}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [e[-2000:] for _, _, e in results]
    refused = next(e for p, _, e in results if p.returncode == 2)
    winner = next(p for p, _, _ in results if p.returncode == 0)
    assert f"{run_dir} is in use: another run writes there (pid {winner.pid} on " in refused
    assert "Traceback" not in refused
    assert sorted(step_records(run_dir)) == [1, 2]  # (step_records fails on a step logged twice)
    ledger = records(run_dir, "ledger_items.jsonl")
    assert len(ledger) == len({r["component"] for r in ledger})  # written once
    assert json.loads((run_dir / "summary.json").read_text())["summary/status"] == "finished"
    assert not (run_dir / rundir.LOCK).exists()


BUILD = """
import json, sys, time
from pathlib import Path
from qlora_lab.core.paths import TINY_DATA
from qlora_lab.data import rows as rows_mod, store, tokenize
from qlora_lab.model import random_init
from transformers import AutoTokenizer

cache, go = Path(sys.argv[1]), Path(sys.argv[2])
built = []
real = random_init._build
random_init._build = lambda *a, **k: (built.append(1), real(*a, **k))
while not go.exists():  # both start at once
    time.sleep(0.01)
entry = random_init.ensure_built({"model_type": "llama", "vocab_size": 272, "hidden_size": 32,
                                  "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
                                 cache, "shared")
rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()[:400]]
out = store.load_or_build(rows, rows_mod.fingerprint(rows), AutoTokenizer.from_pretrained(entry),
                          store.Settings(64, True, None, 0), str(cache), 1)
print(json.dumps({"built": len(built), "store_hit": out.hit, "entry": str(entry), "rows": out.dataset.num_rows}))
"""


def test_two_processes_build_one_cache_entry(tmp_path):
    """A random-init build and a tokenized store wanted by two processes at once: built once, whole, by one; the
    other waits on the entry's lock and reads it; nothing is left beside them."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(cache), str(go)], cwd=ROOT, env=child_env(threads=1),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(o["built"] for o in outs) == [0, 1]
    assert sorted(o["store_hit"] for o in outs) == [False, True]
    assert outs[0]["entry"] == outs[1]["entry"] and all(o["rows"] == 400 for o in outs)
    entry = Path(outs[0]["entry"])
    assert (entry / "config.json").is_file() and (entry / "model.safetensors").is_file()
    leftovers = [p.name for p in [*cache.iterdir(), *(cache / "tokenized").iterdir()] if p.name.startswith(".")]
    assert leftovers == []


KILLS = str(FAULTS / "kill")


def test_kills_while_tokenizing_checkpointing_and_evaluating_then_resume(tmp_path):
    """SIGKILL while the tokenized store is written, while a checkpoint is written, and while an evaluation runs;
    each time the same command with resume=auto continues, and nothing is left half-written."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    args = ["optim.max_steps=4", "quantization=none", "save.every_steps=1", "eval=loss", "eval.at_start=false",
            "eval.every_steps=2", "data.max_eval_rows=16", "logger=none", "log.progress_bar=false", "device=cpu",
            "resume=auto", f"hydra.run.dir={run_dir}"]
    env = {**child_env(), "PYTHONPATH": os.pathsep.join(p for p in (KILLS, os.environ.get("PYTHONPATH")) if p)}
    # killed tokenizing; killed in the first evaluation (step 2; checkpoint 1 is whole); resumed from step 1 and
    # killed writing checkpoint 3; resumed from step 2 and finished
    for at in ("store", "eval:1", "checkpoint:3"):
        res = _train(args, cache, env={**env, "QLAB_KILL_AT": at})
        assert res.returncode == -9, f"{at}: exit {res.returncode}\n{res.stderr[-2000:]}"
    left = [p for p in [*run_dir.rglob(".*"), *cache.rglob(".*")] if p.name != ".hydra" and ".hydra" not in p.parts]
    assert left, "the kills left nothing to clean: the test would prove nothing"
    res = _train(args, cache, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "took over the lock" in res.stderr  # the killed run's lock, its process gone
    assert sorted(step_records(run_dir)) == [1, 2, 3, 4]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["summary/status"] == "finished" and summary["summary/steps"] == 4
    resumes = json.loads((run_dir / "run_info.json").read_text())["resumes"]
    assert [r["step"] for r in resumes] == [1, 2]
    left = [str(p) for p in [*run_dir.rglob(".*"), *cache.rglob(".*")]
            if p.name != ".hydra" and ".hydra" not in p.parts]
    assert left == [], "left behind"
