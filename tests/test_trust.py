"""Trust (docs/bad_inputs.md rows 179-): a closed schema, no credential in any record, one writer per run dir and
per cache entry, names that stay one path component, files read back refused in one line, ambiguous rows refused
or reported. The cases here run in this process in seconds; the ones that need real processes (a sweep, two runs
at once, kills) are in test_trust_runs.py."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import ROOT, child_env, compose_run
from qlora_lab import closed
from qlora_lab.configs import literal, typed
from qlora_lab.core import lock, resolvers, scrub
from qlora_lab.core.effects import effects
from qlora_lab.core.errors import BadFile, CheckpointError, ConfigError, DataError, RunDirInUse
from qlora_lab.core.files import load_tensors, read_json
from qlora_lab.core.resolvers import job_name, safe
from qlora_lab.core.schema import TrainConfig
from qlora_lab.data import rows as rows_mod
from qlora_lab.data import store, tokenize
from qlora_lab.model import load as load_mod
from qlora_lab.model import source
from qlora_lab.runner import rundir, sweep
from qlora_lab.runner.run import run
from qlora_lab.sinks import provenance
from qlora_lab.sinks.summary import read_summary
from qlora_lab.train import checkpoint
from qlora_lab.train.signals import SignalsRaise

TOKEN = "hf_" + "Fake0Token1For2Tests3Only4Abcdefgh"  # the shape of a Hugging Face token


# ---- a closed schema: a key the schema lacks is refused, `+` or not, with the nearest valid key ----

UNKNOWN_KEYS = [
    ("lora_rank_appended", ["+lora.rank=64"], "lora.rank is not a key of LoraConfig; did you mean lora.r?"),
    ("lora_rank_forced", ["++lora.rank=64"], "lora.rank is not a key of LoraConfig; did you mean lora.r?"),
    ("model_token", [f"+model.token={TOKEN}"], "model.token is not a config key, and credentials never are"),
    ("wandb_api_key", ["+logger.wandb.api_key=abc"], "logger.wandb.api_key is not a config key, and credentials"),
    ("key_in_another_group", ["+model.lr=1e-4"], "model.lr is not a key of ModelConfig; did you mean optim.lr?"),
    ("unknown_top_level_key", ["+learning_rate=1e-4"], "learning_rate is not a key of TrainConfig"),
    ("unknown_sink", ["+logger.tensorboard.log_dir=x"], "logger.tensorboard is not a key of the sinks"),
    ("backend_key_typo", ["+quantization.quant_typ=nf4"], "did you mean quantization.quant_type?"),
]


@pytest.mark.parametrize("overrides,needle", [c[1:] for c in UNKNOWN_KEYS], ids=[c[0] for c in UNKNOWN_KEYS])
def test_unknown_key(compose, overrides, needle):
    cfg = compose(overrides)  # Hydra takes `+key=value` into a typed config without a word
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert len(e.value.problems) == 1 and needle in e.value.problems[0], e.value.problems
    assert TOKEN not in str(e.value) and "abc" not in e.value.problems[0].split("takes:")[0]  # never the value


BUILD_KEYS = [
    ("build_key_typo", ["+model.build.num_hidden_layer=2"],
     "model.build.num_hidden_layer is not a key of LlamaConfig (model_type=llama), which would keep it unused; "
     "did you mean model.build.num_hidden_layers?"),
    ("build_model_type_typo", ["model.build.model_type=lama"],
     "model.build.model_type=lama is not a transformers model type; did you mean llama?"),
]


@pytest.mark.parametrize("overrides,needle", [c[1:] for c in BUILD_KEYS], ids=[c[0] for c in BUILD_KEYS])
def test_build_key(compose, overrides, needle):
    """model.build is open, to its transformers config's keys: checked against that class before anything loads."""
    from qlora_lab.runner import preflight

    with pytest.raises(ConfigError) as e:
        preflight.validate(OmegaConf.to_object(compose(overrides)))
    assert len(e.value.problems) == 1 and needle in e.value.problems[0], e.value.problems


def test_keys_transformers_folds_into_others_are_known():
    """rope_theta is no attribute of LlamaConfig in transformers 5 (it goes into rope_parameters), yet a real key."""
    assert source.build_problems({"model_type": "llama", "rope_theta": 5e5, "hidden_size": 64}) == []
    assert source.build_problems({"model_type": "phi3", "partial_rotary_factor": 0.75}) == []


