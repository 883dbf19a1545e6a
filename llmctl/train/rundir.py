"""The run directory: what run it holds (identity), whether to start, resume or refuse, one trainer at a time,
metrics.jsonl, loss.png, checkpoints and the exported Hugging Face model."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmctl import __version__
from llmctl.config import Config
from llmctl.core import checkpoint as ckpt
from llmctl.core import lora
from llmctl.core.device import (
    Dist,
    rng_state,
    set_rng_state,
)
from llmctl.core.faults import reading, writing
from llmctl.core.files import atomic_write_text, check_writable_parent
from llmctl.errors import CheckpointError, Interrupted, OutputError, TrainingError, first_line
from llmctl.train.step import barrier

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".lock"

# Settings that do not change the weights a run produces: a checkpoint may be resumed with other values.
_FREE_TRAIN_KEYS = {"resume", "keep_checkpoints", "log_interval", "eval_interval", "eval_batches",
                    "checkpoint_interval", "compile", "max_time", "loggers"}


def run_identity(cfg: Config) -> dict[str, Any]:
    """The settings that determine the weights a run produces; checkpoints record them (and their hash)."""
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _FREE_TRAIN_KEYS}
    identity = {"seed": cfg.run.seed, "model": dataclasses.asdict(cfg.model), "optim": dataclasses.asdict(cfg.optim),
                "train": train}
    if cfg.train.task == "sft":
        identity["sft"] = dataclasses.asdict(cfg.sft)
    if cfg.lora.enabled:  # absent otherwise, so runs without LoRA keep their identity
        identity["lora"] = {k: v for k, v in dataclasses.asdict(cfg.lora).items() if k != "save"}
    return identity


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def read_run_file(out_dir: Path) -> dict | None:
    path = out_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_run_file(out_dir: Path, status: dict[str, Any]) -> None:
    atomic_write_text(out_dir / RUN_FILE, json.dumps(status, indent=2) + "\n")


def mark_stopped(out_dir: Path, exc: BaseException, step: int) -> None:
    """Record in run.json why the run stopped (`interrupted` or `failed`, with the error's first line), so that the
    next `train` in the same place knows it is not running and what to do with it."""
    status = read_run_file(out_dir)
    if status is None or status.get("status") not in ("running", "interrupted"):
        return
    interrupted = isinstance(exc, (Interrupted, KeyboardInterrupt)) or type(exc).__name__ == "Terminated"
    status.update(status="interrupted" if interrupted else "failed", step=step)
    if not interrupted:
        status["error"] = first_line(exc)
    with contextlib.suppress(Exception):  # the disk may be what failed: the original error matters more
        write_run_file(out_dir, status)


def decide_start(
    out_dir: Path, cfg: Config, identity: dict, config_hash: str, data_hash: str, force: bool
) -> Path | None:
    """The checkpoint to resume from, None to start fresh, or a one-line refusal (nothing is touched)."""
    resume = cfg.train.resume
    existing = read_run_file(out_dir)
    latest = ckpt.latest_checkpoint(out_dir / CHECKPOINTS)
    if latest is None and existing is not None and existing.get("status") != "finished":
        # Stopped (killed, interrupted, failed) before its first checkpoint: nothing to continue and nothing worth
        # keeping, so train and train --resume both start it again instead of sending the user round in a circle.
        log.info("run.out_dir %s holds a run that stopped (%s) before its first checkpoint; starting it again",
                 out_dir, existing.get("status", "unknown"))
        return None
    if resume is True and latest is None:
        raise CheckpointError(f"no checkpoint in {out_dir / CHECKPOINTS} to resume from; train without --resume")
    if resume and latest is not None:
        meta = ckpt.read_meta(latest)
        problems = []
        if meta.get("config_sha256") != config_hash:
            changed = _differences(meta.get("identity", {}), identity)
            problems.append("the config changed (" + ("; ".join(changed[:4]) or "unknown settings") + ")")
        if meta.get("data_sha256") != data_hash:
            problems.append("the training data changed")
        if problems and not force:
            raise CheckpointError(
                f"cannot resume from {latest}: {' and '.join(problems)}; pass --force to resume anyway or set "
                f"run.out_dir to start a new run"
            )
        if problems:
            log.warning("resuming from %s although %s (--force)", latest, " and ".join(problems))
        return latest
    if force or not out_dir.exists() or not any(p.name != LOCK_FILE for p in out_dir.iterdir()):
        return None
    if existing is not None:
        same = existing.get("config_sha256") == config_hash and existing.get("data_sha256") == data_hash
        status = existing.get("status", "unknown")
        if status == "failed":
            # A diverged (or otherwise failed) run is started over with the new settings; its checkpoints remain
            # reachable only through --resume --force, as its error message said.
            log.warning("run.out_dir %s holds a run that failed at step %s (%s); starting over", out_dir,
                        existing.get("step", "?"), existing.get("error", "no reason recorded"))
            return None
        what = "this run" if same else "a different run"
        raise TrainingError(
            f"run.out_dir {out_dir} already holds {what} ({status} at step {existing.get('step', '?')}); pass "
            f"--resume to continue it, --force to overwrite it, or set run.out_dir"
        )
    raise TrainingError(
        f"run.out_dir {out_dir} is not empty and holds no llmctl run; set run.out_dir to a new directory or pass "
        f"--force to write into it"
    )


@contextlib.contextmanager
def run_lock(out_dir: Path, enabled: bool) -> Iterator[None]:
    """One trainer per run directory: a second one (say, cron starting before the last run ended) is refused."""
    if not enabled:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"run.out_dir: {out_dir} is a file, not a directory")
    check_writable_parent(out_dir)
    with writing(out_dir, what="run.out_dir: cannot write"):
        out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise TrainingError(f"another llmctl train (pid {holder}) is running in {out_dir}") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, flushed at once (tail -f works; a kill loses nothing). The
    same records go to the trackers named in train.loggers (llmctl.core.trackers)."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None, loggers: list[str] = (),
                 config: dict[str, Any] | None = None):
        self.path = path
        self.enabled = enabled
        self.trackers = None
        if not enabled:
            return
        logged_until = 0
        if keep_until is None:
            atomic_write_text(path, "")
        else:  # resuming: drop the lines of steps that will be redone
            old = read_jsonl(path)
            logged_until = max((line.get("step", 0) for line in old), default=0)
            kept = [line for line in old if line.get("step", 0) <= keep_until]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        if any(name not in ("jsonl", "png") for name in loggers):
            from llmctl.core.trackers import Trackers

            self.trackers = Trackers(list(loggers), path.parent, config or {}, keep_until, logged_until)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with writing(self.path, hint="; the checkpoints are intact"), open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.trackers is not None:
                self.trackers.log(record)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None


def read_jsonl(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a line that is not a JSON object (junk bytes, a line cut by a kill) is skipped:
    the file is a log, and a damaged line must not stop a resume."""
    if not path.is_file():
        return []
    out = []
    with reading(path, TrainingError):
        text = path.read_bytes().decode("utf-8", errors="replace")
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                out.append(record)
    return out


@dataclass
class Run:
    """Everything the checkpoint and export helpers need to know about the run in progress."""

    cfg: Config
    dist: Dist
    device: torch.device
    out_dir: Path
    ckpt_dir: Path
    hf_model: torch.nn.Module
    objective: torch.nn.Module
    optimizer: Any
    scaler: Any
    tokenizer: Any
    identity: dict
    config_hash: str
    data_hash: str
    total_steps: int | None
    fsdp: bool
    counters: dict[str, Any]


def _model_state(model: torch.nn.Module, fsdp: bool) -> dict[str, torch.Tensor] | torch.nn.Module:
    """What to save: the module itself, or under FSDP its full state dict gathered on rank 0's CPU."""
    if not fsdp:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _optimizer_state(model, optimizer, fsdp: bool) -> dict:
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from llmctl.core.optim import optimizers_of

    opts = optimizers_of(optimizer)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"optimizers": [get_optimizer_state_dict(model, o, options=options) for o in opts], "fsdp": True}


