"""Checkpoints that describe themselves and cannot be half-written.

A checkpoint is a directory: `model.safetensors` (weights; never pickle), `state.pt` (optimizer, scheduler, RNG
states, data cursor: loaded with `weights_only=True`, so it cannot run code) and `meta.json` (step, config hash,
data hash, anything the caller adds). It is written into a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from llmctl.core.files import atomic_dir
from llmctl.errors import CheckpointError

WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"


def save_checkpoint(path: Path, model: torch.nn.Module, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write model weights, training state and metadata to `path` atomically; returns `path`."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        # save_model drops the duplicate names of tied tensors (GPT-2's lm_head is its token embedding).
        save_safetensors_model(model, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


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
    try:
        missing, unexpected = load_safetensors_model(model, str(path / WEIGHTS), strict=False, device=str(map_location))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {WEIGHTS} is missing") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted: {WEIGHTS}: {_first_line(exc)}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); was it written for another model shape?"
        )
    try:
        state = torch.load(path / STATE, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {STATE} is missing") from None
    except Exception as exc:  # torch.load raises many types on a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} is corrupted: {STATE}: {_first_line(exc)}") from None
    return state, meta


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