def test_the_schema_says_where_it_is_open_and_names_no_secret():
    table = effects(TrainConfig)
    assert {k for k, d in table.items() if d.open} == {"model.build"}
    assert not [k for k in closed.all_keys() if scrub.secret_name(k)], "a setting would be redacted from records"
    assert closed.problems(compose_run("/tmp/unused", Path("/tmp/unused"), [])) == []


def test_sweep_overrides_are_checked_before_any_job(compose):
    groups = ["model", "lora", "quantization", "logger", "experiment"]
    assert closed.override_problems(["lora.r=8,16", "quantization=nf4,none", "model.build.hidden_size=64,128",
                                     "logger.wandb.mode=online", "hydra.run.dir=x", "experiment=phi4_mini_qlora"],
                                    groups) == []
    problems = closed.override_problems(["+lora.rank=8,16", "lora.r.x=1"], groups)
    assert "did you mean lora.r?" in problems[0] and "lora.r is a value, not a group of keys" in problems[1]


def test_cli_refuses_an_unknown_key_before_writing_anything(tmp_path, cache_dir):
    env = {**child_env(), "HF_TOKEN": TOKEN}
    for args, where in ([f"+model.token={TOKEN}", f"hydra.run.dir={tmp_path}/run"], "run"), \
            (["-m", "+lora.rank=4,8", f"hydra.sweep.dir={tmp_path}/sweep"], "sweep"):
        res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"cache_dir={cache_dir}"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "is not a" in res.stderr and "Traceback" not in res.stderr
        assert TOKEN not in res.stdout + res.stderr
        assert not (tmp_path / where).exists(), "refused before Hydra wrote anything"


# ---- no credential in any record: the scrubber's rule ----

def test_the_scrubber_redacts_by_name_by_environment_and_by_shape(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "correct-horse-battery")
    monkeypatch.setenv("PAD_TOKEN_ID", "12345678")  # not named like a secret: kept
    s = scrub.scrub_text
    assert s("+model.token=abc lora.r=8") == "+model.token=<redacted> lora.r=8"
    assert s('{"hf_token": "x", "max_new_tokens": 5, "eos_token": "<|end|>"}') == \
        '{"hf_token": "<redacted>", "max_new_tokens": 5, "eos_token": "<|end|>"}'
    assert s(f"path=/data/{TOKEN}/x") == "path=/data/<redacted>/x"
    assert s("mlflow: https://me:pa55word@host:5000/x") == "mlflow: https://<redacted>@host:5000/x"
    assert s("uri=/x/correct-horse-battery/y") == "uri=/x/<redacted>/y"
    assert s("id 12345678 kept; Authorization: Bearer abcdefghijkl") == \
        "id 12345678 kept; Authorization: <redacted> <redacted>"
    for kept in ("git_commit: 0123456789abcdef0123456789abcdef01234567", "data/tokenize_key=ab12", "lr=1e-4",
                 "summary/eval_token_f1: 0.5", "train/tokens_per_s=1e3"):
        assert s(kept) == kept
    assert scrub.scrub({"logger.api_key": "k", "tags": [TOKEN, "x"], "n": 3, "token": None}) == \
        {"logger.api_key": "<redacted>", "tags": ["<redacted>", "x"], "n": 3, "token": None}


def test_every_registered_sink_is_handed_scrubbed_records_only(tmp_path, monkeypatch):
    """What a sink records reaches it through open_sinks (the run: name, group, tags, config, the history a resume
    refills) and MetricLogger (metrics, tables, summary, artifact metadata), both scrubbed: true of every sink
    registered in sinks/ (wandb, mlflow, any added later), which are replaced here by recorders."""
    from qlora_lab import sinks
    from qlora_lab.sinks.logger import MetricLogger

    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    secret = os.environ["WANDB_API_KEY"]
    got: dict[str, list] = {}

    class Recorder:
        run_id = "r"

        def __init__(self, name, run):
            got[name] = [run.name, run.group, run.tags, run.config, run.history]

        def log(self, metrics, step):
            got[self.name].append(metrics)

        def table(self, name, rows, step):
            got[self.name].append(rows)

        def summary(self, values):
            got[self.name].append(values)

        def artifact(self, path, name, kind, metadata):
            got[self.name].append(metadata)

        def close(self):
            pass

    def opener(name):
        def open_sink(cfg, run):
            rec = Recorder(name, run)
            rec.name = name
            return rec
        return open_sink

    for name, module in sinks.SINKS.items():
        monkeypatch.setattr(module, "open_sink", opener(name))
    assert {"wandb", "mlflow"} <= set(sinks.SINKS)
    run = sinks.RunRecord(tmp_path, f"r={TOKEN}", f"sweep-{secret}", None, [TOKEN],
                          {"data.system_prompt": TOKEN, "logger.mlflow.tracking_uri": "https://u:pw@h/x"}, {},
                          history=[{"step": 1, "n": TOKEN}])
    opened = sinks.open_sinks({name: None for name in sinks.SINKS}, run, resume_ids={})
    logger = MetricLogger(opened)
    logger.log({"eval/sample": f"Bearer {TOKEN}", "api_key": "x"}, 1)
    logger.table("eval/samples", [{"prediction": secret}], 1)
    logger.summary({"summary/reason": f"401 for {TOKEN}"})
    logger.artifact(tmp_path, "adapter", "model", {"command": f"+model.token={secret}"})
    assert set(got) == set(sinks.SINKS)
    for name, records in got.items():
        text = json.dumps(records)
        assert TOKEN not in text and secret not in text and "pw@" not in text, name
        assert text.count(scrub.REDACTED) == 11, (name, text)  # each was recorded, its secret redacted


