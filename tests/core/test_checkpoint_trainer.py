"""Checkpoints as the trainer uses them: optimizer (AdamW or Muon) and RNG state restored exactly, listing and
pruning, damage to any file named. (The basic round trip is in test_checkpoint.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from llmctl.config import ModelConfig, OptimConfig
from llmctl.core import checkpoint as ckpt
from llmctl.core.device import rng_state, set_rng_state
from llmctl.core.model import build_model
from llmctl.core.optim import build_optimizer
from llmctl.errors import CheckpointError

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)


def trained(optim: str = "adamw"):
    torch.manual_seed(0)
    model = build_model(TINY, 257, 256)
    opt = build_optimizer(model, OptimConfig(name=optim))
    x = torch.randint(0, 257, (2, 16))
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_round_trip_restores_weights_optimizer_and_rng_exactly(tmp_path, optim):
    model, opt = trained(optim)
    torch.manual_seed(123)
    state = {"optimizer": opt.state_dict(), "rng": rng_state(), "counters": {"step": 2}}
    path = ckpt.save_checkpoint(tmp_path / "step-00000002", model, state, {"step": 2, "config_sha256": "abc"})
    expected_draw = torch.rand(3)

    fresh, fresh_opt = build_model(TINY, 257, 256), None
    loaded, meta = ckpt.load_checkpoint(path, fresh)
    fresh_opt = build_optimizer(fresh, OptimConfig(name=optim))
    fresh_opt.load_state_dict(loaded["optimizer"])
    set_rng_state(loaded["rng"])
    assert meta == {"step": 2, "config_sha256": "abc"} and loaded["counters"] == {"step": 2}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(torch.rand(3), expected_draw)
    # one more identical step from both: the optimizer state came back whole
    x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(5))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(input_ids=x, labels=x).loss.backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_state_holds_no_pickled_code(tmp_path):
    model, opt = trained()
    path = ckpt.save_checkpoint(tmp_path / "c", model, {"optimizer": opt.state_dict(), "rng": rng_state()}, {})
    torch.load(path / ckpt.STATE, weights_only=True)  # would raise on anything but tensors and plain data


def test_saving_over_a_checkpoint_leaves_no_temporaries(tmp_path):
    model, _ = trained()
    path = tmp_path / "step-00000001"
    ckpt.save_checkpoint(path, model, {"v": 1}, {"step": 1})
    ckpt.save_checkpoint(path, model, {"v": 2}, {"step": 1, "again": True})
    assert ckpt.read_meta(path)["again"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]  # no temporary left behind


def test_list_latest_and_prune_keep_the_newest_and_the_protected(tmp_path):
    model, _ = trained()
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), model, {}, {"step": step})
    (tmp_path / ".step-00000050.abc.tmp").mkdir()  # what a kill during a write leaves
    (tmp_path / "notes").mkdir()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 20, 30, 40]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000040"
    ckpt.prune_checkpoints(tmp_path, keep=2, protect=(ckpt.checkpoint_path(tmp_path, 10),))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step-00000010", "step-00000030", "step-00000040"]
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


def test_damaged_checkpoints_are_named_in_one_line(tmp_path):
    model, _ = trained()
    path = ckpt.save_checkpoint(tmp_path / "c", model, {"x": torch.zeros(1000)}, {"step": 1})
    state = (path / ckpt.STATE).read_bytes()
    (path / ckpt.STATE).write_bytes(state[:100])
    with pytest.raises(CheckpointError, match=r"c is corrupted: state.pt"):
        ckpt.load_checkpoint(path, build_model(TINY, 257, 256))
    (path / ckpt.WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"c is corrupted: model.safetensors"):
        ckpt.load_checkpoint(path, build_model(TINY, 257, 256))
    (path / ckpt.META).write_text("{")
    with pytest.raises(CheckpointError, match="meta.json"):
        ckpt.read_meta(path)
    other = ckpt.save_checkpoint(tmp_path / "d", model, {}, {})
    with pytest.raises(CheckpointError, match="does not fit this model"):
        ckpt.load_checkpoint(other, build_model(ModelConfig(n_layer=3, n_head=2, n_embd=32, n_positions=64), 257, 256))
    assert json.loads((other / ckpt.META).read_text()) == {}