def save_checkpoint(ctx: Run, step: int, val: dict[str, float]) -> Path:
    """Every process gathers its part (RNG states, FSDP shards); the main one writes; all wait."""
    rng = [rng_state()]
    if ctx.dist.enabled:
        import torch.distributed as td

        gathered: list[Any] = [None] * ctx.dist.world_size
        td.all_gather_object(gathered, rng[0])
        rng = gathered
    weights = lora.trainable_state(ctx.hf_model) if lora.is_lora(ctx.hf_model) else _model_state(ctx.hf_model, ctx.fsdp)
    optim_state = _optimizer_state(ctx.hf_model, ctx.optimizer, ctx.fsdp)
    path = ckpt.checkpoint_path(ctx.ckpt_dir, step)
    if ctx.dist.is_main:
        state = {
            "optimizer": optim_state,
            "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
            "rng": rng,
            "counters": dict(ctx.counters),
        }
        meta = {
            "step": step,
            "total_steps": ctx.total_steps,
            "config_sha256": ctx.config_hash,
            "data_sha256": ctx.data_hash,
            "identity": ctx.identity,
            "world_size": ctx.dist.world_size,
            "llmctl_version": __version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **lora.checkpoint_meta(ctx.hf_model),
            **val,
        }
        if isinstance(weights, dict):
            ckpt.save_checkpoint_state(path, weights, state, meta)
        else:
            ckpt.save_checkpoint(path, weights, state, meta)
        best = ctx.ckpt_dir / ctx.counters["best_checkpoint"] if ctx.counters.get("best_checkpoint") else None
        ckpt.prune_checkpoints(ctx.ckpt_dir, ctx.cfg.train.keep_checkpoints or 1, protect=(best, path))
    barrier(ctx.dist)
    return path


