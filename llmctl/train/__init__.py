"""`llmctl train`: train a GPT-2 from scratch or fine-tune a model, in one process or many (torchrun).

This module reads top to bottom: data -> model -> run directory (fresh, resumed or refused) -> optimizer -> one
loop -> export. The helpers it calls take explicit arguments and live beside it:
    data.py     `batch_starts`, `get_batch`: token windows; `LabeledData`: classification batches
    model.py    build or load the model, check it against the data, wrap it (DDP, FSDP, compile)
    step.py     `train_step`, `estimate_loss`, signals, out-of-memory, agreement between processes
    rundir.py   run identity, start/resume/refuse, lock, metrics.jsonl, checkpoints, export, loss.png

Everything random is a pure function of (seed, step, rank): batch positions, the example order of each epoch,
dropout masks. So the data cursor is just the step, and a run resumed from a checkpoint redoes exactly the steps
that were lost: on CPU in fp32 it ends with weights bit-identical to a run that never stopped.

The run directory (`run.out_dir`):
    config.json, model.safetensors, generation_config.json, tokenizer files   the model, as Hugging Face saves it
    config.yaml     the resolved llmctl config        run.json       identity, status and summary of the run
    metrics.jsonl   one line per logged step          loss.png       the loss curve, drawn at the end
    checkpoints/step-00001000/   model.safetensors, state.pt (optimizer, RNG, counters), meta.json
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from llmctl.config import Config
from llmctl.core import checkpoint as ckpt
from llmctl.core.device import (
    Dist,
    close_distributed,
    derived_seed,
    init_distributed,
    pick_dtype,
    precision_name,
    set_threads,
)
from llmctl.core.files import sha256_json
from llmctl.core.lora import apply_lora
from llmctl.core.trackers import check_loggers
from llmctl.errors import ConfigError, DataError, Interrupted, LlmctlError, TrainingError
from llmctl.train.data import (
    LabeledData,
    TokenData,
    batch_starts,
    get_batch,
    load_labeled,
    load_token_data,
    split_labeled,
)
from llmctl.train.model import causal_lm, classifier, fine_tune_tokenizer, sft_model, wrap
from llmctl.train.rundir import (
    CHECKPOINTS,
    CONFIG_FILE,
    LOSS_PLOT,
    METRICS_FILE,
    MetricsLog,
    Run,
    decide_start,
    export,
    load_checkpoint,
    mark_stopped,
    plot_loss,
    read_jsonl,
    read_run_file,
    run_identity,
    run_lock,
    save_checkpoint,
    write_run_file,
)
from llmctl.train.sft import SftData
from llmctl.train.step import (
    StopSignal,
    all_reduce,
    divergence_advice,
    estimate_loss,
    is_oom,
    oom_message,
    optimizer_step,
    sync_context,
    train_step,
)

__all__ = ["run", "batch_starts", "get_batch", "train_step", "estimate_loss", "optimizer_step", "sync_context",
           "is_oom", "oom_message", "plot_loss", "run_identity", "TokenData", "LabeledData"]

log = logging.getLogger(__name__)


def run(cfg: Config, *, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train as `cfg` says and save the model to `cfg.run.out_dir`; returns a summary (with `model_path`).

    `force` resumes although the config or data changed since the checkpoint, and starts over in a run directory
    that holds another run. Raises Interrupted (exit 75) after saving a checkpoint on SIGINT/SIGTERM.
    """
    dist, device = init_distributed(cfg.run.device)
    if not dist.is_main:
        quiet = True
        logging.getLogger("llmctl").setLevel(logging.ERROR)
    try:
        return _train(cfg, dist, device, force=force, quiet=quiet)
    finally:
        close_distributed()


