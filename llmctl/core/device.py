"""Where and how computation runs: device and dtype choice, seeding, CPU threads, and torch.distributed setup."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from llmctl.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is not there is a config error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device: {name} was asked for but torch sees no CUDA device; use auto or cpu")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"run.device: {name} does not exist ({torch.cuda.device_count()} CUDA devices)")
        return device
    if name == "mps" and not _mps_available():
        raise ConfigError("run.device: mps was asked for but is not available; use auto or cpu")
    return torch.device(name)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


# Below this model width a CPU step is dominated by small matmuls and elementwise work, where bf16 autocast's
# conversions cost more than AMX saves (measured: width 128 runs 20% slower in bf16, width 384 twice as fast).
BF16_CPU_MIN_WIDTH = 256


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX tiles (Intel Sapphire Rapids and later), where bf16 matmuls run several times faster
    than fp32. Without them (AVX2-only CPUs such as Zen3) bf16 matmuls crawl at about 1 GFLOP/s."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe and probe())
    except Exception:  # a private probe: never let it break device selection
        return False


def pick_dtype(precision: str, device: torch.device, width: int | None = None) -> torch.dtype:
    """The compute dtype for autocast. `auto` is bf16 on a GPU that supports it; on a CPU, bf16 only where it is
    native (AMX) and the model is wide enough (`width`, its hidden size) for matmuls to dominate; fp32 elsewhere."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and width is not None and width >= BF16_CPU_MIN_WIDTH and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    return DTYPES[precision]


def precision_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (seed, step, rank...): nearby inputs give unrelated streams, and the same
    inputs always give the same seed, so randomness can be a pure function of where a run is."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rng_state() -> dict:
    """Every random generator's state, in a form `torch.load(weights_only=True)` accepts."""
    state = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def set_threads(threads: int) -> None:
    """0 keeps torch's default; otherwise pin intra-op threads (useful when several processes share a machine)."""
    if threads > 0:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly one-process) torch.distributed job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and logs."""
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).

    Without torchrun this is a one-process job. NCCL when each process has a GPU, gloo otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(), pick_device(device_name)
    import torch.distributed as td

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not td.is_initialized():
        td.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    log.debug("rank %d/%d on %s (%s)", rank, world_size, device, backend)
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size), device


def close_distributed() -> None:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
