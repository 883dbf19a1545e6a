"""Checkpoints that describe themselves and cannot be half-written.

A checkpoint is a directory: `model.safetensors` (weights; never pickle), `state.pt` (optimizer, scheduler, RNG
states, data cursor: loaded with `weights_only=True`, so it cannot run code) and `meta.json` (step, config hash,
data hash, anything the caller adds). It is written into a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from llmctl.core.faults import writing
from llmctl.core.files import atomic_dir
from llmctl.errors import CheckpointError, first_line

WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"


def save_checkpoint(path: Path, model: torch.nn.Module, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write model weights, training state and metadata to `path` atomically; returns `path`."""
    # save_model drops the duplicate names of tied tensors (GPT-2's lm_head is its token embedding).
    return _write(path, lambda file: save_safetensors_model(model, str(file)), state, meta)


def save_checkpoint_state(
    path: Path, weights: dict[str, torch.Tensor], state: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """Like `save_checkpoint`, from a full state dict (an FSDP model gathered on one process)."""
    unique, seen = {}, set()
    for name, tensor in weights.items():  # tied weights share storage: safetensors stores each tensor once
        key = (tensor.data_ptr(), tensor.shape)
        if key not in seen:
            seen.add(key)
            unique[name] = tensor.contiguous()
    return _write(path, lambda file: save_file(unique, str(file)), state, meta)


def _write(path: Path, write_weights: Callable[[Path], None], state: dict[str, Any], meta: dict[str, Any]) -> Path:
    path = Path(path)
    # A failure (a full disk) leaves nothing behind but the earlier checkpoints, which stay whole.
    with writing(path, what="cannot save checkpoint", hint="; the earlier checkpoints are intact"):
        with atomic_dir(path) as tmp:
            write_weights(tmp / WEIGHTS)
            torch.save(state, tmp / STATE)
            (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def load_checkpoint_fsdp(path: Path, model: torch.nn.Module, optimizers: list) -> tuple[dict, dict]:
    """Load a checkpoint into an FSDP-sharded model and its optimizers (every process reads the full files)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    meta = read_meta(path)
    with _reading_weights(path):
        weights = load_file(str(path / WEIGHTS))
    state = _load_state(path, "cpu")
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    for opt, sub in zip(optimizers, state["optimizer"]["optimizers"], strict=True):
        set_optimizer_state_dict(model, opt, sub, options=options)
    return state, meta


def read_meta(path: Path) -> dict[str, Any]:
    """The metadata of the checkpoint at `path`, without loading any tensor."""
    path = Path(path)
    try:
        return json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint ({META} is missing)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted: {META}: {exc}") from None


def load_checkpoint(path: Path, model: torch.nn.Module, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Load weights into `model` (strictly: every tensor must match) and return (state, meta)."""
    path = Path(path)
    meta = read_meta(path)
    check_shapes(path, model)
    with _reading_weights(path):
        missing, unexpected = load_safetensors_model(model, str(path / WEIGHTS), strict=False, device=str(map_location))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); was it written for another model shape?"
        )
    return _load_state(path, map_location), meta


def check_shapes(path: Path, model: torch.nn.Module) -> None:
    """A checkpoint written for another model shape is said to be so, naming a tensor and both shapes (loading it
    would fail with a size-mismatch report that reads like corruption)."""
    from llmctl.core.weights import read_header, shape_mismatch

    if not (path / WEIGHTS).is_file():
        return  # _reading_weights reports it
    shapes = read_header(path / WEIGHTS, str(path), CheckpointError, f"checkpoint {path} is corrupted")
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    mismatch = shape_mismatch(shapes, expected, prefixes=())
    if mismatch:
        key, there, here = mismatch
        raise CheckpointError(
            f"checkpoint {path} was written for another model shape: tensor {key} is {list(there)} there but "
            f"{list(here)} in the model this config builds. Resume with the model settings it was written with "
            "(its meta.json holds them under identity.model), or start a new run by setting run.out_dir."
        )


@contextmanager
def _reading_weights(path: Path) -> Iterator[None]:
    """Turns a missing or unreadable weights file of the checkpoint at `path` into a one-line CheckpointError."""
    try:
        yield
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {WEIGHTS} is missing") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted: {WEIGHTS}: {first_line(exc)}") from None


def _load_state(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """The training state of the checkpoint at `path` (weights_only: it cannot run code)."""
    try:
        return torch.load(path / STATE, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {STATE} is missing") from None
    except pickle.UnpicklingError:  # torch's message would invite a retry with weights_only=False: never
        raise CheckpointError(
            f"checkpoint {path} is refused: {STATE} holds pickled Python objects other than tensors and plain "
            "values, which llmctl never loads (they could run code), so llmctl did not write it; resume from "
            "another checkpoint or start a new run (set run.out_dir)"
        ) from None
    except Exception as exc:  # torch.load raises many types on a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} is corrupted: {STATE}: {first_line(exc)}") from None


# Checkpoints of a run live in <out_dir>/checkpoints/step-00001000; names sort by step.
STEP_PREFIX = "step-"


def checkpoint_path(root: Path, step: int) -> Path:
    return Path(root) / f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first. Half-written ones never match: they
    live under dot-names until their final rename."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        name = path.name
        if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit() and path.is_dir():
            found.append((int(name[len(STEP_PREFIX):]), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: Path, keep: int, protect: tuple[Path | None, ...] = ()) -> list[Path]:
    """Delete all but the `keep` newest checkpoints (never those in `protect`, such as the best one), and any
    leftovers of writes that a kill interrupted. Returns what was deleted."""
    protected = {Path(p).resolve() for p in protect if p is not None}
    found = list_checkpoints(root)
    doomed = [path for _, path in found[: max(0, len(found) - keep)] if path.resolve() not in protected]
    doomed += [p for p in Path(root).glob(f".{STEP_PREFIX}*") if p.is_dir()] if Path(root).is_dir() else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
