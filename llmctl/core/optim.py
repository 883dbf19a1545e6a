"""The optimizer policy and learning-rate schedules, in one place next to the model.

Weight decay applies only to tensors of 2 or more dimensions (matrices and embeddings); biases and norm gains are
left alone, as in GPT-2 and nanoGPT. Schedules are plain functions of the step, so they can be tested against their
formulas and restored exactly on resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from llmctl.config import OptimConfig


def param_groups(params: torch.nn.Module | Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Two AdamW groups over a model's (or a list's) parameters: decayed (dim >= 2) and not decayed (dim < 2).
    Tied weights are listed once."""
    if isinstance(params, torch.nn.Module):
        params = params.parameters()  # .parameters() already skips tied duplicates
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer | Optimizers:
    """AdamW over `param_groups` (`name: adamw`), or Muon on the hidden matrices with AdamW for everything else
    (`name: muon`). Every parameter group carries its peak learning rate as `peak_lr`, which the schedule scales."""
    if cfg.name == "muon":
        hidden, rest = split_hidden_matrices(model)
        # transformers' Conv1D (GPT-2) stores weights as (in, out), nn.Linear as (out, in): Muon's shape-dependent
        # learning-rate scale must know which is which.
        conv1d = {id(m.weight) for m in model.modules() if type(m).__name__ == "Conv1D"}
        muon_groups = [
            {"params": [p for p in hidden if id(p) not in conv1d], "peak_lr": cfg.muon_lr, "in_out": False},
            {"params": [p for p in hidden if id(p) in conv1d], "peak_lr": cfg.muon_lr, "in_out": True},
        ]
        muon_groups = [g for g in muon_groups if g["params"]]
        groups = [g for g in param_groups(rest, cfg.weight_decay) if g["params"]]
        # Either side may be empty: LoRA adapters are all 2-D matrices, a frozen model may train only its head.
        muon = [Muon(
            muon_groups,
            lr=cfg.muon_lr,
            # Muon's decay is multiplied by its own (20x larger) rate: scale it so each step shrinks the hidden
            # matrices as much as AdamW's decay shrinks the rest.
            weight_decay=cfg.weight_decay * cfg.lr / cfg.muon_lr,
            adjust_lr_fn="original",
        )] if muon_groups else []
        return Optimizers(muon + ([_adamw(groups, cfg)] if groups else []))
    return _adamw(param_groups(model, cfg.weight_decay), cfg)


def _adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    """`fused` on devices that have the kernel: one launch for all parameters."""
    device = next(p.device for g in groups for p in g["params"])
    for group in groups:
        group["peak_lr"] = cfg.lr
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type in ("cuda", "cpu"))


# Parameters Muon must not see even when they are 2-D: embeddings and output heads (their rows are tokens or
# classes, not a linear map between hidden states).
_NOT_HIDDEN = ("wte", "wpe", "embed", "lm_head", "score", "classifier")


def split_hidden_matrices(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(hidden 2-D weight matrices, everything else): Muon takes the first list, AdamW the second."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    hidden, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_hidden = p.dim() == 2 and id(p) not in embeddings and not any(k in name for k in _NOT_HIDDEN)
        (hidden if is_hidden else rest).append(p)
    return hidden, rest


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same hyperparameters, same state), stepped faster:

    - the Newton-Schulz iteration runs batched over all matrices of one shape (one bmm per iteration instead of
      one matmul per layer: about 2x faster on small models, where per-call overhead dominates);
    - in bf16 only where bf16 matmuls are fast (GPUs, CPUs with AMX), in fp32 elsewhere: torch's own always uses
      bf16, which crawls on CPUs without native bf16;
    - a group with `in_out: True` holds (in, out) matrices (transformers' Conv1D), so the shape-dependent learning
      rate scale sqrt(max(1, fan_out / fan_in)) reads the shape the right way round.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                by_shape.setdefault((min(p.shape), max(p.shape)), []).append((p, update))
            for pairs in by_shape.values():
                wide = torch.stack([u if u.shape[0] <= u.shape[1] else u.T for _, u in pairs])  # (N, small, big)
                ortho = newton_schulz(wide, group["ns_coefficients"], group["ns_steps"], group["eps"])
                for (p, u), o in zip(pairs, ortho):
                    o = o if u.shape[0] <= u.shape[1] else o.T
                    fan_out, fan_in = (p.shape[1], p.shape[0]) if group.get("in_out") else (p.shape[0], p.shape[1])
                    p.mul_(1 - lr * wd)
                    p.add_(o.to(p.dtype), alpha=-lr * math.sqrt(max(1.0, fan_out / fan_in)))
        return loss


def newton_schulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """Approximately orthogonalise `grad`, a matrix or a batch of matrices (..., rows, cols) with rows <= cols
    (the quintic iteration of Keller Jordan's Muon)."""
    from llmctl.core.device import cpu_has_fast_bf16

    fast_bf16 = grad.device.type == "cuda" or (grad.device.type == "cpu" and cpu_has_fast_bf16())
    a, b, c = coefficients
    x = grad.to(torch.bfloat16 if fast_bf16 else torch.float32)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    addmm = torch.baddbmm if x.dim() == 3 else torch.addmm
    for _ in range(steps):
        gram = x @ x.mT
        update = addmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram
        x = addmm(x, update, x, beta=a)  # a * x + update @ x
    return x.mT if transposed else x


class Optimizers:
    """Several optimizers stepped as one (Muon + AdamW), with one state dict."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for opt, sub in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(sub)


def optimizers_of(optimizer: torch.optim.Optimizer | Optimizers) -> list[torch.optim.Optimizer]:
    """The plain torch optimizers inside `optimizer` (a GradScaler steps each one)."""
    return optimizer.optimizers if isinstance(optimizer, Optimizers) else [optimizer]


def set_lr(optimizer: torch.optim.Optimizer | Optimizers, step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Set every group's learning rate for optimizer step `step`; returns the AdamW (peak `cfg.lr`) group's rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg, total_steps, peak=group.get("peak_lr", cfg.lr))
    return lr_at(step, cfg, total_steps)


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
    """A LambdaLR following `lr_at`, for library users who drive a torch scheduler. llmctl's own loop sets the rate
    from the step with `set_lr` instead, which needs no scheduler state to resume."""
    factor: Callable[[int], float] = lambda step: lr_at(step, cfg, total_steps) / cfg.lr  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