def load_checkpoint(ctx: Run, path: Path) -> None:
    if ctx.fsdp:
        from llmctl.core.optim import optimizers_of

        state, _ = ckpt.load_checkpoint_fsdp(path, ctx.hf_model, optimizers_of(ctx.optimizer))
    elif lora.is_lora(ctx.hf_model):
        lora.check_base(ckpt.read_meta(path), ctx.hf_model, path)
        state, _ = ckpt.load_checkpoint_tensors(path, lambda tensors: lora.load_trainable(ctx.hf_model, tensors, path),
                                                map_location=ctx.device)
    else:
        state, _ = ckpt.load_checkpoint(path, ctx.hf_model, map_location=ctx.device)
    if not ctx.fsdp:
        try:
            ctx.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this optimizer ({exc}); was optim.name changed?")
    if ctx.scaler is not None and state.get("scaler"):
        ctx.scaler.load_state_dict(state["scaler"])
    rngs = state.get("rng") or []
    if len(rngs) == ctx.dist.world_size:
        set_rng_state(rngs[ctx.dist.rank])
    ctx.counters.update(state.get("counters", {}))


def export(ctx: Run) -> None:
    """Write the Hugging Face model directory: model, tokenizer, generation config, resolved config. Each file is
    written beside the others first and renamed into place, so a kill never leaves a half-written model file."""
    weights = _model_state(ctx.hf_model, True) if ctx.fsdp else None
    if not ctx.dist.is_main:
        return
    with writing(ctx.out_dir, what="cannot export the model to", hint="; the checkpoints are intact"):
        _export(ctx, weights)


def _export(ctx: Run, weights) -> None:
    out_dir = ctx.out_dir
    tmp = out_dir / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _export_into(ctx, weights, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_into(ctx: Run, weights, tmp: Path) -> None:
    out_dir = ctx.out_dir
    model = ctx.hf_model
    if lora.is_lora(model):  # adapter/ in peft's format, and the merged model unless lora.save: adapter
        merge = ctx.cfg.lora.save == "merged"
        model = lora.save_adapter(model, tmp / lora.ADAPTER_DIR, ctx.tokenizer, merge=merge)
        if not merge:  # a merged model left by an earlier run here would shadow the adapter
            for name in ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json"):
                (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / lora.ADAPTER_DIR, ignore_errors=True)
    if model is not None:
        gen = getattr(model, "generation_config", None)
        if gen is not None and ctx.tokenizer.eos_token_id is not None:
            gen.eos_token_id = ctx.tokenizer.eos_token_id
            bos, pad = ctx.tokenizer.bos_token_id, ctx.tokenizer.pad_token_id
            gen.bos_token_id = bos if bos is not None else gen.eos_token_id
            gen.pad_token_id = pad if pad is not None else gen.eos_token_id
            turn_ends = _turn_end_ids(ctx.tokenizer) - {gen.eos_token_id}
            if turn_ends:  # plain model.generate then stops at the end of an answer too
                gen.eos_token_id = [gen.eos_token_id, *sorted(turn_ends)]
        model.save_pretrained(tmp, state_dict=weights)
    ctx.tokenizer.save_pretrained(tmp)
    ctx.cfg.save(tmp / CONFIG_FILE)
    for f in tmp.iterdir():
        os.replace(f, out_dir / f.name)


def _turn_end_ids(tokenizer) -> set[int]:
    """The end-of-turn token of the tokenizer's chat template, when it is one token (none without a template)."""
    from llmctl.core import chat

    template = chat.resolve_template("auto", tokenizer)
    return chat.stop_ids_and_strings(tokenizer, template)[0] if template is not None else set()


def plot_loss(metrics: Path, out: Path) -> None:
    """Draw train and validation loss against steps (matplotlib, imported only here, no display needed)."""
    records = read_jsonl(metrics)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        return
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
