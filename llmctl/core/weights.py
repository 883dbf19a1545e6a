"""Checking a model directory's weights before and after `from_pretrained`, so that a bad directory is one clear
error and never a traceback or a silently half-random model.

Before loading (`check_model_dir`): only safetensors weights are loaded (a directory holding only pickle weights is
refused, with how to convert them); every safetensors file (one, or the shards of an index) must have a sane header
and as many bytes as its header describes; and every tensor's shape must be the shape the model that config.json
describes expects, else the error names the tensor and both shapes. After loading (`check_loaded`): no weight of the
model may be missing from the files (it would be randomly initialised), none may be left over, none NaN or inf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from llmctl.core.faults import reading
from llmctl.errors import ModelError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
MAX_HEADER_BYTES = 100 << 20
"""safetensors' own limit on a header; a larger claim is a corrupt or hostile file."""

CONVERT_HINT = (
    "llmctl loads only safetensors weights (pickle files can run code when loaded); convert them once, where you "
    "trust the file, with: python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('DIR', use_safetensors=False).save_pretrained('DIR')\""
)


def model_dir(ref: str, local: bool) -> Path | None:
    """The directory `from_pretrained` will read: `ref` itself, or a hub id's snapshot in the local cache."""
    if local:
        return Path(ref)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(ref, "config.json")
    except Exception:  # not a valid hub id: from_pretrained reports it
        return None
    return Path(found).parent if isinstance(found, str) else None


def check_model_dir(directory: Path | None, name: str, cls, config_kwargs: dict[str, Any],
                    trust_remote_code: bool) -> None:
    """Refuse a model directory whose weights are not safetensors, are damaged, or do not fit its config.json."""
    if directory is None or not directory.is_dir():
        return
    shapes = header_shapes(directory, name)
    if shapes is None:
        return  # no weights here at all: from_pretrained says so, or the model is remote
    expected = _expected_shapes(directory, name, cls, config_kwargs, trust_remote_code)
    if expected is None:
        return
    mismatch = shape_mismatch(shapes, expected)
    if mismatch:
        key, there, here = mismatch
        raise ModelError(
            f"model {name} does not fit its config.json: tensor {key} has shape {list(there)} in the weights but "
            f"{list(here)} in the model config.json describes; fix config.json (or use the directory the weights "
            "were saved with)"
        )