def test_a_job_config_file_holds_no_credential_yet_the_job_gets_it_back(tmp_path, monkeypatch):
    container = {"config": {"tags": [TOKEN], "logger": {"mlflow": {"tracking_uri": "https://u:pw@h/x"}}, "n": 1},
                 "overrides": [f"tags=[{TOKEN}]"]}
    env: dict[str, str] = {}
    sweep.write_handoff(tmp_path / "job_config.json", container, env)
    text = (tmp_path / "job_config.json").read_text()
    assert TOKEN not in text and "pw@" not in text and sweep.SECRETS_ENV in env
    monkeypatch.setenv(sweep.SECRETS_ENV, env[sweep.SECRETS_ENV])
    assert sweep.read_handoff(tmp_path / "job_config.json") == container
    assert sweep.SECRETS_ENV not in os.environ  # taken out: nothing the job starts inherits it


def test_a_sweep_job_resolves_its_config_once_as_a_single_run_does(compose, monkeypatch):
    """An escaped `\\${oc.env:HF_TOKEN}` stays text in a single run; a sweep job's config (resolved once by the
    launcher, then made typed again in the job's process) must keep it text too, not resolve it into the token."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cfg = compose(["data.system_prompt=\\${oc.env:HF_TOKEN}", "tags=['a\\${x}b']"])
    single = OmegaConf.to_object(cfg)
    job = OmegaConf.to_object(typed(OmegaConf.to_container(cfg, resolve=True)))  # what sweep.py's child makes
    assert single.data.system_prompt == job.data.system_prompt == "${oc.env:HF_TOKEN}"
    assert job.tags == single.tags == ["a${x}b"]
    for text in ["${a}", "\\${a}", "\\\\${a}", "a\\b", "$", "plain"]:
        assert OmegaConf.to_container(OmegaConf.create({"v": literal(text)}), resolve=True)["v"] == text


# ---- one writer per run dir ----

HOLD = "import sys, time; from pathlib import Path; from qlora_lab.core import lock; " \
       "lock.acquire(Path(sys.argv[1]), 'x'); print('held', flush=True); time.sleep(float(sys.argv[2]))"


def _holder(path: Path, seconds: float = 60) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True,
                            env=child_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_dir_another_process_writes_is_refused_naming_it(module_run, copy_run, cache_dir):
    run_dir = copy_run(module_run(FINISHED))
    before = _files(run_dir)
    holder = _holder(run_dir / rundir.LOCK)
    try:
        with pytest.raises(RunDirInUse) as e:
            run(compose_run(cache_dir, run_dir, FINISHED + ["resume=auto", "optim.max_steps=5"]),
                overrides=["resume=auto"])
        assert f"pid {holder.pid} on " in str(e.value) and "wait for it to end" in str(e.value)
        assert _files(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    # killed: its lock file stays, names a process that is gone, and the next run takes it over
    assert (run_dir / rundir.LOCK).is_file()
    with rundir.hold(run_dir):
        assert lock.read(run_dir / rundir.LOCK)[0].pid == os.getpid()
    assert not (run_dir / rundir.LOCK).exists()


def test_a_fused_group_holds_each_jobs_run_dir_and_leaves_one_another_writes(cache_dir, tmp_path, monkeypatch,
                                                                           capsys):
    """A fused group (runner/fuse.py) is one process writing several run dirs: it holds each job's lock while it
    trains them; a job whose dir another process holds is dropped from the group (its dir left as it was), the
    others train. Like run(), it turns SIGTERM into an exception each job records."""
    from qlora_lab.runner import fuse

    common = ["optim.max_steps=1", "quantization=none", "eval=loss", "eval.every_steps=0", "eval.at_start=false",
              "data.max_eval_rows=16", "logger=none", "device=cpu"]
    dirs = [tmp_path / f"j{i}" for i in range(3)]
    entries = [fuse.Entry(OmegaConf.to_container(compose_run(cache_dir, d, common + [f"lora.r={4 * (i + 1)}"]),
                                                 resolve=True), [f"lora.r={4 * (i + 1)}"])
               for i, d in enumerate(dirs)]
    dirs[1].mkdir()
    holder = _holder(dirs[1] / rundir.LOCK)
    seen = {}
    real_train = fuse._train

    def train(members, timeline):  # as the group starts training: who holds each job's lock, and what SIGTERM does
        seen.update({m.out_dir.name: lock.read(m.out_dir / rundir.LOCK)[0].pid for m in members})
        seen["sigterm"] = signal.getsignal(signal.SIGTERM)
        return real_train(members, timeline)

    monkeypatch.setattr(fuse, "_train", train)
    try:
        fuse.run_group(entries)
    finally:
        holder.kill()
        holder.wait()
    # SIGTERM (a sweep stopped by Ctrl-C) is an exception every job records, not a silent end of the process
    assert seen.pop("sigterm") is SignalsRaise._raise
    assert seen == {"j0": os.getpid(), "j2": os.getpid()}
    assert f"{dirs[1]} is in use: another run writes there (pid {holder.pid} on " in capsys.readouterr().err
    assert sorted(p.name for p in dirs[1].iterdir()) == [rundir.LOCK]  # the other writer's dir: untouched
    for d in (dirs[0], dirs[2]):
        summary = json.loads((d / "summary.json").read_text())
        assert summary["summary/status"] == "finished" and summary["summary/fused_jobs"] == 2
        assert not (d / rundir.LOCK).exists()  # given back when the group ended


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _plant(path: Path, **fields) -> None:
    me = lock._me()
    path.write_text(json.dumps({**me.__dict__, **fields}))


@pytest.mark.parametrize("fields,age,taken", [
    ({"pid": "dead"}, 0, True),  # its process is gone
    ({"started": 1.0}, 0, True),  # its pid runs another process now
    ({"boot": "another-boot"}, 0, True),  # this machine restarted since
    ({"host": "other-node"}, 5, False),  # another machine, heartbeat fresh: held
    ({"host": "other-node"}, lock.STALE_S + 60, True),  # another machine, no heartbeat: stale
], ids=["dead_pid", "reused_pid", "rebooted", "other_host_alive", "other_host_stale"])
def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path, fields, age, taken, capsys):
    path = tmp_path / "x.lock"
    _plant(path, **{k: (_dead_pid() if v == "dead" else v) for k, v in fields.items()})
    past = time.time() - age
    os.utime(path, (past, past))
    if not taken:
        with pytest.raises(lock.LockHeld, match="pid .* on other-node"):
            lock.acquire(path, "x")
        return
    stale = lock.read(path)[0]
    with lock.hold(path, "x"):
        now = lock.read(path)[0]
        assert now.pid == os.getpid() and now.token != stale.token
    assert "took over the lock" in capsys.readouterr().err and not path.exists()


def test_a_held_lock_beats_and_a_waiter_gets_it_when_it_is_given_back(tmp_path):
    path = tmp_path / "x.lock"
    with lock.hold(path, "x"):
        os.utime(path, (0, 0))
        lock.beat()  # what the heartbeat thread does every HEARTBEAT_S
        assert time.time() - path.stat().st_mtime < 60
    holder = _holder(path, seconds=1.5)
    t0 = time.monotonic()
    with lock.hold(path, "x", wait=True):
        assert time.monotonic() - t0 > 0.5 and lock.read(path)[0].pid == os.getpid()
    holder.wait()


TAKE = "import json, sys, time; from pathlib import Path; from qlora_lab.core import lock; " \
       "p = Path(sys.argv[1]); lock.acquire(p, 'x', wait=True); t = time.time(); time.sleep(0.3); " \
       "print(json.dumps([t, time.time()])); lock.release(p)"


def test_processes_that_find_one_stale_lock_take_it_one_at_a_time(tmp_path):
    path = tmp_path / "x.lock"
    _plant(path, pid=_dead_pid())
    procs = [subprocess.Popen([sys.executable, "-c", TAKE, str(path)], stdout=subprocess.PIPE, text=True,
                              env=child_env(threads=1)) for _ in range(4)]
    spans = sorted(json.loads(p.communicate(timeout=120)[0]) for p in procs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"two holders at once: {spans}"
    assert not path.exists()


def test_default_run_and_sweep_dirs_launched_in_one_second_are_each_their_own(tmp_path, monkeypatch):
    """Two launches with a time-stamped (default) dir in the same second get `<name>` and `<name>-2`."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from helpers import CONF

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lock, "acquire", lambda *a, **k: None)  # (this process would hold both: re-entrant)
    OmegaConf.register_new_resolver("qlab.launch_time", lambda fmt: "2026-01-01_00-00-00", replace=True)
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            dirs = []
            for _ in range(2):
                cfg = hydra_compose(config_name="train", overrides=["lora.r=8"], return_hydra_config=True)
                rundir.RunDirGuard().on_run_start(cfg)
                dirs.append(Path(cfg.hydra.run.dir).name)
    finally:
        OmegaConf.register_new_resolver("qlab.launch_time", resolvers.launch_time, replace=True)
        HydraConfig.instance().cfg = None
        rundir.LAUNCH.clear()
    assert dirs == ["2026-01-01_00-00-00_r=8", "2026-01-01_00-00-00_r=8-2"]
    assert rundir.claim_new(tmp_path / "s") != rundir.claim_new(tmp_path / "s")


