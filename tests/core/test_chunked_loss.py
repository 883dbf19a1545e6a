"""The chunked head loss: the same loss and gradients as full logits with F.cross_entropy, for the objectives the
trainer uses (lean GPT-2, transformers' GPT-2 and Llama, LoRA-wrapped)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmctl.core import chunked_loss
from llmctl.core.chunked_loss import head_cross_entropy
from llmctl.core.fastgpt import CausalLMObjective, SFTObjective
from llmctl.core.model import load_model


@pytest.mark.parametrize("rows", [1, 5, 6, 17])
def test_loss_and_gradients_match_full_logits(monkeypatch, rows):
    monkeypatch.setattr(chunked_loss, "CHUNK_ROWS", 5)  # chunk boundaries inside and at the end
    monkeypatch.setattr(chunked_loss, "MIN_VOCAB", 0)
    torch.manual_seed(0)
    hidden = torch.randn(rows, 16, requires_grad=True)
    weight = (torch.randn(300, 16) * 0.3).requires_grad_()
    targets = torch.randint(0, 300, (rows,))
    targets[::3] = -100
    full = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
    expected = torch.autograd.grad(full * 0.7, (hidden, weight))
    loss = head_cross_entropy(hidden, weight, targets)
    got = torch.autograd.grad(loss * 0.7, (hidden, weight))
    assert torch.allclose(loss, full, rtol=1e-6, atol=1e-5)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss alone, no gradients made
        assert torch.allclose(head_cross_entropy(hidden, weight, targets), full, rtol=1e-6, atol=1e-5)


def test_bf16_autocast_runs_the_products_in_bf16(monkeypatch):
    monkeypatch.setattr(chunked_loss, "CHUNK_ROWS", 4)
    monkeypatch.setattr(chunked_loss, "MIN_VOCAB", 0)
    torch.manual_seed(0)
    hidden = torch.randn(10, 32, requires_grad=True)
    weight = torch.randn(200, 32, requires_grad=True)
    targets = torch.randint(0, 200, (10,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
        loss = head_cross_entropy(hidden, weight, targets)
    assert loss.dtype == torch.float32 and torch.allclose(loss, full, rtol=1e-2)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def _grads(objective, *args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    objective.model.zero_grad()
    loss = objective(*args)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in objective.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which", ["gpt2-lean", "gpt2-hf", "llama", "gpt2-lora"])
def test_objectives_give_the_same_loss_and_gradients_chunked(which, tiny_model_dir, tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(chunked_loss, "CHUNK_ROWS", 7)
    monkeypatch.setattr(chunked_loss, "MIN_VOCAB", 0)
    torch.manual_seed(0)
    model = load_model(tiny_llama_dir if which == "llama" else tiny_model_dir).train()
    if which == "gpt2-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
        for name, p in model.named_parameters():  # B is zero at first: give the adapter a term
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    for module in model.modules():  # no dropout: the two runs must see the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids = torch.randint(0, 250, (3, 12))
    targets = torch.randint(0, 250, (3, 12))
    lean = which != "gpt2-hf"
    chunked = CausalLMObjective(model, lean=lean)
    assert chunked.chunked and chunked.lean == (which in ("gpt2-lean", "gpt2-lora"))
    loss, grads = _grads(chunked, ids, targets)
    ref_loss, ref_grads = _grads(CausalLMObjective(model, lean=lean, chunked=False), ids, targets)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-6), name

    sft_targets = targets.clone()
    sft_targets[:, :5] = -100  # prompt tokens: no loss
    positions = torch.cat([torch.arange(6), torch.arange(6)]).repeat(3, 1)  # two packed examples a row
    loss, grads = _grads(SFTObjective(model, lean=lean), ids, sft_targets, positions)
    ref_loss, ref_grads = _grads(SFTObjective(model, lean=lean, chunked=False), ids, sft_targets, positions)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-6), name


@pytest.mark.parametrize("which", ["gpt2-lean", "gpt2-hf", "llama"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(which, tiny_model_dir, tiny_llama_dir):
    """Recomputing each block in the backward pass changes nothing, dropout included (its masks are replayed)."""
    from llmctl.core.fastgpt import enable_checkpointing

    torch.manual_seed(0)
    model = load_model(tiny_llama_dir if which == "llama" else tiny_model_dir).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.2
    if which != "llama":
        model.config.resid_pdrop = model.config.attn_pdrop = 0.2  # the lean pass reads the rates from the config
    ids = torch.randint(0, 250, (2, 10))
    targets = torch.randint(0, 250, (2, 10))
    plain = CausalLMObjective(model, lean=which == "gpt2-lean")
    torch.manual_seed(1)
    loss, grads = _grads(plain, ids, targets)
    recomputed = CausalLMObjective(model, lean=which == "gpt2-lean")
    enable_checkpointing(recomputed)
    torch.manual_seed(1)
    again, again_grads = _grads(recomputed, ids, targets)
    assert torch.allclose(loss, again, atol=1e-6)
    for name in grads:
        assert torch.allclose(grads[name], again_grads[name], atol=1e-6), name