def header_shapes(directory: Path, name: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from the safetensors file(s) of `directory`, every file checked; None when it holds
    no weights file at all. Pickle-only weights are refused."""
    index, single = directory / SAFETENSORS_INDEX, directory / SAFETENSORS
    if index.is_file():
        with reading(index, ModelError, f"cannot load model {name}:"):
            raw = json.loads(index.read_bytes()[:MAX_HEADER_BYTES].decode("utf-8"))
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"cannot load model {name}: {index} has no weight_map")
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            path = directory / shard
            if not path.is_file():
                raise ModelError(f"cannot load model {name}: {path} is listed in {index.name} but missing")
            shapes.update(read_header(path, name))
        return shapes
    if single.is_file():
        return read_header(single, name)
    others = sorted(directory.glob("*.safetensors"))
    if others:
        shapes = {}
        for path in others:
            shapes.update(read_header(path, name))
        return shapes
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in directory.glob(pattern)})
    if pickles:
        raise ModelError(f"model {name} holds only pickle weights ({', '.join(pickles[:3])}); {CONVERT_HINT}")
    foreign = any(directory.glob("*.h5")) or any(directory.glob("*.msgpack"))  # TF, Flax: transformers says
    if (directory / "config.json").is_file() and not foreign:
        raise ModelError(f"model {name} has a config.json but no weights ({SAFETENSORS} is missing in {directory})")
    return None


def read_header(path: Path, name: str, error: type[ModelError] = ModelError,
                label: str | None = None) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from one safetensors file, after checking that the header is sane and that the file
    holds exactly the bytes the header describes (a truncated or padded file is corrupt). Errors are `error`s that
    start with `label` (default: "cannot load model NAME")."""
    label = label or f"cannot load model {name}"
    where = f"{label}: {path.name}"
    with reading(path, error, f"{label}:"), open(path, "rb") as f:
        size = path.stat().st_size
        if size == 0:
            raise error(f"{where} is empty (0 bytes); copy or save the model again")
        if size < 8:
            raise error(f"{where} is truncated ({size} bytes, shorter than a safetensors header)")
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise error(f"{where} is corrupt: its header claims {length:,} bytes but the file holds {size:,}")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise error(f"{where} is corrupt: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise error(f"{where} is corrupt: its header is not a JSON object")
    shapes, end = {}, 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in entry["shape"])
            begin, stop = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise error(f"{where} is corrupt: tensor {key} has no valid shape and offsets") from None
        if begin > stop:
            raise error(f"{where} is corrupt: tensor {key} has offsets {begin}..{stop}")
        shapes[key], end = shape, max(end, stop)
    data = size - 8 - length
    if end > data:
        raise error(f"{where} is truncated: its header describes {end:,} bytes of tensor data but the file "
                         f"holds {data:,}; copy or save the model again")
    if end < data:
        raise error(f"{where} is corrupt: {data - end:,} bytes after the last tensor")
    return shapes


def _expected_shapes(directory: Path, name: str, cls, config_kwargs: dict[str, Any],
                     trust_remote_code: bool) -> dict[str, tuple[int, ...]] | None:
    """The shape of every tensor of the model config.json describes, built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig

    try:
        config, _ = AutoConfig.from_pretrained(str(directory), local_files_only=True, return_unused_kwargs=True,
                                               trust_remote_code=trust_remote_code, **config_kwargs)
        with torch.device("meta"):
            model = cls.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # an unknown architecture or remote code: from_pretrained gives the real error
        return None
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def shape_mismatch(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                   prefixes: tuple[str, ...] = ("transformer.", "model.")) -> tuple[str, tuple, tuple] | None:
    """The first tensor whose stored shape differs from the model's: (name, stored, expected); None if all fit.
    Names are matched as they are, or with the base model's prefix added or dropped (a bare model's weights under a
    model with a head)."""
    for key in sorted(shapes):
        candidates = [key] + [p + key for p in prefixes] + [key[len(p):] for p in prefixes if key.startswith(p)]
        for candidate in candidates:
            if candidate in expected:
                if tuple(expected[candidate]) != tuple(shapes[key]):
                    return key, tuple(shapes[key]), tuple(expected[candidate])
                break
    return None


def check_loaded(model, info: dict[str, Any], name: str, task: str) -> None:
    """After from_pretrained: refuse a model some of whose weights were not in the files (they would be random),
    left over in the files, or are NaN/inf."""
    import torch

    prefix = getattr(model, "base_model_prefix", "") or ""
    same_class = type(model).__name__ in (getattr(model.config, "architectures", None) or [])

    def of_concern(keys) -> list[str]:
        # A head on a bare or other-headed checkpoint is new by design (a classifier fine-tuned from a causal LM);
        # a weight of the body never is.
        return sorted(k for k in keys or [] if same_class or (prefix and k.startswith(prefix + ".")))

    problems = {
        "missing_keys": "the weights have no tensor {key}{more}, which its config.json asks for (it would be randomly "
                        "initialised); does config.json describe a larger model than the weights hold?",
        "unexpected_keys": "the weights hold tensor {key}{more}, which the model its config.json describes has no "
                           "place for; does config.json describe a smaller model than the weights hold?",
    }
    for kind, message in problems.items():
        keys = of_concern(info.get(kind))
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise ModelError(f"model {name}: " + message.format(key=keys[0], more=more))
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
                raise ModelError(f"model {name}: weight {key} holds NaN or infinite values; the model is broken "
                                 "(a diverged training run?), use an earlier checkpoint")