def test_a_sweep_dir_another_sweep_writes_is_refused_naming_it(tmp_path, capsys):
    """One sweep at a time in a sweep dir: a second launch into it exits 2 naming the first, before any job."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from helpers import CONF

    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    holder = _holder(sweep_dir / rundir.LOCK)
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hydra_compose(config_name="train", overrides=[f"hydra.sweep.dir={sweep_dir}"],
                                return_hydra_config=True)
        with pytest.raises(SystemExit) as e:
            rundir.RunDirGuard().on_multirun_start(cfg)
    finally:
        holder.kill()
        holder.wait()
    assert e.value.code == 2
    assert f"{sweep_dir} is in use: another sweep writes there (pid {holder.pid} on " in capsys.readouterr().err
    assert sorted(p.name for p in sweep_dir.iterdir()) == [rundir.LOCK]


# ---- names: a user's value is one path component, wherever it becomes a path ----

def test_names_made_of_user_values_stay_one_path_component(compose, tmp_path, monkeypatch):
    from hydra import compose as hydra_compose, initialize_config_dir

    from helpers import CONF

    assert safe("..") == "" and safe("../../x") == "x" and "/" not in safe("a/../b")
    assert job_name([f"tags=[{TOKEN}]", f"data.system_prompt={TOKEN}"], None, None) == \
        "system_prompt=redacted,tags=redacted"
    assert job_name(["data.path=../../../etc", "lora.r=8"], "data.path,lora.r", 3) == "3_path=etc,r=8"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=["hydra.job.name=../../x"], return_hydra_config=True)
    rundir._safe_job_name(cfg)
    assert cfg.hydra.job.name == "x"  # the job log is <run dir>/x.log, not two levels up
    m = OmegaConf.to_object(compose(["model.name=../../escaped"])).model
    path = Path(source.resolve_model_path(m, str(tmp_path / "cache"), 0))
    assert path.parent == (tmp_path / "cache").resolve() and path.name.startswith("escaped-")


# ---- files read back: refused in one line naming the file and the fix; a failed attempt changes nothing ----

FINISHED = ["optim.max_steps=3", "save.every_steps=1", "save.keep_last=3", "logger=none", "eval=loss",
            "eval.every_steps=0", "data.max_eval_rows=16", "quantization=none", "device=cpu"]
MARKER = "/tmp/qlora-lab-trust-payload-ran"


class _Payload:
    """A pickled object that, if unpickled by a loader that allows objects, runs a command."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK}


