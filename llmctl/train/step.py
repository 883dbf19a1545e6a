"""One optimizer step and one evaluation, and what can stop them: signals, out-of-memory, processes that must
agree."""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Any

import torch

from llmctl.config import Config
from llmctl.core.device import (
    Dist,
)
from llmctl.train.model import unwrap

log = logging.getLogger(__name__)


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and stops. A second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            log.warning("%s: finishing this step, then saving a checkpoint", signal.Signals(signum).name)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("out of memory", "not enough memory", "can't allocate", "cannot allocate")
    )


def divergence_advice(optim, lr: float) -> str:
    """What to change when the loss or gradient became NaN/inf, pointing at the setting most likely to blame."""
    decay = max(lr, optim.muon_lr if optim.name == "muon" else 0.0) * optim.weight_decay
    if decay >= 0.01:  # each step shrinks the weights by this fraction: past a few percent they collapse
        return (f"optim.weight_decay {optim.weight_decay:g} is too strong for this learning rate (each step scales "
                f"the weights by 1 - {decay:.3g}); lower optim.weight_decay (typical: 0 to 0.1)")
    if optim.eps < 1e-10:
        return f"optim.eps {optim.eps:g} is too small to keep the update finite; raise it (typical: 1e-8)"
    advice = "lower optim.lr or raise optim.warmup_steps"
    if optim.grad_clip == 0:
        advice += ", or turn gradient clipping on (optim.grad_clip: 1.0)"
    return advice[0].upper() + advice[1:]


def oom_message(cfg: Config, context: int) -> str:
    t = cfg.train
    return (
        f"out of memory with train.batch_size {t.batch_size} x {context} tokens; lower train.batch_size and raise "
        f"train.grad_accum by the same factor (same batch, less memory), or use a smaller model"
    )


def train_step(
    model: torch.nn.Module,
    optimizer,
    scaler,
    micro_batches: list[tuple[dict[str, torch.Tensor], float]],
    autocast,
    grad_clip: float,
    sync_context,
    params: list[torch.nn.Parameter] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over the micro-batches (each weighted by its share of this process's batch), then
    unscale and clip: returns (loss, grad norm) before the optimizer step, so a non-finite one can stop the run
    before it touches the weights."""
    from llmctl.core.optim import optimizers_of

    total = torch.zeros((), device=micro_batches[0][0]["input_ids"].device)
    for i, (inputs, weight) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with sync_context(model, last):
            with autocast():
                loss = model(**inputs)
            scaled = loss * weight
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach() * weight
    if scaler is not None:
        for opt in optimizers_of(optimizer):
            scaler.unscale_(opt)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: a sharded DTensor
        norm = norm.full_tensor()
    return total, norm


def sync_context(fsdp: bool, ddp: bool):
    """Gradient all-reduce only after the last micro-batch of a step."""

    @contextlib.contextmanager
    def context(model, last: bool):
        if ddp and not last:
            with model.no_sync():
                yield
        elif fsdp:
            inner = unwrap(model)
            inner.set_requires_gradient_sync(last)
            yield
        else:
            yield

    return context


def optimizer_step(optimizer, scaler) -> None:
    from llmctl.core.optim import optimizers_of

    if scaler is not None:
        for opt in optimizers_of(optimizer):
            scaler.step(opt)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def estimate_loss(model, data, specs: list[dict], device, autocast, dist: Dist, shard: bool) -> dict[str, float]:
    """Mean loss (and accuracy, for classification) over the evaluation batches `specs`, shared between
    processes when `shard` (each scores every world_size-th batch; the sums are all-reduced)."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    mine = specs[dist.rank :: dist.world_size] if shard else specs
    for spec in mine:
        with autocast():
            stats += model(**data.load_eval(spec, device), reduction="sum").double()
    if shard and dist.enabled:
        import torch.distributed as td

        td.all_reduce(stats)
    model.train(was_training)
    loss_sum, count, correct = stats.tolist()
    if count == 0:
        return {}
    out = {"val_loss": loss_sum / count}
    if getattr(data, "reports_accuracy", False):
        out["val_accuracy"] = correct / count
    return out


def barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        td.barrier()


def all_reduce(values: list[float], dist: Dist, op: str = "max") -> list[float]:
    if not dist.enabled:
        return values
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64)
    if td.get_backend() == "nccl":
        t = t.cuda()
    td.all_reduce(t, op=td.ReduceOp.MAX if op == "max" else td.ReduceOp.SUM)
    return t.cpu().tolist()
