"""Training speed: llmctl's training step against the seed's plain loop, and time to quality on Tiny Shakespeare.

    flock -x /tmp/llmctl-cpu.lock python bench/bench_train.py             # both parts (about 1.5 min here)
    python bench/bench_train.py --skip-quality --repeats 2                 # throughput only, quicker

1. Throughput, in one process, on two shapes (byte vocabulary, the same batches for both loops):
   small: 4 layers, 4 heads, width 128, context 64, batch 12 (nanoGPT's shakespeare_char CPU recipe)
   large: 6 layers, 6 heads, width 384, context 256, batch 8
   Baselines, both the seed's plain loop (`get_linear_schedule_with_warmup`, `model(input_ids, labels).loss`,
   backward, clip, step; eager, fp32), over two GPT2LMHeadModels of the same shape (dropout 0, as nanoGPT's CPU
   recipe):
   - "seed loop": the model as transformers makes it from the shape alone (GPT2Config defaults: `gelu_new`, sdpa)
     and a plain `torch.optim.AdamW`: the "plain GPT2LMHeadModel" the issue measured against nanoGPT. The targets
     are checked against it.
   - "seed, tuned": the same loop with two of llmctl's cheap wins already in (`gelu_pytorch_tanh`, fused AdamW), to
     show what the lean forward and the other defaults add on top; its ratio is printed too.
   llmctl: `llmctl.train.train_step` with everything at its defaults (model, optimizer, precision `auto`, no
   compile). Each timing is the best of --repeats interleaved blocks. MFU counts 6 x parameters + 12 x layers x
   context x width FLOPs per token against matmul peaks measured here and now.
   Targets (issue 6): >= 1.25x on the small shape, >= 1.1x on the large one.
2. Time to quality: `llmctl train -c configs/shakespeare-char.yaml` as a user runs it (a fresh process, data
   preparation included, into temporary directories), timed from the command to the saved model; prints the wall
   time and the validation loss (mean over the whole validation split). Target: <= 1.88 within 60 s (half of the
   ~116 s nanoGPT's own recipe takes on a 2-core Zen3).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmctl.config import ModelConfig, OptimConfig
from llmctl.core.device import cpu_has_fast_bf16, pick_dtype, precision_name
from llmctl.core.fastgpt import CausalLMObjective
from llmctl.core.model import build_model
from llmctl.core.optim import build_optimizer, set_lr
from llmctl.train import batch_starts, get_batch, optimizer_step, sync_context, train_step

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
SHAPES = {
    "small": dict(n_layer=4, n_head=4, n_embd=128, context=64, batch=12, steps=20),
    "large": dict(n_layer=6, n_head=6, n_embd=384, context=256, batch=8, steps=3),
}
VOCAB = 257  # bytes + end-of-text


def matmul_peak(dtype: torch.dtype, n: int = 2048, trials: int = 8) -> float:
    """FLOP/s of a large square matmul, the best of several short trials: what the CPU can do at best, now (a
    shared or virtual machine is sometimes slowed by its neighbours; the best trial is the least disturbed)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        best = max(best, 2 * n**3 * 3 / (time.perf_counter() - start))
    return best


def tokens() -> np.ndarray:
    if SHAKESPEARE.is_file():
        return np.frombuffer(SHAKESPEARE.read_bytes(), dtype=np.uint8).astype(np.uint16)
    return np.random.default_rng(0).integers(0, 256, size=1_000_000, dtype=np.uint16)


class Baseline:
    """The seed's plain training loop over a GPT-2 with gelu_pytorch_tanh and fused AdamW ("seed, tuned")."""

    def __init__(self, shape: dict, data: np.ndarray, total_steps: int):
        from transformers import get_linear_schedule_with_warmup

        torch.manual_seed(0)
        cfg = ModelConfig(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                          n_positions=shape["context"], activation="gelu_pytorch_tanh", lean=False)
        self.model = build_model(cfg, VOCAB, VOCAB - 1)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, 10, total_steps)
        self.shape, self.data, self.step_no = shape, data, 0

    def step(self) -> None:
        starts = batch_starts(0, self.step_no, len(self.data), self.shape["context"], self.shape["batch"])
        x, _ = get_batch(self.data, starts, self.shape["context"], torch.device("cpu"))
        loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_no += 1


class PlainBaseline(Baseline):
    """The seed's loop over `GPT2LMHeadModel` exactly as transformers makes it from a shape alone (GPT2Config
    defaults: `gelu_new`, sdpa; dropout set to 0 as in nanoGPT's CPU recipe) with a plain `torch.optim.AdamW`."""

    def __init__(self, shape: dict, data: np.ndarray, total_steps: int):
        from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup

        torch.manual_seed(0)
        config = GPT2Config(vocab_size=VOCAB, n_positions=shape["context"], n_embd=shape["n_embd"],
                            n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
        self.model = GPT2LMHeadModel(config)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.1)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, 10, total_steps)
        self.shape, self.data, self.step_no = shape, data, 0