def _reseal(ckpt: Path) -> None:
    """Rewrite the manifest as if the planted file were the checkpoint's own (an attacker would)."""
    manifest = {n: {"sha256": checkpoint._sha256(ckpt / n), "bytes": (ckpt / n).stat().st_size}
                for n in checkpoint.FILES}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


PLANTED = ["adapter.pt", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "config.json"]


@pytest.mark.parametrize("name", PLANTED)
def test_a_planted_file_in_a_checkpoint_is_refused_unread_and_the_run_stays_as_it_was(module_run, copy_run,
                                                                                      cache_dir, name):
    run_dir = copy_run(module_run(FINISHED))
    latest = checkpoint.all_checkpoints(run_dir)[-1]
    if name.endswith(".pt"):
        torch.save({"state": _Payload()}, latest / name)
    else:
        (latest / name).write_bytes(pickle.dumps(_Payload()))
    _reseal(latest)
    Path(MARKER).unlink(missing_ok=True)
    before = _files(run_dir)
    with pytest.raises(BadFile) as e:
        run(compose_run(cache_dir, run_dir, FINISHED + ["resume=auto", "optim.max_steps=5"]),
            overrides=["resume=auto", "optim.max_steps=5"])
    msg = str(e.value)
    assert str(latest / name) in msg and "\n" not in msg and "weights_only=False" not in msg
    assert "resume from another one" in msg
    assert not Path(MARKER).exists(), "the payload ran"
    assert _files(run_dir) == before, "a refused resume rewrote the finished run's records"