def _train(cfg: Config, dist: Dist, device: torch.device, *, force: bool, quiet: bool) -> dict[str, Any]:
    from llmctl.core.fastgpt import CausalLMObjective, ClassificationObjective
    from llmctl.core.model import count_parameters
    from llmctl.core.optim import build_optimizer

    wall_start = time.perf_counter()
    t = cfg.train
    check_loggers(t.loggers)  # a tracker that is not installed fails before anything is written
    set_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)  # model initialisation: identical on every process
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    if t.fsdp and not dist.enabled:
        log.info("train.fsdp is set but this is one process: training without sharding (start with torchrun)")
    fsdp = t.fsdp and dist.enabled

    # data and model
    if t.task == "classification":
        if t.max_tokens:
            raise ConfigError("train.max_tokens: counts tokens of causal_lm training; use max_steps or epochs")
        examples, data_hash = load_labeled(cfg)
        labels = sorted({e.label for e in examples})
        if len(labels) < 2:
            raise DataError(f"{cfg.data.inputs[0]}: classification needs at least 2 labels, found {labels}")
        hf_model, tokenizer = classifier(cfg, labels)
        hf_model = apply_lora(hf_model, cfg, t.task)
        limit = _context(t.context, hf_model, default=512)
        label_id = {label: i for i, label in enumerate(labels)}
        train_ex, val_ex = split_labeled(examples, cfg.data.val_fraction, cfg.run.seed)

        def encode(rows):
            # The tokenizer's own special tokens, as eval encodes them ([CLS]/[SEP] for BERT-style backbones).
            ids = tokenizer([e.text for e in rows], truncation=True, max_length=limit, split_special_tokens=True)
            return [r or [tokenizer.pad_token_id] for r in ids["input_ids"]], [label_id[e.label] for e in rows]

        data = LabeledData(*encode(train_ex), *encode(val_ex), labels, tokenizer.pad_token_id, cfg.run.seed)
        context = limit
        objective = ClassificationObjective(hf_model)
    elif t.task == "sft":
        if t.max_tokens:
            raise ConfigError("train.max_tokens: counts tokens of causal_lm training; use max_steps or epochs")
        from llmctl.core.fastgpt import SFTObjective
        from llmctl.core.sft import prepare_tokenizer, uses_messages
        from llmctl.train.sft import load_sft

        tokenizer, source = fine_tune_tokenizer(cfg)
        own_size = len(tokenizer)
        needs_template = bool(cfg.data.inputs) and "-" not in cfg.data.inputs and uses_messages(
            cfg.data.inputs, cfg.sft, cfg.data.format)
        template = prepare_tokenizer(tokenizer, cfg.sft.chat_template, source, needs_template)
        hf_model = sft_model(cfg, tokenizer, own_size)
        hf_model = apply_lora(hf_model, cfg, t.task, new_tokens=list(range(own_size, len(tokenizer))))
        context = _context(t.context, hf_model, default=1024)
        data, data_hash, sft_stats = load_sft(cfg, tokenizer, template, context, t.batch_size * t.grad_accum)
        objective = SFTObjective(hf_model, lean=cfg.model.lean and not fsdp, chunked=not fsdp)
    else:
        data, tokenizer, meta, data_hash = load_token_data(cfg, dist, quiet)
        hf_model = causal_lm(cfg, tokenizer, meta)
        hf_model = apply_lora(hf_model, cfg, t.task)
        context = _context(t.context, hf_model, default=1024)
        data.context = context
        global_tokens = t.batch_size * t.grad_accum * context
        if len(data.train) < max(global_tokens, context) + 1:
            raise DataError(
                f"{cfg.data.dir}: the train split holds {len(data.train)} tokens, less than one batch "
                f"({t.batch_size} x {t.grad_accum} x {context} tokens); lower train.batch_size or train.context, or "
                f"add data"
            )
        objective = CausalLMObjective(hf_model, lean=cfg.model.lean and not fsdp, chunked=not fsdp)

    if t.activation_checkpointing:
        from llmctl.core.fastgpt import enable_checkpointing

        enable_checkpointing(objective)
    global_batch = t.batch_size * t.grad_accum
    if global_batch % dist.world_size:
        raise ConfigError(
            f"train.batch_size: the global batch (batch_size x grad_accum = {global_batch}) must divide evenly "
            f"between {dist.world_size} processes"
        )
    width = getattr(hf_model.config, "n_embd", None) or getattr(hf_model.config, "hidden_size", None)
    dtype = pick_dtype(t.precision, device, width)
    if dtype == torch.float16 and device.type == "cpu":
        log.warning("fp16 on a CPU is slow and needs loss scaling; bf16 or fp32 is the better choice")
    hf_model.to(device)

    # limits: the first one reached stops the run; the schedule spans it
    per_step = data.items_per_step(global_batch)
    limits = _limits(cfg, data, per_step)
    total_steps = min(limits.values()) if limits else None
    limit_name = min(limits, key=limits.get) if limits else "max_time"

    # run directory
    out_dir = Path(cfg.run.out_dir)
    identity = run_identity(cfg)
    config_hash = sha256_json(identity)
    counters: dict[str, Any] = {"step": 0, "tokens": 0, "elapsed": 0.0, "best_val_loss": None, "best_step": None,
                                "best_checkpoint": None}
    with run_lock(out_dir, dist.is_main):
        decision: list[Any] = [None, None]
        if dist.is_main:
            try:
                decision[0] = decide_start(out_dir, cfg, identity, config_hash, data_hash, force)
            except LlmctlError as exc:
                decision[1] = exc
        if dist.enabled:
            import torch.distributed as td

            td.broadcast_object_list(decision, src=0)
        if decision[1] is not None:
            raise decision[1]
        resume_from: Path | None = decision[0]
        ckpt_dir = out_dir / CHECKPOINTS
        # wrap first: FSDP replaces the parameters, and the optimizer must hold the ones that train
        wrapped = wrap(objective, cfg, dist, device)
        optimizer = build_optimizer(hf_model, cfg.optim)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        ctx = Run(cfg, dist, device, out_dir, ckpt_dir, hf_model, wrapped, optimizer, scaler, tokenizer, identity,
                   config_hash, data_hash, total_steps, fsdp, counters)
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            if resume_from is None and ckpt_dir.exists():
                shutil.rmtree(ckpt_dir)  # starting over (allowed above): old checkpoints must not be resumed
            ckpt_dir.mkdir(exist_ok=True)

        ctx.objective.train()
        if resume_from is not None:
            load_checkpoint(ctx, resume_from)
            log.info("resuming from %s (step %d)", resume_from, counters["step"])
        metrics = MetricsLog(out_dir / METRICS_FILE, dist.is_main, counters["step"] if resume_from else None,
                             t.loggers, cfg.to_dict())
        status = {"status": "running", "config_sha256": config_hash, "data_sha256": data_hash,
                  "identity": identity, "step": counters["step"], "total_steps": total_steps}
        if dist.is_main:
            write_run_file(out_dir, status)
            cfg.save(out_dir / CONFIG_FILE)

        n_params = count_parameters(hf_model)
        n_trainable = sum(p.numel() for p in hf_model.parameters() if p.requires_grad)
        log.info(
            "training %s: %.2fM parameters on %s (%s%s), %s steps of %d x %d %s",
            type(hf_model).__name__, n_params / 1e6, device, precision_name(dtype),
            f", {dist.world_size} processes" if dist.enabled else "", total_steps or "?", global_batch,
            context if t.task != "classification" else 1,
            {"causal_lm": "tokens", "sft": "tokens (packed rows)" if cfg.sft.packing else "tokens at most"}.get(
                t.task, "examples"),
        )
        try:
            result = _loop(ctx, data, dtype, context, global_batch, per_step, quiet, metrics, limit_name)
            # the end: final checkpoint (unless resumed at the end already), export
            if resume_from is None or result["steps_run"]:
                save_checkpoint(ctx, counters["step"], result["final"])
            export(ctx)
        except BaseException as exc:
            if dist.is_main:
                mark_stopped(out_dir, exc, counters["step"])
            raise
        finally:
            metrics.close()
        stopped_by = result.pop("stopped_by")
        summary = {
            "model_path": str(out_dir),
            "task": t.task,
            "steps": counters["step"],
            "tokens": counters["tokens"],
            "final_loss": result.get("loss"),
            "final_val_loss": result["final"].get("val_loss"),
            "best_val_loss": counters["best_val_loss"],
            "best_step": counters["best_step"],
            "best_checkpoint": str(ckpt_dir / counters["best_checkpoint"]) if counters["best_checkpoint"] else None,
            "wall_time_s": round(time.perf_counter() - wall_start, 3),
            "train_time_s": round(counters["elapsed"], 3),
            "tokens_per_s": round(counters["tokens"] / counters["elapsed"], 1) if counters["elapsed"] else None,
            "stopped_by": stopped_by,
            "resumed_from": str(resume_from) if resume_from else None,
            "parameters": n_params,
            "trainable_parameters": n_trainable,
            "device": str(device),
            "precision": precision_name(dtype),
            "world_size": dist.world_size,
        }
        if "val_accuracy" in result["final"]:
            summary["final_val_accuracy"] = result["final"]["val_accuracy"]
        if t.task == "sft":
            summary["examples"] = sft_stats
        if dist.is_main and "png" in t.loggers:
            with contextlib.suppress(Exception):  # a picture is not worth failing a finished run for
                plot_loss(out_dir / METRICS_FILE, out_dir / LOSS_PLOT)
            status.update(status="finished", step=counters["step"], summary=summary)
            write_run_file(out_dir, status)
        return summary


