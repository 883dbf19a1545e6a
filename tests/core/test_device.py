"""Device, dtype, seeding and threads."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from llmctl.core.device import Dist, init_distributed, pick_device, pick_dtype, seed_everything, set_threads
from llmctl.errors import ConfigError


def test_auto_device_and_dtype_on_this_machine():
    device = pick_device("auto")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert device.type == expected
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32  # bf16 crawls on most CPUs
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="no CUDA device"):
        pick_device("cuda")


def test_seeding_repeats_every_generator():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(5)
    first = draw()
    seed_everything(5)
    assert draw() == first


def test_threads():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(0)  # 0 leaves it alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist, device = init_distributed("cpu")
    assert dist == Dist() and dist.is_main and not dist.enabled and device.type == "cpu"
