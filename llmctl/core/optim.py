"""The optimizer policy and learning-rate schedules, in one place next to the model.

Weight decay applies only to tensors of 2 or more dimensions (matrices and embeddings); biases and norm gains are
left alone, as in GPT-2 and nanoGPT. Schedules are plain functions of the step, so they can be tested against their
formulas and restored exactly on resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from llmctl.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (dim >= 2) and not decayed (dim < 2). Tied weights are listed once."""
    params = [p for p in model.parameters() if p.requires_grad]  # .parameters() already skips tied duplicates
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; `fused` on devices that have the kernel (one launch for all parameters)."""
    groups = param_groups(model, cfg.weight_decay)
    device = next(model.parameters()).device
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device.type in ("cuda", "cpu"),
    )


def lr_at(step: int, cfg: OptimConfig, total_steps: int, peak: float | None = None) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`.

    - warmup (every schedule): peak * step / warmup, so step 0 has lr 0 and step `warmup` the peak
    - constant: peak after warmup
    - linear: peak * (total - step) / (total - warmup), reaching 0 at `total_steps`
      (exactly transformers' get_linear_schedule_with_warmup)
    - cosine: min_lr + (peak - min_lr) * (1 + cos(pi * progress)) / 2, progress from 0 after warmup to 1 at the end
    """
    peak = cfg.lr if peak is None else peak
    warmup = cfg.warmup_steps
    if step < warmup:
        # Same as get_linear_schedule_with_warmup: step 0 has lr 0, step `warmup` reaches the peak.
        return peak * step / max(1, warmup)
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "linear":
        return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    min_lr = cfg.min_lr * peak / cfg.lr  # keep the floor proportional when a group has its own peak
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_at`, so its state (the step count) checkpoints and resumes like any scheduler."""
    factor: Callable[[int], float] = lambda step: lr_at(step, cfg, total_steps) / cfg.lr  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