def test_a_finished_run_whose_checkpoints_are_all_damaged_is_never_started_over(module_run, copy_run, cache_dir):
    run_dir = copy_run(module_run(FINISHED))
    for ckpt in checkpoint.all_checkpoints(run_dir):
        (ckpt / "manifest.json").unlink()
    before = _files(run_dir)
    with pytest.raises(CheckpointError, match="whose checkpoints are all damaged .* overwrite=true"):
        run(compose_run(cache_dir, run_dir, FINISHED + ["resume=auto", "optim.max_steps=5"]),
            overrides=["resume=auto"])
    assert _files(run_dir) == before


def test_records_read_back_are_refused_in_one_line(tmp_path):
    (tmp_path / "summary.json").write_text('{"summary/status": "finished",')
    with pytest.raises(BadFile, match=r"summary.json is not valid JSON \(.*\); it is not a summary qlora-lab wrote"):
        read_summary(tmp_path)
    (tmp_path / "run_info.json").write_bytes(b"\xff\xfe")
    with pytest.raises(BadFile, match="run_info.json is not UTF-8 text"):
        provenance.record_resume(tmp_path, checkpoint=None, step=0, overrides=[], differences=[])
    (tmp_path / "t.pt").write_bytes(b"not a tensor file")
    with pytest.raises(BadFile, match="t.pt is not a plain tensor file: it holds something other than") as e:
        load_tensors(tmp_path / "t.pt", "FIX")
    assert str(e.value).endswith("; FIX")
    (tmp_path / "x.json").write_text("[1, 2")
    with pytest.raises(BadFile, match=r"x.json is not valid JSON \(.* at line 1, column 6\); FIX"):
        read_json(tmp_path / "x.json", "FIX")


