"""Muon + AdamW: who gets which parameters, the step against torch.optim.Muon, one state dict for both."""

from __future__ import annotations

import torch

from llmctl.config import ModelConfig, OptimConfig
from llmctl.core.model import build_model
from llmctl.core.optim import Muon, Optimizers, build_optimizer, newton_schulz, set_lr, split_hidden_matrices


def tiny():
    torch.manual_seed(0)
    return build_model(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64), 257, 256)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny()
    hidden, rest = split_hidden_matrices(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)].split(".", 3)[-1] for p in hidden) == sorted(
        ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"] * 2
    )
    assert {names[id(p)] for p in rest if p.dim() == 2} == {"transformer.wte.weight", "transformer.wpe.weight"}
    opt = build_optimizer(model, OptimConfig(name="muon", lr=2e-3, muon_lr=0.03))
    assert isinstance(opt, Optimizers) and isinstance(opt.optimizers[0], Muon)
    assert {g["peak_lr"] for g in opt.param_groups} == {0.03, 2e-3}
    set_lr(opt, 0, OptimConfig(name="muon", lr=2e-3, muon_lr=0.03, warmup_steps=10), 100)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)


def test_newton_schulz_orthogonalises_batched_like_one_by_one():
    g = torch.randn(3, 16, 48)
    batched = newton_schulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    single = torch.stack([newton_schulz(m, (3.4445, -4.7750, 2.0315), 5, 1e-7).float() for m in g])
    torch.testing.assert_close(batched, single, rtol=2e-2, atol=2e-2)
    singular_values = torch.linalg.svdvals(batched[0])
    assert singular_values.min() > 0.5 and singular_values.max() < 1.5  # Muon's "roughly orthogonal"


def test_step_matches_torch_muon_for_linear_layout():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in ((24, 8), (8, 24), (16, 16))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, ref):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    Muon(ours, lr=0.02, weight_decay=0.01).step()
    torch.optim.Muon(ref, lr=0.02, weight_decay=0.01).step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)  # bf16 or fp32 Newton-Schulz: close, not equal


def test_combined_state_dict_round_trips():
    model = tiny()
    opt = build_optimizer(model, OptimConfig(name="muon"))
    x = torch.randint(0, 257, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    state = opt.state_dict()
    other = build_optimizer(tiny(), OptimConfig(name="muon"))
    other.load_state_dict(state)
    assert len(other.state_dict()["optimizers"]) == 2
    buffers = [s["momentum_buffer"] for s in other.optimizers[0].state.values()]
    assert buffers and all(b.abs().sum() > 0 for b in buffers)