class Ours:
    """llmctl's training step, everything at its defaults (precision `auto` unless given)."""

    def __init__(self, shape: dict, data: np.ndarray, total_steps: int, precision: str = "auto"):
        torch.manual_seed(0)
        cfg = ModelConfig(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                          n_positions=shape["context"])
        self.model = build_model(cfg, VOCAB, VOCAB - 1)
        self.model.train()
        self.objective = CausalLMObjective(self.model, lean=cfg.lean)
        self.optim_cfg = OptimConfig()
        self.optimizer = build_optimizer(self.model, self.optim_cfg)
        self.dtype = pick_dtype(precision, torch.device("cpu"), cfg.n_embd)
        self.autocast = (lambda: torch.autocast("cpu", dtype=self.dtype)) if self.dtype != torch.float32 \
            else contextlib.nullcontext
        self.sync = sync_context(False, False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.shape, self.data, self.total, self.step_no = shape, data, total_steps, 0

    def step(self) -> None:
        set_lr(self.optimizer, self.step_no, self.optim_cfg, self.total)
        starts = batch_starts(0, self.step_no, len(self.data), self.shape["context"], self.shape["batch"])
        x, y = get_batch(self.data, starts, self.shape["context"], torch.device("cpu"))
        loss, norm = train_step(self.objective, self.optimizer, None, [({"input_ids": x, "targets": y}, 1.0)],
                                self.autocast, 1.0, self.sync, self.params)
        loss.item(), norm.item()  # the trainer reads both every step (NaN guard)
        optimizer_step(self.optimizer, None)
        self.step_no += 1


def time_block(runner, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    return (time.perf_counter() - start) / steps


def throughput(repeats: int, data: np.ndarray, peaks: dict[str, float]) -> bool:
    ok = True
    targets = {"small": 1.25, "large": 1.1}
    for name, shape in SHAPES.items():
        steps = shape["steps"]
        total = steps * (repeats + 1) + 10
        runners = {"seed loop": PlainBaseline(shape, data, total), "seed, tuned": Baseline(shape, data, total),
                   "llmctl": Ours(shape, data, total)}
        if runners["llmctl"].dtype != torch.float32:
            runners["llmctl fp32"] = Ours(shape, data, total, precision="fp32")
        for runner in runners.values():  # warm-up: allocator, kernels, first optimizer state
            time_block(runner, 2)
        best = {key: float("inf") for key in runners}
        for _ in range(repeats):
            for key, runner in runners.items():
                best[key] = min(best[key], time_block(runner, steps))
        model = runners["seed loop"].model
        n_params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
        flops_per_token = 6 * n_params + 12 * shape["n_layer"] * shape["context"] * shape["n_embd"]
        tokens_per_step = shape["batch"] * shape["context"]
        print(f"\n{name}: {shape['n_layer']} layers, {shape['n_head']} heads, width {shape['n_embd']}, context "
              f"{shape['context']}, batch {shape['batch']} ({n_params / 1e6:.2f}M parameters)")
        base_rate = tokens_per_step / best["seed loop"]
        for key, runner in runners.items():
            rate = tokens_per_step / best[key]
            dtype = getattr(runner, "dtype", torch.float32)
            achieved = rate * flops_per_token
            mfu = f"MFU {achieved / peaks['fp32']:6.1%} of the fp32 peak"
            if dtype == torch.bfloat16 and "bf16" in peaks:
                mfu += f", {achieved / peaks['bf16']:6.1%} of the bf16 peak"
            print(f"  {key:12} {precision_name(dtype):5} {best[key] * 1000:8.1f} ms/step {rate:9.0f} tokens/s "
                  f"{rate / base_rate:5.2f}x   {mfu}")
        ratio = best["seed loop"] / best["llmctl"]
        ok &= ratio >= targets[name]
        print(f"  ratio {ratio:.2f}x (target {targets[name]}x): {'ok' if ratio >= targets[name] else 'MISSED'}; "
              f"against the tuned seed loop {best['seed, tuned'] / best['llmctl']:.2f}x")
    return ok


def time_to_quality(data_file: Path) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "llmctl", "train", "-c", str(REPO / "configs" / "shakespeare-char.yaml"),
               "--set", f"run.out_dir={tmp}/run", "--set", f"data.dir={tmp}/data",
               "--set", f"data.inputs=[{data_file}]", "--json", "--quiet"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"\ntime to quality: the run failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return False
    result = json.loads(proc.stdout)
    loss = result["final_val_loss"]
    ok = loss <= 1.88 and wall <= 60
    print(f"\ntime to quality (configs/shakespeare-char.yaml, {result['steps']} steps, {result['precision']}):")
    print(f"  wall {wall:.1f} s from the command to the saved model (training {result['train_time_s']:.1f} s, "
          f"{result['tokens_per_s']:.0f} tokens/s); validation loss {loss:.4f} over the whole split")
    print(f"  target: <= 1.88 within 60 s (nanoGPT's recipe: ~116 s to 1.8857 on a 2-core Zen3): "
          f"{'ok' if ok else 'MISSED'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing blocks per loop (best counts)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--data", type=Path, default=SHAKESPEARE, help="Tiny Shakespeare (never copied here)")
    args = parser.parse_args()

    torch.set_grad_enabled(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    ok = True
    if not args.skip_throughput:
        peaks = {"fp32": matmul_peak(torch.float32)}
        line = f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s"
        if cpu_has_fast_bf16():
            peaks["bf16"] = matmul_peak(torch.bfloat16)
            line += f", bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s (AMX)"
        print(line)
        ok &= throughput(args.repeats, tokens(), peaks)
    if not args.skip_quality:
        if args.data.is_file():
            ok &= time_to_quality(args.data.resolve())
        else:
            print(f"\ntime to quality: skipped, {args.data} not found (pass --data)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
