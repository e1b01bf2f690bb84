"""checkpointing=auto (memory/frontier.py): per-layer keep / recompute / offload and the micro-batch, chosen for the
most predicted tokens/s that fits the budget; plan.max_seq_len=search; per-layer modes computing what
all-recompute computes."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from helpers import step_records
from qlora_lab.core.errors import ConfigError
from qlora_lab.core.modes import format_layers, parse_layers
from qlora_lab.memory import frontier
from qlora_lab.memory.ledger import read_arch
from qlora_lab.runner.resolve import resolve_spec
from qlora_lab.runner.run import run

PHI4 = ["model=phi4_mini_shape", "model.kernels=liger", "checkpointing=auto", "data.micro_batch_size=auto",
        "lora.kernel=fused", "model.max_seq_len=2048", "model.build.max_position_embeddings=1048576"]
HOST = 64.0  # GiB of host RAM the plans may offload into (fixed: the machine's free RAM would make them vary)


def test_layers_spell_runs_of_modes():
    modes = ["offload"] * 3 + ["recompute"] * 2 + ["keep"] * 27
    assert format_layers(modes) == "offload:3+recompute:2+keep:27" and parse_layers(format_layers(modes)) == modes
    with pytest.raises(ValueError, match="is not <mode>:<count>"):
        parse_layers("keep:3+forget:2")


@pytest.fixture(scope="module")
def phi4(tmp_path_factory, cache_dir):
    from helpers import compose_run

    cfg = OmegaConf.to_object(compose_run(cache_dir, tmp_path_factory.mktemp("p"), PHI4 + ["device=cpu"]))
    return cfg, read_arch(cfg)


def test_more_memory_never_yields_a_slower_plan(phi4):
    """The plan is a pure function of the config and the budget: the same plan twice, and over a table of budgets
    the predicted tokens/s never falls as the budget grows, nor does the predicted peak exceed the budget."""
    cfg, arch = phi4
    speeds = []
    for budget in (6, 8, 12, 16, 24, 32, 48, 64, 80):
        p = frontier.plan_layers(cfg, arch, budget, "H100", host_gib=HOST)
        again = frontier.plan_layers(cfg, arch, budget, "H100", host_gib=HOST)
        assert (p.chosen.micro_batch, p.chosen.layers) == (again.chosen.micro_batch, again.chosen.layers)
        assert p.chosen.ledger.card_gib <= budget * (1 - cfg.plan.safety_margin)
        assert all(r.ledger.card_gib < p.chosen.ledger.card_gib for r in p.runners_up)  # each a notch lighter
        speeds.append(p.chosen.tokens_per_s)
    assert speeds == sorted(speeds), speeds
    small, large = (frontier.plan_layers(cfg, arch, b, "H100", host_gib=HOST).chosen for b in (8, 80))
    assert "offload" in small.layers and large.layers == "keep:32" and large.tokens_per_s > small.tokens_per_s
    assert large.micro_batch >= small.micro_batch


def test_a_budget_below_the_minimum_is_refused_naming_it(phi4):
    cfg, arch = phi4
    with pytest.raises(ConfigError) as e:
        frontier.plan_layers(cfg, arch, 2.0, "H100", host_gib=HOST)
    assert "needs" in str(e.value) and "GiB on the card" in str(e.value) and "plan.gpu_memory_gib" in str(e.value)


def test_host_ram_bounds_what_is_offloaded(phi4):
    cfg, arch = phi4
    roomy = frontier.plan_layers(cfg, arch, 8, "H100", host_gib=HOST).chosen
    tight = frontier.plan_layers(cfg, arch, 8, "H100", host_gib=0.05)
    assert roomy.ledger.extra["host_bytes"] > 0.05 * 2 ** 30 >= tight.chosen.ledger.extra["host_bytes"]
    assert tight.chosen.tokens_per_s <= roomy.tokens_per_s


def test_the_longest_context_search(phi4):
    cfg, arch = phi4
    seq80, led80 = frontier.longest_seq(cfg, arch, 80, host_gib=HOST * 4)
    seq24, _ = frontier.longest_seq(cfg, arch, 24, host_gib=HOST * 4)
    assert seq80 > seq24 > 2048 and seq80 % 256 == 0
    assert led80.card_gib <= 80 * (1 - cfg.plan.safety_margin) and led80.seq_len == seq80


def test_mode_plan_prints_the_choice_and_the_runners_up(compose, capsys):
    from qlora_lab.runner.run import run as run_plan

    out = run_plan(compose(PHI4 + ["mode=plan", "plan.gpu_memory_gib=16"]))
    printed = capsys.readouterr().out
    assert "checkpointing=auto: the chosen plan (*) and the runners-up" in printed
    assert out["summary/checkpointing_layers"] != "auto" and out["plan/candidates"][0]["predicted_tokens_per_s"] > 0


@pytest.mark.parametrize("layers", ["keep:2+recompute:1+offload:1", "offload:2+keep:2"])
def test_per_layer_modes_compute_what_all_recompute_computes(spec_of, layers):
    """Loss and LoRA gradients of one step with mixed per-layer modes against every layer recomputed (fp32, dropout
    on: its masks do not depend on recompute). Measured: equal to the last bit on the CPU; bound 1e-6."""
    from qlora_lab.data import batching, rows, tokenize
    from qlora_lab.model import build_model
    from qlora_lab.train.step import forward_loss

    grads = {}
    for name in ("all", layers):
        spec = spec_of(["checkpointing=non_reentrant", f"checkpointing.layers={name}"])
        built = build_model(spec)
        ex = tokenize.build_examples(rows.read_rows(spec.cfg.data)[:8], built.tokenizer, 64, True).examples
        batch = batching.collate(ex, built.tokenizer.pad_token_id)
        built.model.train()
        built.micro.set(3)
        loss = forward_loss(built.model, batch, "cpu", 50)
        loss.backward()
        grads[name] = (float(loss), {n: p.grad.clone() for n, p in built.model.named_parameters() if p.grad is not None})
    (la, ga), (lb, gb) = grads["all"], grads[layers]
    assert lb == pytest.approx(la, rel=1e-6) and sorted(ga) == sorted(gb)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-6, atol=1e-9), n


def test_auto_on_the_cpu_with_a_budget_resumes_with_its_recorded_choice(compose, tmp_path):
    """checkpointing=auto records what it chose; a resume re-uses it, even where the plan would choose otherwise
    (another budget), and continues bit-exactly."""
    import shutil

    base = ["checkpointing=auto", "optim.max_steps=6", "save.every_steps=3", "eval=loss", "eval.every_steps=0",
            "logger=none", "device=cpu"]
    spec = resolve_spec(OmegaConf.to_object(compose(base + ["plan.gpu_memory_gib=0.652"])), "cpu")[0]
    chosen = spec.cfg.checkpointing.layers
    assert chosen != "auto" and "keep" in chosen and chosen != "keep:4", chosen  # a mix, for this budget
    whole = tmp_path / "whole"
    run(compose(base + ["plan.gpu_memory_gib=0.652"], out=whole))
    info = json.loads((whole / "run_info.json").read_text())
    assert info["config"]["checkpointing"]["layers"] == chosen and info["plan"]["chosen"]["layers"] == chosen
    cut = tmp_path / "cut"  # the run as a crash after step 3's checkpoint leaves it
    shutil.copytree(whole, cut)
    (cut / "summary.json").unlink()
    again = run(compose(base + ["plan.gpu_memory_gib=100", "resume=auto"], out=cut))
    assert again["summary/resumed_from_step"] == 3
    resumed = json.loads((cut / "run_info.json").read_text())["resumes"][-1]
    assert not any(d.startswith("checkpointing.layers") for d in resumed["config_differences"])  # re-used, not re-planned
    a, b = step_records(whole), step_records(cut)
    assert {s: r["train/loss"] for s, r in a.items()} == {s: r["train/loss"] for s, r in b.items()}


def test_the_proving_step_runs_as_the_training_steps_run(spec_of):
    """The step that proves an auto plan runs the model in training mode: the layers the plan recomputes are
    checkpointed and dropout is on (a model as built is in eval mode, which checkpoints nothing: its step would
    measure another plan). The model's mode comes back as it was, with no gradient left behind."""
    from qlora_lab.model import build_model
    from qlora_lab.model.prepare import checkpointed_layers
    from qlora_lab.runner.run import _probe_step

    built = build_model(spec_of(["checkpointing=non_reentrant", "checkpointing.layers=recompute:3+keep:1"]))
    calls, modes = [], []
    for layer in checkpointed_layers(built.model):
        func = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, f=func, **k: calls.append(1) or f(*a, **k)
        layer.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    built.model.eval()
    _probe_step(built.model, 2, 32, "cpu")
    assert len(calls) == 3 and modes and all(modes)  # three layers recomputed (one kept), every layer training
    assert not built.model.training and all(p.grad is None for p in built.model.parameters())
