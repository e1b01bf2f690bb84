"""The counter-based LoRA dropout (model/dropout.py): its keep rate, its independence, and that a mask is a function of
(seed, layer, micro-batch, element) alone."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_lab.model import dropout as hd

SHAPE = torch.Size([64, 128, 512])  # 4,194,304 elements: the binomial standard deviation of the rate is < 2.5e-4


def _mask(p: float, key: int = 12345, micro: int = 0, shape: torch.Size = SHAPE, offset: int = 0) -> torch.Tensor:
    return hd.keep_mask(shape, p, torch.tensor(key), torch.tensor(micro), torch.device("cpu"), torch.tensor(offset))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_rate_is_one_minus_p(p):
    """Within 5 binomial standard deviations (a fair coin of that rate misses this once in ~3.5 million tests)."""
    n = SHAPE.numel()
    kept = _mask(p).double().mean().item()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sd, (kept, 1 - p, sd)


def test_neighbouring_elements_are_uncorrelated():
    """Correlation of each element's mask with the next one along the row and with the same one in the next row:
    for independent draws it is ~N(0, 1/n), so |r| < 5/sqrt(n)."""
    m = _mask(0.5).double().reshape(-1, SHAPE[-1])
    for a, b in ((m[:, :-1], m[:, 1:]), (m[:-1], m[1:])):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        r = (a @ b / (a.norm() * b.norm())).item()
        assert abs(r) < 5 / math.sqrt(a.numel()), r


def test_masks_differ_across_layers_and_micro_batches_and_repeat_exactly():
    base = _mask(0.1, shape=torch.Size([8, 256]))
    assert torch.equal(base, _mask(0.1, shape=torch.Size([8, 256])))  # a recompute draws the same mask
    for other in (_mask(0.1, key=54321, shape=torch.Size([8, 256])), _mask(0.1, micro=1, shape=torch.Size([8, 256]))):
        agree = (base == other).double().mean().item()
        # two independent masks of keep rate 0.9 agree on 0.9^2 + 0.1^2 = 0.82 of the elements
        assert abs(agree - 0.82) < 0.03, agree


def test_a_piece_of_the_rows_gets_the_whole_tensors_mask_and_chunking_changes_nothing(monkeypatch):
    """model.mlp_chunk computes an MLP's rows in pieces: piece k at row offset o draws the whole mask's rows o..;
    outside a compiled graph the hash runs in chunks of CHUNK elements: the bits are those of one pass."""
    shape = torch.Size([6, 10, 64])
    whole = _mask(0.3, shape=shape)
    rows = whole.reshape(-1, 64)
    piece = _mask(0.3, shape=torch.Size([25, 64]), offset=17)
    assert torch.equal(piece, rows[17:42])
    monkeypatch.setattr(hd, "CHUNK", 1000)  # not a multiple of the row: chunks cut rows
    assert torch.equal(_mask(0.3, shape=shape), whole)


def test_layer_keys_depend_on_seed_and_name_only():
    assert hd.layer_key(0, "model.layers.0.mlp.up_proj") == hd.layer_key(0, "model.layers.0.mlp.up_proj")
    keys = {hd.layer_key(s, f"model.layers.{i}.mlp.up_proj") for s in (0, 1) for i in range(8)}
    assert len(keys) == 16 and all(0 <= k < 2**31 for k in keys)


def test_hash_dropout_scales_kept_elements_and_is_identity_in_eval():
    micro = hd.MicroBatch()
    drop = hd.HashDropout(0.25, seed=3, layer="model.layers.1.self_attn.q_proj", micro=micro)
    x = torch.randn(4, 32, 64)
    y = drop(x)
    kept = drop.mask(x)
    assert torch.equal(y[kept], x[kept] * (1 / 0.75)) and bool((y[~kept] == 0).all())
    micro.set(1)
    assert not torch.equal(drop(x), y)  # the next micro-batch draws another mask
    micro.set(0)
    assert torch.equal(drop(x), y)
    drop.eval()
    assert drop(x) is x


def test_install_replaces_every_lora_dropout_of_a_peft_model(tiny):
    """The tiny model's LoRA layers (dropout 0.05 by default) all carry the counter-based dropout after build."""
    _, model, _, _ = tiny([])
    from peft.tuners.lora import LoraLayer

    drops = [d for m in model.modules() if isinstance(m, LoraLayer) for d in m.lora_dropout.values()]
    assert drops and all(isinstance(d, hd.HashDropout) and d.p == 0.05 for d in drops)
    assert len({int(d.key) for d in drops}) == len(drops)  # a key per layer
