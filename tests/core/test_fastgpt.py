"""The lean GPT-2 forward is transformers' GPT-2, to the last bit where the kernels are the same."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmctl.config import ModelConfig
from llmctl.core.fastgpt import CausalLMObjective, ClassificationObjective, lean_gpt2_logits, supports_lean
from llmctl.core.model import build_model


@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh", "gelu_new", "relu"])
def test_lean_logits_and_gradients_match_transformers(activation):
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=2, n_head=4, n_embd=32, n_positions=64, activation=activation), 257, 256)
    x = torch.randint(0, 257, (3, 40))
    y = torch.randint(0, 257, (3, 40))
    ours = CausalLMObjective(model)
    assert ours.lean
    theirs = model(input_ids=x).logits
    torch.testing.assert_close(lean_gpt2_logits(model, x), theirs, rtol=0, atol=1e-6)
    ours(x, y).backward()
    lean_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()).backward()
    for a, b in zip(lean_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dropout_is_applied_in_training_only():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64, dropout=0.5), 257, 256)
    x = torch.randint(0, 257, (2, 16))
    model.train()
    assert not torch.equal(lean_gpt2_logits(model, x), lean_gpt2_logits(model, x))
    model.eval()
    torch.testing.assert_close(lean_gpt2_logits(model, x), model(input_ids=x).logits, rtol=0, atol=1e-6)


def test_sum_reduction_returns_loss_sum_count_and_correct():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64), 257, 256).eval()
    x, y = torch.randint(0, 257, (2, 8)), torch.randint(0, 257, (2, 8))
    stats = CausalLMObjective(model)(x, y, reduction="sum")
    assert stats[1].item() == 16 and stats[0].item() == pytest.approx(16 * CausalLMObjective(model)(x, y).item())
    clf = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64), 257, 256, pad_token_id=256,
                      labels=["a", "b"]).eval()
    stats = ClassificationObjective(clf)(x, torch.ones_like(x), torch.tensor([0, 1]), reduction="sum")
    assert stats[1].item() == 2 and 0 <= stats[2].item() <= 2


def test_other_models_keep_their_own_forward():
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64), 257, 256)
    model.config.scale_attn_by_inverse_layer_idx = True
    assert not supports_lean(model) and not CausalLMObjective(model).lean
    assert not CausalLMObjective(build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32), 257, 256), lean=False).lean
