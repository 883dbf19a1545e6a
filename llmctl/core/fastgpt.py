"""What the trainer calls: a model wrapped with its loss, and a lean forward pass for GPT-2.

`CausalLMObjective(model)(input_ids, targets)` returns the next-token loss; `ClassificationObjective` the
sequence-classification loss. With `reduction="sum"` both return `[loss_sum, count, correct]` for evaluation.

For a transformers `GPT2LMHeadModel` the causal objective runs its own forward pass over the model's parameters:
the same function and the same weights (so the model still saves and loads as a plain Hugging Face GPT-2), but
without transformers' per-layer bookkeeping (mask construction, output dataclasses, cache plumbing, label shifting
with copies), which costs 20-40% of a training step on small models. Any other model runs its own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from llmctl.core import packing
from llmctl.core.chunked_loss import head_cross_entropy

# transformers' activation names with a faster torch kernel for the same function.
_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def supports_lean(model: nn.Module) -> bool:
    """True for a GPT-2 LM whose configuration the lean forward reproduces exactly (LoRA adapters on its
    projections included)."""
    model = _unpeft(model)
    config = getattr(model, "config", None)
    return (
        type(model).__name__ == "GPT2LMHeadModel"
        and _adapters_lean_can_run(model)
        and config is not None
        and config.activation_function in _ACTIVATIONS
        and getattr(config, "scale_attn_weights", True)
        and not getattr(config, "scale_attn_by_inverse_layer_idx", False)
        and not getattr(config, "reorder_and_upcast_attn", False)
        and not getattr(config, "add_cross_attention", False)
    )


# Layers the lean forward calls as modules, so that a peft LoRA layer there adds its adapter's term.
_LEAN_ADAPTABLE = ("c_attn", "c_proj", "c_fc", "lm_head")


def _unpeft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (its LoRA layers injected in place), else `model` itself."""
    if type(model).__module__.startswith("peft"):
        return model.get_base_model()
    return model


def _adapters_lean_can_run(model: nn.Module) -> bool:
    """peft layers only where the lean forward calls the layer itself: anywhere else it reads weights directly
    and would skip the adapter."""
    for name, module in model.named_modules():
        if type(module).__name__ == "ModulesToSaveWrapper":
            return False
        if hasattr(module, "base_layer") and name.rsplit(".", 1)[-1] not in _LEAN_ADAPTABLE:
            return False
    return True


def _project(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """(N, in) -> (N, out) through a transformers Conv1D (x @ W + b, W stored as (in, out)), or a peft LoRA layer
    around one (which adds its adapter's term, with its own dropout and scaling)."""
    if hasattr(layer, "base_layer"):
        return layer(h)
    return torch.addmm(layer.bias, h, layer.weight)


def lean_gpt2_logits(model: nn.Module, idx: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    """GPT-2's forward pass (no cache, no padding) from a transformers GPT2LMHeadModel's own parameters."""
    model = _unpeft(model)
    return model.lm_head(lean_gpt2_hidden(model, idx, checkpoint=checkpoint))  # (B, T, V)


def lean_gpt2_hidden(model: nn.Module, idx: torch.Tensor, position_ids: torch.Tensor | None = None,
                     checkpoint: bool = False) -> torch.Tensor:
    """The final hidden states (B, T, C) of GPT-2's forward pass. With `position_ids` (B, T) restarting at 0 where
    each packed example starts, every example attends within itself only (llmctl.core.packing). With `checkpoint`
    (training), each block keeps only its input and recomputes the rest in the backward pass (the same dropout
    masks: torch's checkpoint replays the random state)."""
    model = _unpeft(model)
    config = model.config
    t = model.transformer
    B, T = idx.shape
    pos = t.wpe.weight[:T] if position_ids is None else t.wpe(position_ids)  # (T, C) or (B, T, C)
    examples = None if position_ids is None else packing.segments(position_ids)
    x = t.wte(idx) + pos  # (B, T, C)
    x = F.dropout(x, config.embd_pdrop, model.training)
    recompute = checkpoint and model.training and torch.is_grad_enabled()
    for block in t.h:
        if recompute:
            x = torch.utils.checkpoint.checkpoint(_lean_block, block, x, config, examples, model.training,
                                                  use_reentrant=False)
        else:
            x = _lean_block(block, x, config, examples, model.training)
    return F.layer_norm(x, (config.n_embd,), t.ln_f.weight, t.ln_f.bias, config.layer_norm_epsilon)


def _lean_block(block: nn.Module, x: torch.Tensor, config, examples, train: bool) -> torch.Tensor:
    """One GPT-2 block on x (B, T, C)."""
    B, T, C = x.shape
    nh, eps = config.n_head, config.layer_norm_epsilon
    act = _ACTIVATIONS[config.activation_function]
    attn, mlp = block.attn, block.mlp
    h = F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias, eps).view(B * T, C)
    qkv = _project(attn.c_attn, h)  # (B*T, 3C)
    q, k, v = qkv.view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
    dropout = config.attn_pdrop if train else 0.0
    if examples is None:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True).transpose(1, 2)
    else:
        y = packing.attend(q, k, v, examples, dropout=dropout)  # (B, T, nh, hs)
    y = y.reshape(B * T, C)  # (B*T, C)
    x = x + F.dropout(_project(attn.c_proj, y), config.resid_pdrop, train).view(B, T, C)
    h = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias, eps).view(B * T, C)
    h = act(_project(mlp.c_fc, h))  # (B*T, 4C)
    return x + F.dropout(_project(mlp.c_proj, h), config.resid_pdrop, train).view(B, T, C)


