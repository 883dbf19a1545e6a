"""Checkpoints: round trip with equal tensors, atomic replacement, and clear errors on damage."""

from __future__ import annotations

import pytest
import torch

from llmctl.config import ModelConfig, OptimConfig
from llmctl.core.checkpoint import WEIGHTS, load_checkpoint, read_meta, save_checkpoint
from llmctl.core.model import build_model
from llmctl.core.optim import build_optimizer
from llmctl.errors import CheckpointError


def make_model(seed: int):
    torch.manual_seed(seed)
    return build_model(ModelConfig(n_layer=2, n_head=2, n_embd=16, n_positions=32), vocab_size=40, eos_token_id=39)


def trained_state(model):
    opt = build_optimizer(model, OptimConfig())
    loss = model(torch.randint(0, 40, (2, 8)), labels=torch.randint(0, 40, (2, 8))).loss
    loss.backward()
    opt.step()
    return opt


def test_round_trip_restores_equal_tensors(tmp_path):
    model = make_model(0)
    opt = trained_state(model)
    state = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": 7}
    save_checkpoint(tmp_path / "ckpt", model, state, {"step": 7, "config_sha256": "abc"})

    other = make_model(1)
    assert not torch.equal(other.transformer.wte.weight, model.transformer.wte.weight)
    loaded_state, meta = load_checkpoint(tmp_path / "ckpt", other)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    # Tied weights stay tied after loading.
    assert other.lm_head.weight.data_ptr() == other.transformer.wte.weight.data_ptr()
    assert meta == {"step": 7, "config_sha256": "abc"} and read_meta(tmp_path / "ckpt")["step"] == 7
    assert loaded_state["step"] == 7 and torch.equal(loaded_state["rng"], state["rng"])
    fresh = build_optimizer(other, OptimConfig())
    fresh.load_state_dict(loaded_state["optimizer"])
    for a, b in zip(opt.state.values(), fresh.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_saving_again_replaces_atomically(tmp_path):
    model = make_model(0)
    save_checkpoint(tmp_path / "ckpt", model, {"step": 1}, {"step": 1})
    save_checkpoint(tmp_path / "ckpt", model, {"step": 2}, {"step": 2})
    assert read_meta(tmp_path / "ckpt")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old directories left


def test_failed_save_leaves_previous_checkpoint(tmp_path):
    model = make_model(0)
    save_checkpoint(tmp_path / "ckpt", model, {"step": 1}, {"step": 1})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "ckpt", model, {"step": 2}, {"step": object()})  # meta not JSON-able
    assert read_meta(tmp_path / "ckpt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_truncated_weights_are_a_clear_error(tmp_path):
    model = make_model(0)
    save_checkpoint(tmp_path / "ckpt", model, {"step": 1}, {"step": 1})
    weights = tmp_path / "ckpt" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupted: model.safetensors"):
        load_checkpoint(tmp_path / "ckpt", make_model(1))


def test_missing_pieces_and_wrong_shape(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path, make_model(0))
    save_checkpoint(tmp_path / "ckpt", make_model(0), {"step": 1}, {"step": 1})
    bigger = build_model(ModelConfig(n_layer=3, n_head=2, n_embd=16, n_positions=32), vocab_size=40, eos_token_id=39)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(tmp_path / "ckpt", bigger)
    (tmp_path / "ckpt" / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete: state.pt"):
        load_checkpoint(tmp_path / "ckpt", make_model(0))
