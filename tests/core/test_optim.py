"""Optimizer policy and LR schedules: values at chosen steps against their formulas and against transformers."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.config import ModelConfig, OptimConfig
from llmctl.core.model import build_model
from llmctl.core.optim import build_optimizer, build_scheduler, lr_at, param_groups


@pytest.fixture()
def tiny_gpt():
    return build_model(ModelConfig(n_layer=2, n_head=2, n_embd=16, n_positions=32), vocab_size=50, eos_token_id=49)


def test_weight_decay_only_on_matrices(tiny_gpt):
    decay, no_decay = param_groups(tiny_gpt, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["params"] and all(p.dim() < 2 for p in no_decay["params"])
    names = {id(p): n for n, p in tiny_gpt.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "transformer.wte.weight" in decayed and "transformer.h.0.attn.c_attn.weight" in decayed
    assert "transformer.h.0.ln_1.weight" not in decayed and "transformer.h.0.attn.c_attn.bias" not in decayed
    # Every trainable parameter is in exactly one group; the tied lm_head is not counted twice.
    grouped = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(tiny_gpt.parameters()))


def test_optimizer_uses_the_groups(tiny_gpt):
    opt = build_optimizer(tiny_gpt, OptimConfig(lr=3e-3, weight_decay=0.05, beta1=0.8, beta2=0.95))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[0]["betas"] == (0.8, 0.95) and opt.param_groups[0]["lr"] == 3e-3


@pytest.mark.parametrize("step", [0, 1, 5, 9, 10, 11, 50, 99, 100, 120])
def test_linear_schedule_matches_transformers(tiny_gpt, step):
    from transformers import get_linear_schedule_with_warmup

    cfg = OptimConfig(lr=1e-3, schedule="linear", warmup_steps=10)
    opt = torch.optim.AdamW(tiny_gpt.parameters(), lr=cfg.lr)
    reference = get_linear_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=100)
    expected = cfg.lr * reference.lr_lambdas[0](step)
    assert lr_at(step, cfg, total_steps=100) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("step, expected", [(0, 0.0), (5, 0.5e-3), (10, 1e-3), (55, None), (100, 1e-4), (150, 1e-4)])
def test_cosine_schedule_formula(step, expected):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, schedule="cosine", warmup_steps=10)
    if expected is None:  # halfway through the decay: the midpoint of peak and floor
        expected = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_at(step, cfg, total_steps=100) == pytest.approx(expected, abs=1e-12)


def test_constant_schedule_after_warmup():
    cfg = OptimConfig(lr=2e-3, schedule="constant", warmup_steps=4)
    assert [lr_at(s, cfg, 100) for s in (0, 2, 4, 50, 99)] == pytest.approx([0, 1e-3, 2e-3, 2e-3, 2e-3])


def test_scheduler_drives_the_optimizer(tiny_gpt):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, schedule="cosine", warmup_steps=3)
    opt = build_optimizer(tiny_gpt, cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, cfg, 20) for s in range(20)])
