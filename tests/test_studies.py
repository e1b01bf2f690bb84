"""Studies (experiments/<name>/) reproduce at scale ci, as CI runs them; a stale key, a moved number or a broken
plot fails with what moved and why. `qlora-lab rerun` re-executes a recorded run and reproduces its loss curve."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, child_env, step_records, train_py
from qlora_lab import cli
from qlora_lab.study import check, plots, spec, table
from qlora_lab.study.execute import Job

EXPERIMENTS = ROOT / "experiments"
STUDIES = sorted(p.parent.name for p in EXPERIMENTS.glob("*/study.yaml"))


def qlora_lab(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """`qlora-lab ARGS` as CI types it."""
    cmd = [sys.executable, "-m", "qlora_lab.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)


def reproduce(args: list[str], cache_dir: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return qlora_lab(["reproduce", *args, "--cache-dir", str(cache_dir)], timeout)


def test_the_shipped_studies_are_there():
    assert STUDIES == ["checkpointing_tradeoff", "fp16_stability", "lora_rank", "quantization_parity",
                       "seed_memory_table"]


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_composes_at_every_scale_and_commits_its_results(name):
    """Each study composes against conf/ at both scales, and has committed results at both (full: what its README
    shows, the table there being the committed one)."""
    study = spec.load(EXPERIMENTS / name)
    assert spec.check_composes(study) == []
    for c in study.columns:  # a noise tolerance says what was measured (a few words at least, not a placeholder)
        if c.tolerance.split()[0] in ("abs", "rel", "ratio"):
            assert c.why and len(c.why.split()) >= 6, f"experiments/{name}: column {c.name} ({c.tolerance}) says no why"
    assert not re.search(r"\b(TOL|FULL|DATE|TODO)(_[A-Z]+)?\b", (EXPERIMENTS / name / "README.md").read_text()), \
        f"experiments/{name}/README.md holds a placeholder"
    readme = (EXPERIMENTS / name / "README.md").read_text()
    for scale in study.scales:
        committed = EXPERIMENTS / name / "results" / scale
        assert table.read(study, study.columns_at(scale), committed / "table.csv"), f"{committed}: no rows"
        text = (committed / "runs.json").read_text()
        assert str(ROOT) not in text, f"{committed}/runs.json names this checkout's path (reproduce.portable)"
        record = json.loads(text)
        assert record["device"] and record["date"] and record["provenance"]["uv_lock"], f"{committed}/runs.json"
        for plot in study.plots_at(scale):
            assert (committed / plot.file).is_file() or plot.file in record.get("pending_plots", []), plot.file
    assert f"qlora-lab reproduce experiments/{name}" in readme
    assert (EXPERIMENTS / name / "results" / "full" / "table.md").read_text() in readme, \
        f"experiments/{name}/README.md does not show the committed full table (reproduce --update writes it there)"


@pytest.mark.parametrize("name", STUDIES)
def test_study_reproduces_at_scale_ci(name, cache_dir, tmp_path):
    res = reproduce([f"experiments/{name}", "--scale", "ci", "--out", str(tmp_path / "out")], cache_dir)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    assert f"{name} (ci): reproduced" in res.stdout + res.stderr
    for plot in spec.load(EXPERIMENTS / name).plots_at("ci"):
        assert (tmp_path / "out" / plot.file).stat().st_size > 0
    configs = [json.loads(p.read_text())["config"] for p in (tmp_path / "out").rglob("run_info.json")] + \
        [json.loads(p.read_text())["config"] for p in (tmp_path / "out").rglob("plan.json")]
    assert configs and all(c["study"] == name for c in configs)  # every sink tags it study=<name> (test_plugins.py)


def test_a_gpu_study_at_full_on_the_cpu_compares_its_predictions(cache_dir, tmp_path):
    """At scale full on a CPU machine the GPU runs are skipped, said so, and only the numbers that do not depend on
    the device (the ledger's) are compared."""
    res = reproduce(["experiments/seed_memory_table", "--scale", "full", "--out", str(tmp_path / "out")], cache_dir)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "measures the cuda device of scale full; skipped on this cpu machine" in out
    assert "only the columns that do not depend on the device (exact) are compared" in out
    assert "seed_memory_table (full): reproduced" in out


def _study(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of a shipped study (committed results included) with `changes` to its study.yaml."""
    folder = tmp_path / name
    shutil.copytree(EXPERIMENTS / name, folder)
    data = yaml.safe_load((folder / "study.yaml").read_text())
    data.update(changes)
    (folder / "study.yaml").write_text(yaml.safe_dump(data))
    return folder


def test_a_removed_key_fails_naming_it(tmp_path, capsys):
    """The example sweep that went stale: its committed table named `logger.eval_every`, which no longer exists."""
    folder = _study(tmp_path, "seed_memory_table", runs=[{"args": ["mode=plan", "lora.r=4,32",
                                                                     "logger.eval_every=50"]}])
    assert cli.main(["reproduce", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "`logger.eval_every` is not a key (or option) of conf/ any more" in err and "scale ci, run 1" in err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_a_moved_number_fails_with_the_key_that_moved_it(tmp_path, capsys):
    """A default that changes what a study computes (here LoRA's rank) moves its numbers: the build fails, and the
    report names the key, what it affects, and each number outside its tolerance."""
    study = yaml.safe_load((EXPERIMENTS / "seed_memory_table" / "study.yaml").read_text())
    runs = [{**r, "args": [*r["args"], "lora.r=8"]} for r in study["runs"]]
    folder = _study(tmp_path, "seed_memory_table", runs=runs)
    assert cli.main(["reproduce", str(folder), "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr()
    assert "lora.r: 16 -> 8 (adapter; changes what the run computes)" in out.out
    assert "none / LoRA" in out.err and "predicted_gib OUTSIDE" in out.err
    assert re.search(r"none / base +predicted_gib +2\.693 +2\.693 +exact +equal +ok", out.out)  # what r leaves alone


def test_a_plot_with_nothing_to_draw_is_an_error(tmp_path):
    study = spec.load(EXPERIMENTS / "quantization_parity")
    job = Job("0", tmp_path, 0, {"quantization": {"name": "nf4"}}, {"summary/eval_exact_match": None}, {})
    rows = table.build(study, [job], study.columns_at("ci"))
    for p in study.plots_at("ci"):
        with pytest.raises(spec.StudyError, match="plot"):
            plots.draw(study, p, rows, [job], tmp_path)


def test_a_committed_record_holds_no_machine_path(tmp_path):
    """runs.json is committed: a dataset inside the checkout is named relative to it, a run dir relative to the
    study's output dir; a path elsewhere is kept as given."""
    from qlora_lab.study.reproduce import portable

    out = tmp_path / "out"
    config = {"data": {"path": str(ROOT / "src/qlora_lab/assets/tiny_tasks.jsonl")},
              "output_dir": str(out / "run1" / "0_plan"), "cache_dir": "/data/cache", "tags": [str(ROOT)]}
    assert portable(config, out) == {"data": {"path": "src/qlora_lab/assets/tiny_tasks.jsonl"},
                                     "output_dir": "<out>/run1/0_plan", "cache_dir": "/data/cache", "tags": ["."]}


def test_tolerances():
    assert check.within("exact", 0.1 + 0.2, 0.1 + 0.2)[0] and not check.within("exact", 0.3, 0.1 + 0.2)[0]
    assert check.within("device-exact", 2.612, 2.612)[0] and not check.within("device-exact", 2.612, 2.6120001)[0]
    assert check.within("abs 0.05", 0.80, 0.84)[0] and not check.within("abs 0.05", 0.80, 0.86)[0]
    assert check.within("rel 1e-3", 2.0, 2.0019)[0] and not check.within("rel 1e-3", 2.0, 2.003)[0]
    assert check.within("ratio 0.5 2", 100, 190)[0] and not check.within("ratio 0.5 2", 100, 45)[0]
    assert check.within("exact", "keep:4", "keep:4")[0] and not check.within("exact", "keep:4", "keep:3")[0]
    assert check.within("abs 0", "finished", "finished")[0] and not check.within("abs 0", "finished", "failed")[0]


def test_on_another_device_kind_only_exact_numbers_are_compared():
    columns = [spec.Column("predicted", "summary/p", "exact"), spec.Column("speed", "summary/s", "ratio 0.8 1.25"),
               spec.Column("peak", "summary/m", "rel 0.05"), spec.Column("run_ledger", "summary/r", "device-exact")]
    committed = {"nf4": {"predicted": 2.5, "speed": 17000.0, "peak": 4.47, "run_ledger": 2.61}}
    rows = [table.Row(["nf4"], {"predicted": 2.5, "speed": 35.0, "peak": None, "run_ledger": 3.1}, [])]
    verdicts = check.compare(columns, committed, rows, same_device=False, skipped_runs=True)
    assert [(v.column.name, v.status) for v in verdicts] == [("predicted", "ok"), ("speed", "-"), ("peak", "-"),
                                                             ("run_ledger", "-")]
    same = check.compare(columns, committed, rows, same_device=True, skipped_runs=False)
    assert [v.status for v in same] == ["ok", "OUTSIDE", "MISSING", "OUTSIDE"]


def test_a_vs_column_divides_by_a_named_row_or_the_row_differing_in_one_key():
    study = spec.Study("s", "q", [], {}, ["model.dtype", "model.upcast"], [
        spec.Column("loss", "summary/loss"), spec.Column("vs_fp32", "vs:loss@float32 / none"),
        spec.Column("vs_none", "vs:loss@model.upcast=none")])
    jobs = [Job(str(i), Path("."), 0, {"model": {"dtype": d, "upcast": u}}, {"summary/loss": loss}, {})
            for i, (d, u, loss) in enumerate([("float16", "none", 3.0), ("float16", "all", 2.0),
                                              ("float32", "none", 1.5)])]
    rows = {r.id: r.values for r in table.build(study, jobs, study.columns)}
    assert rows["float16 / all"]["vs_fp32"] == 2.0 / 1.5 and rows["float16 / all"]["vs_none"] == 2.0 / 3.0
    assert rows["float32 / none"]["vs_fp32"] == 1.0 and rows["float32 / none"]["vs_none"] == 1.0


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, cache_dir) -> Path:
    """`python train.py` with the defaults (tiny model, nf4 QLoRA, LoRA dropout, shuffled rows, eval, offline
    W&B), 10 steps."""
    out = tmp_path_factory.mktemp("default")
    res = train_py(["optim.max_steps=10"], cache_dir, out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "run"


def test_rerun_reproduces_a_default_run_bit_exactly_on_the_cpu(default_run, tmp_path):
    res = qlora_lab(["rerun", str(default_run), "--out", str(tmp_path / "again")])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "10 steps compared: 10 bit-identical" in out and "tolerance rtol 0: within" in out
    then, now = step_records(default_run), step_records(tmp_path / "again")
    assert [r["train/loss"] for r in now.values()] == [r["train/loss"] for r in then.values()]  # exactly
    info = json.loads((tmp_path / "again" / "run_info.json").read_text())
    assert "rerun" in info["config"]["tags"] and info["dataset_fingerprint"] == \
        json.loads((default_run / "run_info.json").read_text())["dataset_fingerprint"]


def test_rerun_reports_what_differs_and_refuses_another_dataset(default_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(default_run, run, ignore=shutil.ignore_patterns("wandb", "adapter"))
    info = json.loads((run / "run_info.json").read_text())
    info.update(dataset_fingerprint="0" * 16, git_commit="f" * 40)
    (run / "run_info.json").write_text(json.dumps(info))
    res = qlora_lab(["rerun", str(run), "--out", str(tmp_path / "again")])
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert f"git commit: {'f' * 12} ->" in out and f"dataset fingerprint: {'0' * 16} ->" in out
    assert "refused; pass --allow-data-change" in out and not (tmp_path / "again").exists()
