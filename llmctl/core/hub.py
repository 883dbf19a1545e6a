"""Finding a model or tokenizer by name: a local directory, the Hugging Face cache, or (when reachable) the hub.

Without a network, transformers retries a hub id for about 23 s before failing. We look locally and in the cache
first and probe the hub's address with a short timeout, so a name that cannot be resolved fails at once with a
message saying what to pass instead.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from llmctl.errors import ModelError

MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class Source:
    """Where `from_pretrained` should load from: a local directory or a hub id, and whether to stay offline."""

    ref: str
    local: bool  # a directory on disk (True) or a hub id (False)
    local_files_only: bool  # pass to from_pretrained: the cache has it, or the hub is not to be contacted


def locate(name: str, what: str = "model") -> Source:
    """Resolve `name` to something `from_pretrained` can load without waiting on the network.

    `what` is "model" (needs config.json) or "tokenizer" (needs one of the tokenizer files).
    """
    needed = MODEL_FILES if what == "model" else TOKENIZER_FILES
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in needed):
            hint = "config.json" if what == "model" else "tokenizer.json or tokenizer_config.json"
            raise ModelError(f"{name} is a directory but holds no {what} ({hint} is missing)")
        return Source(str(path), local=True, local_files_only=True)
    if path.exists():
        raise ModelError(f"{name} is a file; expected a {what} directory or a Hugging Face hub id")
    if _looks_like_path(name):
        raise ModelError(f"{what} directory {name} does not exist")
    if _in_cache(name, needed):
        return Source(name, local=False, local_files_only=True)
    if _offline():
        raise ModelError(
            f"{name!r} is not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE is set; "
            f"pass a local {what} directory"
        )
    if not _hub_reachable():
        raise ModelError(
            f"{name!r} is not a local directory, not in the Hugging Face cache, and the hub cannot be reached; "
            f"pass a local {what} directory"
        )
    return Source(name, local=False, local_files_only=False)


def _looks_like_path(name: str) -> bool:
    # Hub ids are `name` or `owner/name`; anything with more slashes, a leading dot, slash or tilde is a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _in_cache(repo_id: str, files: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in files:
        try:
            found = try_to_load_from_cache(repo_id, filename)
        except Exception:  # an id that is not even valid for the hub: treat as absent
            return False
        if isinstance(found, str):
            return True
    return False


def _offline() -> bool:
    flags = (os.environ.get(v, "").lower() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag in ("1", "true", "yes", "on") for flag in flags)


def _hub_reachable() -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; let the real request try
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    return _can_connect(host, port)


@functools.lru_cache(maxsize=8)
def _can_connect(host: str, port: int, timeout: float = 3.0) -> bool:
    """Probed once per process: a command resolves the same name for its config, tokenizer and weights."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_offline() -> bool:
    """True when the hub is not to be contacted (HF_HUB_OFFLINE) or cannot be reached: read from the cache only."""
    return _offline() or not _hub_reachable()