def _loop(ctx: Run, data, dtype, context: int, global_batch: int, per_step: int, quiet: bool,
          metrics: MetricsLog, limit_name: str) -> dict[str, Any]:
    """The training loop. Returns the final evaluation, the last logged loss and why it stopped."""
    from llmctl.core.console import make_progress
    from llmctl.core.optim import set_lr

    cfg, dist, device, counters = ctx.cfg, ctx.dist, ctx.device, ctx.counters
    t = cfg.train
    model = ctx.objective
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    sync = sync_context(ctx.fsdp, dist.enabled and not ctx.fsdp)
    eval_specs = data.eval_batches(2 * t.batch_size if t.eval_batches == 0 else t.batch_size, t.eval_batches)
    ckpt_interval = t.checkpoint_interval if t.checkpoint_interval is not None else t.eval_interval
    share = global_batch // dist.world_size
    trainable = [p for p in model.parameters() if p.requires_grad]  # listed once: walking modules costs per step
    start_step = counters["step"]
    total = ctx.total_steps

    def evaluate() -> dict[str, float]:
        return estimate_loss(model, data, eval_specs, device, autocast, dist, shard=not ctx.fsdp) if eval_specs else {}

    saved_at = None

    def save(step: int, val: dict[str, float]) -> None:
        nonlocal saved_at
        _note_best(counters, step, val, ctx.ckpt_dir)
        save_checkpoint(ctx, step, val)
        saved_at = step

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    progress = make_progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"), TimeRemainingColumn(),
        quiet=quiet,
    )
    stop = StopSignal()
    final: dict[str, float] = {}
    last_loss = None
    window: list[float] = []
    stopped_by = limit_name
    t_log = time.perf_counter()
    tokens_log = counters["tokens"]
    with stop, progress:
        task = progress.add_task("train", total=total, completed=start_step, loss="-", speed="")
        t0 = time.perf_counter()
        elapsed0 = counters["elapsed"]
        while True:
            step = counters["step"]
            elapsed = elapsed0 + time.perf_counter() - t0
            if total is not None and step >= total:
                break
            if t.max_time and elapsed >= t.max_time:
                stopped_by = "max_time"
                break
            # schedule: a pure function of the step; under max_time alone the end is estimated from the pace
            horizon = total if total is not None else _time_horizon(step, elapsed, t.max_time)
            lr = set_lr(ctx.optimizer, step, cfg.optim, horizon)
            items = data.step_items(step, global_batch)  # the global batch, then this process's share
            mine = items[dist.rank * share : (dist.rank + 1) * share]
            torch.manual_seed(derived_seed(cfg.run.seed, step, dist.rank))  # dropout masks
            try:
                chunks = [mine[i : i + t.batch_size] for i in range(0, share, t.batch_size)]
                if isinstance(data, SftData):  # the mean over the step's answer tokens, however they fall
                    weights = data.micro_weights(chunks, items, dist.world_size)
                else:
                    weights = [len(chunk) / share for chunk in chunks]
                micro = [(data.batch(chunk, device), w) for chunk, w in zip(chunks, weights)]
                loss, norm = train_step(model, ctx.optimizer, ctx.scaler, micro, autocast, cfg.optim.grad_clip, sync,
                                        trainable)
                loss_value, norm_value = loss.item(), norm.item()
            except Exception as exc:
                if is_oom(exc):
                    raise TrainingError(oom_message(cfg, context)) from None
                raise
            bad = not math.isfinite(loss_value) or (ctx.scaler is None and not math.isfinite(norm_value))
            flags = all_reduce([float(bad), float(stop.signum is not None)], dist)
            if flags[0]:
                last = ckpt.latest_checkpoint(ctx.ckpt_dir)
                what, value = ("loss", loss_value) if not math.isfinite(loss_value) else ("gradient norm", norm_value)
                raise TrainingError(
                    f"the {what} became {value} at step {step + 1} (lr {lr:.3g}); stopped before the update. "
                    f"{divergence_advice(cfg.optim, lr)}; then rerun to start over"
                    + (f", or add --resume --force to continue from {last}" if last else
                       " (no checkpoint was saved yet)")
                )
            optimizer_step(ctx.optimizer, ctx.scaler)
            step += 1
            counters["step"] = step
            if isinstance(data, SftData):
                counters["tokens"] += data.tokens_of_step(items)
            elif isinstance(data, LabeledData):
                counters["tokens"] += data.tokens_of(mine) * dist.world_size
            else:
                counters["tokens"] += per_step
            counters["elapsed"] = elapsed0 + time.perf_counter() - t0
            window.append(loss_value)

            record: dict[str, Any] = {}
            if step % max(1, t.log_interval) == 0 or step == total:
                mean = all_reduce([sum(window) / len(window)], dist, op="sum")[0] / dist.world_size
                now = time.perf_counter()
                speed = (counters["tokens"] - tokens_log) / max(1e-9, now - t_log)
                last_loss = mean
                record = {"step": step, "loss": round(mean, 6), "lr": lr, "grad_norm": round(norm_value, 6),
                          "tokens": counters["tokens"], "tokens_per_s": round(speed, 1),
                          "elapsed": round(counters["elapsed"], 3)}
                window, t_log, tokens_log = [], now, counters["tokens"]
                progress.update(task, completed=step, loss=f"{mean:.4f}", speed=f"{speed / 1000:.1f}k tok/s")
            at_end = step == total
            if t.eval_interval and step % t.eval_interval == 0 and not at_end:
                val = evaluate()
                if val:
                    record = {**(record or {"step": step, "elapsed": round(counters["elapsed"], 3)}), **_rounded(val)}
                    shown = f"{last_loss:.4f}" if last_loss else "-"
                    note = f"step {step}: loss {shown}, val loss {val['val_loss']:.4f}"
                    if progress.disable:
                        log.info("%s", note)
                    else:  # above the live bar, not through it
                        progress.console.print(note, highlight=False)
                    if _improves(counters, val) or (ckpt_interval and step % ckpt_interval == 0):
                        save(step, val)
            elif ckpt_interval and step % ckpt_interval == 0 and not at_end:
                save(step, {})
            if record:
                metrics.write(record)
            if flags[1]:
                if saved_at != step:  # this step's checkpoint may already be written (with its validation loss)
                    save(step, {})
                if dist.is_main:
                    status = read_run_file(ctx.out_dir) or {}
                    status.update(status="interrupted", step=step)
                    write_run_file(ctx.out_dir, status)
                raise Interrupted(
                    f"interrupted at step {step}; checkpoint saved in {ctx.ckpt_dir}: rerun with --resume to continue"
                )
        steps_run = counters["step"] - start_step
        if steps_run or not start_step:
            final = evaluate()
            if final:
                metrics.write({"step": counters["step"], "elapsed": round(counters["elapsed"], 3), **_rounded(final)})
                _note_best(counters, counters["step"], final, ctx.ckpt_dir)
        else:  # resumed a finished run: report what it recorded
            meta = ckpt.read_meta(ckpt.latest_checkpoint(ctx.ckpt_dir))
            final = {k: meta[k] for k in ("val_loss", "val_accuracy") if k in meta}
            losses = [r["loss"] for r in read_jsonl(metrics.path) if r.get("loss") is not None]
            last_loss = losses[-1] if losses else None
            log.info("the run in %s had already finished at step %d", ctx.out_dir, counters["step"])
    if final.get("val_loss") is not None:
        log.info("step %d: val loss %.4f", counters["step"], final["val_loss"])
    return {"final": final, "loss": last_loss, "stopped_by": stopped_by, "steps_run": steps_run}