def plain_head(model: nn.Module) -> torch.Tensor | None:
    """The output projection's weight (V, C) of a causal LM whose logits are exactly hidden @ weight.T (a head of
    one of `_PLAIN_HEAD_TYPES`: an nn.Linear without bias and without an adapter), else None."""
    inner = _unpeft(model)
    if getattr(getattr(inner, "config", None), "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return head.weight if type(head) is nn.Linear and head.bias is None else None


def enable_checkpointing(objective: nn.Module) -> None:
    """Activation checkpointing for an objective's model: per block in the lean GPT-2 pass, through transformers'
    own gradient checkpointing (non-reentrant) for any other model."""
    objective.checkpoint = True
    if not getattr(objective, "lean", False):
        model = _unpeft(objective.model)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class CausalLMObjective(nn.Module):
    """Next-token loss of a causal LM on (input_ids, targets), both (B, T), targets already shifted by one.

    Where the head is a plain projection (`plain_head`) and `chunked`, the loss goes through it in chunks of rows
    (`head_cross_entropy`): the full (B, T, V) logits are never made. FSDP passes chunked=False (its parameters are
    gathered per module call, which a loss that keeps the head's gradient from its forward would bypass)."""

    def __init__(self, model: nn.Module, lean: bool = True, chunked: bool = True):
        super().__init__()
        self.model = model
        self.lean = lean and supports_lean(model)
        self.chunked = chunked and plain_head(model) is not None
        self.checkpoint = False  # recompute block activations in the backward pass (`enable_checkpointing`)
        self._inner = [_unpeft(model)]  # a list: not registered twice as a submodule

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.chunked:
            hidden = _hidden(self, self._inner[0], input_ids, None)  # (B, T, C)
            flat = targets.flatten()
            loss = head_cross_entropy(hidden.flatten(0, 1), plain_head(self.model), flat)
            if reduction == "mean":
                return loss / (flat != -100).sum().clamp(min=1)
        else:
            if self.lean:
                logits = lean_gpt2_logits(self.model, input_ids, self.checkpoint)
            else:
                logits = self.model(input_ids=input_ids, use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)
        if reduction == "sum":
            count = torch.tensor(float(targets.numel()), device=loss.device)
            return torch.stack([loss.detach(), count, torch.zeros_like(count)])
        return loss


class ClassificationObjective(nn.Module):
    """Cross-entropy of a sequence classifier on padded (input_ids, attention_mask) and labels (B,)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, L)
        loss = F.cross_entropy(logits.float(), labels, reduction=reduction)
        if reduction == "sum":
            correct = (logits.argmax(-1) == labels).sum().float()
            count = torch.tensor(float(labels.numel()), device=loss.device)
            return torch.stack([loss.detach(), count, correct])
        return loss


# Causal LMs whose forward is `lm_head(backbone(...))` and nothing more (no logit soft-capping or scaling), so the
# head may run on the answer positions alone. Prompt tokens need no logits: with a 50k vocabulary the head is about
# a third of a GPT-2 124M's forward, and SFT prompts are often half the tokens.
_PLAIN_HEAD_TYPES = {"gpt2", "llama", "mistral", "qwen2", "qwen3"}


class SFTObjective(nn.Module):
    """Answer-only next-token loss of a causal LM on rows that may pack several examples.

    `input_ids`, `targets` (B, T), targets -100 where no loss is taken (prompts, padding, the joins between packed
    examples); `position_ids` (B, T) restart at 0 for each packed example, and attention stays within an example
    (llmctl.core.packing, for the lean GPT-2 pass and, through transformers' attention interface, for any model).
    Without `position_ids` every row is one example, padded on the right. Returns the mean loss over the target
    tokens, or with `reduction="sum"` `[loss_sum, targets, 0]`.
    """

    def __init__(self, model: nn.Module, lean: bool = True, chunked: bool = True):
        super().__init__()
        self.model = model
        self.lean = lean and supports_lean(model)
        self.chunked = chunked and plain_head(model) is not None
        self.checkpoint = False  # recompute block activations in the backward pass (`enable_checkpointing`)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's own model
        self._split = getattr(inner.config, "model_type", None) in _PLAIN_HEAD_TYPES
        self._inner = [inner]  # a list: not registered twice as a submodule

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        picked = targets != -100  # (B, T)
        wanted = targets[picked]  # (N,)
        inner = self._inner[0]
        if self.lean or self._split:  # the head on the answer positions alone
            hidden = _hidden(self, inner, input_ids, position_ids)[picked]  # (N, C)
            if self.chunked:
                loss = head_cross_entropy(hidden, plain_head(self.model), wanted)
            else:
                loss = F.cross_entropy(inner.get_output_embeddings()(hidden).float(), wanted, reduction="sum")
        else:
            with packing.attention_for(inner, packed=position_ids is not None):
                logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            loss = F.cross_entropy(logits[picked].float(), wanted, reduction="sum")
        count = wanted.numel()
        if reduction == "sum":
            n = torch.tensor(float(count), device=loss.device)
            return torch.stack([loss.detach(), n, torch.zeros_like(n)])
        return loss / max(count, 1)


def _hidden(objective: nn.Module, inner: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None
            ) -> torch.Tensor:
    """The final hidden states (B, T, C) of an objective's model: the lean GPT-2 pass (with the objective's
    activation checkpointing), else the backbone of `inner` (the transformers model, adapters in place), with packed
    attention where `position_ids` are given."""
    if objective.lean:
        return lean_gpt2_hidden(objective.model, input_ids, position_ids, objective.checkpoint)
    with packing.attention_for(inner, packed=position_ids is not None):
        return inner.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