def test_a_sweeps_records_read_back_are_one_jobs_problem_never_the_sweeps(tmp_path, compose, capsys):
    """A sweep reads back what its jobs and its killed runs left: a torn line of sweep_summary.jsonl, a job's
    summary.json that is not JSON, a metrics line cut short, an overrides.yaml that is not YAML. Each is said in one
    line and costs that job (or line) alone; the table, the report and the other jobs go on."""
    from qlora_lab.runner import compare

    good = {"summary/status": "finished", "summary/final_loss": 2.5, "summary/peak_memory_gib": 1.0}
    for name, summary in (("job0", json.dumps(good)), ("job1", '{"summary/status": "fini')):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(summary)
        (tmp_path / name / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/lo')
    (tmp_path / "job0" / ".hydra" / "overrides.yaml").write_text("- lora.r=4\n- [unclosed\n")
    jobs = compare.load_jobs(tmp_path)
    assert [(j["name"], j["curve"], j["overrides"]) for j in jobs] == [("job0", [(1, 3.0)], [])]
    err = capsys.readouterr().err
    assert "job1 left out: " in err and "summary.json is not valid JSON" in err and "overrides.yaml is not YAML" in err
    assert "Traceback" not in err

    (tmp_path / sweep.SUMMARY_FILE).write_text(json.dumps({"job": "job0", **good}) + '\n{"job": "job1", "summ')
    table, bad = sweep.report(tmp_path)
    assert "job0" in table and "job1" not in table and bad == 0
    assert f"{tmp_path / sweep.SUMMARY_FILE} line 2 is not a job's record" in capsys.readouterr().err

    failed = sweep.job_summary(tmp_path / "job1")  # what the sweep records for the job whose summary is damaged
    assert failed["summary/status"] == "failed" and "summary.json is not valid JSON" in failed["summary/reason"]
    cfg = compose(["sweep.resume=true"], out=tmp_path / "job1")
    assert sweep.finished_before(cfg, "job1") is None  # not taken for finished: the job runs and says why

    (tmp_path / "job_config.json").write_text('{"config": {"lora"')
    with pytest.raises(BadFile, match=r"job_config.json is not valid JSON \(.*\); it is not a job's config"):
        sweep.read_handoff(tmp_path / "job_config.json")


def test_an_export_publishes_no_credential_and_refuses_a_damaged_export_json(module_run, copy_run, tmp_path,
                                                                            monkeypatch, capsys):
    """An export's model card is made to be published: what it copies from the run (config, command, summary) is
    scrubbed again, so a run recorded before scrubbing (planted here) leaks nothing through it, nor through
    export.json or the console. export.json read back by --check-only: damaged, it is refused in one line."""
    from qlora_lab.cli import main as cli

    run_dir = copy_run(module_run(FINISHED))
    monkeypatch.setenv("HF_TOKEN", "env-secret-value-0123")
    info = json.loads((run_dir / "run_info.json").read_text())
    info["config"]["tags"] = [TOKEN]
    info["command"] = f"train.py +model.token=env-secret-value-0123 tags=[{TOKEN}]"
    (run_dir / "run_info.json").write_text(json.dumps(info))
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "summary/eval_note": f"Bearer {TOKEN}"}))
    out = tmp_path / "export"
    assert cli(["export", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    files = {p.name: p.read_text() for p in out.iterdir() if p.suffix in (".md", ".json")}
    assert {"README.md", "export.json"} <= set(files) and "tags=[<redacted>]" in files["README.md"]
    for text in (*files.values(), printed.out, printed.err):
        assert TOKEN not in text and "env-secret-value-0123" not in text
    manifest = out / "export.json"
    for damaged in ('{"format": "merged", "fi', json.dumps({"format": "merged"})):
        manifest.write_text(damaged)
        assert cli(["export", str(run_dir), "--check-only", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{manifest} " in err and "export again with --overwrite" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    (run_dir / "summary.json").write_text('{"summary/status": "fin')  # the run's own record, read by every export
    assert cli(["export", str(run_dir), "--overwrite", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'summary.json'} is not valid JSON" in err and "Traceback" not in err


def test_an_export_of_a_run_dir_another_process_writes_is_refused_naming_it(module_run, copy_run, capsys):
    """The export reads the adapter and writes into RUN_DIR/export/: it holds the run dir's lock as a run does, so an
    export while a run trains there (a resume may replace the adapter mid-read) is refused, before any model loads."""
    from qlora_lab.cli import main as cli

    run_dir = copy_run(module_run(FINISHED))
    holder = _holder(run_dir / rundir.LOCK)
    try:
        assert cli(["export", str(run_dir)]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"{run_dir} is in use: another process writes there (pid {holder.pid} on " in err
    assert "nothing was loaded or written" in err and not (run_dir / "export").exists()


def test_a_model_dir_with_pickled_weights_is_refused_unread(tmp_path, compose):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                               "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 32}))
    torch.save({"model.embed_tokens.weight": _Payload()}, d / "pytorch_model.bin")
    Path(MARKER).unlink(missing_ok=True)
    m = OmegaConf.to_object(compose(["model=local", f"model.path={d}", "model.dtype=float32"])).model
    with pytest.raises(BadFile, match=r"\(a \*.bin file\) hold something other than tensors .* refused unread") as e:
        load_mod.load_model(str(d), m, {}, "cpu")
    assert "weights_only=False" not in str(e.value) and not Path(MARKER).exists()


def test_a_cache_entry_with_planted_weights_is_rebuilt_never_read(tmp_path, compose):
    m = OmegaConf.to_object(compose()).model
    entry = Path(source.resolve_model_path(m, str(tmp_path), 0))
    (entry / "model.safetensors").unlink()
    torch.save({"w": _Payload()}, entry / "pytorch_model.bin")
    Path(MARKER).unlink(missing_ok=True)
    assert Path(source.resolve_model_path(m, str(tmp_path), 0)) == entry
    assert (entry / "model.safetensors").is_file() and not (entry / "pytorch_model.bin").exists()
    assert not Path(MARKER).exists()


def test_a_tokenized_store_with_a_planted_file_is_rebuilt_never_read(tmp_path, compose):
    cfg = OmegaConf.to_object(compose())
    tok = source.load_tokenizer(source.resolve_model_path(cfg.model, cfg.cache_dir, 0), cfg.model)
    rows = [{"prompt": f"p{i}", "response": "r"} for i in range(8)]
    s = store.Settings(32, True, None, 0)
    first = store.load_or_build(rows, rows_mod.fingerprint(rows), tok, s, str(tmp_path), 1)
    for arrow in (first.path / "data").glob("*.arrow"):
        arrow.write_bytes(pickle.dumps(_Payload()))
    Path(MARKER).unlink(missing_ok=True)
    again = store.load_or_build(rows, rows_mod.fingerprint(rows), tok, s, str(tmp_path), 1)
    assert not again.hit and again.dataset.num_rows == 8 and not Path(MARKER).exists()


# ---- crash leftovers: cleaned at the next start of the same run ----

def test_what_a_killed_writer_left_is_cleaned_when_the_run_dir_is_next_held(module_run, copy_run):
    run_dir = copy_run(module_run(FINISHED))
    (run_dir / "checkpoints" / ".tmp-step_0000004-999999").mkdir()
    (run_dir / ".summary.json.tmp").write_text("{")
    (run_dir / ".adapter.tmp").mkdir()
    os.replace(run_dir / "adapter", run_dir / ".adapter.old")  # killed between save_adapter's two renames
    with rundir.hold(run_dir):
        pass
    assert not list(run_dir.glob(".*.tmp")) and not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert (run_dir / "adapter" / "adapter_config.json").is_file() and not (run_dir / ".adapter.old").exists()


# ---- ambiguous rows: refused or reported, with the rule that decided ----

def _read(compose, tmp_path, rows_, raw=None):
    path = tmp_path / "d.jsonl"
    path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows_))
    return rows_mod.read_rows(OmegaConf.to_object(compose(["data=jsonl", f"data.path={path}"])).data)


GOOD = {"prompt": "p", "response": "r"}
CHAT = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
AMBIGUOUS_ROWS = [
    ("both_forms", {"messages": CHAT, "prompt": "p", "response": "r"},
     "row 2 has both 'messages' and 'prompt'/'response', two forms of one example; keep one"),
    ("system_beside_prompt", {"system": "be brief", "prompt": "p", "response": "r"},
     "row 2 has a 'system' key beside 'prompt'/'response', which such rows do not read; write the row as 'messages'"),
    ("message_weight", {"messages": [CHAT[0], {**CHAT[1], "weight": 0}]},
     "row 2 message 1 has a 'weight', which is not read (every assistant turn trains)"),
]


@pytest.mark.parametrize("row,needle", [c[1:] for c in AMBIGUOUS_ROWS], ids=[c[0] for c in AMBIGUOUS_ROWS])
def test_ambiguous_row(compose, tmp_path, row, needle):
    with pytest.raises(DataError) as e:
        _read(compose, tmp_path, [GOOD, row])
    assert needle in str(e.value)


def test_a_duplicated_json_key_is_refused_with_its_line(compose, tmp_path):
    raw = json.dumps(GOOD) + "\n" + '{"prompt": "a", "prompt": "b", "response": "r"}\n'
    with pytest.raises(DataError, match="line 2 has the key 'prompt' twice in one object; a JSON reader keeps the"):
        _read(compose, tmp_path, None, raw)


def test_keys_nothing_reads_are_reported_with_the_rule(compose, tmp_path, capsys):
    rows = _read(compose, tmp_path, [{**GOOD, "id": 1}, {**GOOD, "id": 2, "source": "x"},
                                     {"messages": [{**CHAT[0], "name": "bob"}, CHAT[1]]}])
    assert len(rows) == 3
    err = capsys.readouterr().err
    assert "keys not read, ignored: 'id' (2 rows), 'messages[].name' (1 row), 'source' (1 row)" in err
    assert "a row is read as 'prompt'+'response' or as 'messages'" in err
    # a table of mixed rows (datasets gives every row every column, None where absent) is no ambiguity
    rows_mod.check_rows([{"messages": CHAT, "prompt": None, "response": None}, {**GOOD, "messages": None}], "t")


def test_a_role_the_chat_template_does_not_know_is_refused(compose):
    cfg = OmegaConf.to_object(compose())
    tok = source.load_tokenizer(source.resolve_model_path(cfg.model, cfg.cache_dir, 0), cfg.model)
    rows = [{"messages": CHAT}, {"messages": [{"role": "human", "content": "u"}, {"role": "gpt", "content": "a"}]}]
    with pytest.raises(DataError, match=r"role 'human' in row 2; role 'gpt' in row 2: not a role the chat template "
                                        r"knows \(assistant, system, user\); rename it"):
        tokenize.check_roles(rows, tok)
    assert tokenize.template_roles("{% if message['role'] == 'tool' %}") >= {"tool", "user"}


# the catalogue (docs/bad_inputs.md) lists each parametrized case (tests/test_bad_inputs.py)
TRUST_FAMILIES = {"test_unknown_key": UNKNOWN_KEYS, "test_build_key": BUILD_KEYS, "test_ambiguous_row": AMBIGUOUS_ROWS}