def _context(asked: int | None, model: torch.nn.Module, default: int) -> int:
    """Sequence length: train.context, else the model's positions; longer than its positions is an error."""
    from llmctl.core.model import max_positions

    positions = max_positions(model)
    context = asked or positions or default
    if positions is not None and context > positions:
        raise ConfigError(
            f"train.context: {context} is longer than the model's {positions} positions (model.n_positions)"
        )
    return context


def _improves(counters: dict[str, Any], val: dict[str, float]) -> bool:
    """True when `val` holds a validation loss lower than any so far."""
    return val.get("val_loss") is not None and (
        counters["best_val_loss"] is None or val["val_loss"] < counters["best_val_loss"]
    )


def _note_best(counters: dict[str, Any], step: int, val: dict[str, float], ckpt_dir: Path) -> None:
    """Record `step` as the best so far when its validation loss is the lowest yet."""
    if _improves(counters, val):
        counters.update(best_val_loss=val["val_loss"], best_step=step,
                        best_checkpoint=ckpt.checkpoint_path(ckpt_dir, step).name)


def _limits(cfg: Config, data, per_step: int) -> dict[str, int]:
    t = cfg.train
    out = {}
    if t.max_steps:
        out["max_steps"] = t.max_steps
    if t.max_tokens:
        out["max_tokens"] = math.ceil(t.max_tokens / per_step)
    if t.epochs:
        out["epochs"] = max(1, math.ceil(t.epochs * data.train_items / per_step))
    return out


def _time_horizon(step: int, elapsed: float, max_time: float) -> int:
    """Under a time limit alone, the step count the schedule aims at: the pace so far, extrapolated."""
    if step == 0 or elapsed <= 0:
        return 1 << 40
    return max(step + 1, round(step * max_time / elapsed))


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in values.items()}
