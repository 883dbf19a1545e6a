"""LoRA fine-tuning against full fine-tuning and against trl's SFTTrainer + peft: peak memory, speed, checkpoint size.

    flock -x /tmp/llmctl-cpu.lock python bench/bench_lora.py          # both shapes, 4 steps per case (~15 min here)
    python bench/bench_lora.py --shapes gpt2 --steps 20                 # one shape, longer timings
    pip install -c constraints.txt -e '.[bench]'                         # trl, for the third column

Two base models with random weights (fine-tuning speed and memory do not depend on what the weights hold), saved
once as Hugging Face model directories:
    gpt2   the GPT-2 124M shape: 12 layers, 12 heads, width 768, vocabulary 50257; dropout 0 (llmctl's default:
           the hub's GPT-2 says 0.1, whose attention dropout keeps (T x T) probabilities per head and layer)
    llama  a Llama of similar size: 12 layers, width 768, 12 heads (4 key/value heads), MLP 2048, vocabulary 32000
Random token ids (context 256, batch 4) stand in for the data. Each case runs in a fresh process, so its peak RSS
(`ru_maxrss`) is its own:
    full   `llmctl train` fine-tuning every weight (model.pretrained = the base)
    lora   the same command with `lora.enabled=true` (r=16, alpha 32, dropout 0, auto targets: the attention and
           MLP projections), same batch, same precision
    lora-ckpt  the same with `train.activation_checkpointing=true` (each block recomputed in the backward pass)
    trl    trl `SFTTrainer` with `peft_config=LoraConfig(...)` of the same settings on the same token windows, same
           batch, same precision (bf16 autocast where llmctl picks it), no evaluation, no saving
Tokens/s counts the steps after the first (llmctl: from metrics.jsonl, trl: timed by a callback). The checkpoint is
llmctl's last one (weights + optimizer state + RNG), against the base model's weight file.
Targets (issue 13): LoRA's peak RSS <= 60% of full fine-tuning's; tokens/s >= 1.2x full and >= 1.3x trl + peft;
checkpoint <= 5% of the model. The machine is shared: figures measured while others run are noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONTEXT, BATCH, RANK, ALPHA = 256, 4, 16, 32
SHAPES = {
    "gpt2": {"vocab": 50257},
    "llama": {"vocab": 32000},
}


def make_base(shape: str, path: Path) -> None:
    """A randomly initialised model of `shape`, saved with a byte tokenizer (its ids are never decoded)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from llmctl.core.model import quiet_transformers
    from llmctl.core.tokenizer import byte_tokenizer, to_transformers

    quiet_transformers()  # no "Writing model shards" bar
    torch.manual_seed(0)
    vocab = SHAPES[shape]["vocab"]
    if shape == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
                             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    to_transformers(byte_tokenizer(["<|endoftext|>"]), "<|endoftext|>").save_pretrained(path)


def make_data(shape: str, base: Path, path: Path, n_tokens: int) -> None:
    """A prepared-data directory (the format `preprocess` writes) of random ids below the model's vocabulary."""
    import shutil

    from llmctl.core.files import sha256_file
    from llmctl.core.shards import ShardMeta

    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, path / name)
    vocab = SHAPES[shape]["vocab"]
    ids = np.random.default_rng(0).integers(0, vocab, size=n_tokens, dtype=np.uint16)
    n_val = CONTEXT * BATCH * 2
    splits = {"train": ids[:-n_val], "val": ids[-n_val:]}
    for name, arr in splits.items():
        arr.tofile(path / f"{name}.bin")
    meta = ShardMeta(dtype="uint16", vocab_size=vocab, eos_token_id=vocab - 1,
                     tokens={k: int(len(v)) for k, v in splits.items()}, documents={"train": 1, "val": 1},
                     bytes={k: int(len(v)) * 2 for k, v in splits.items()}, inputs=[],
                     tokenizer_sha256=sha256_file(path / "tokenizer.json"), config_sha256="bench")
    (path / "meta.json").write_text(json.dumps(dataclasses.asdict(meta), indent=2))


# ---------------------------------------------------------------------------------------------------------------
# One case, in its own process


def case_llmctl(base: Path, data: Path, out: Path, steps: int, lora: bool, recompute: bool = False) -> dict:
    sets = {
        "run.out_dir": str(out), "data.dir": str(data), "model.pretrained": str(base),
        "train.max_steps": steps, "train.batch_size": BATCH, "train.context": CONTEXT, "train.eval_interval": 0,
        "train.eval_batches": 1, "train.log_interval": 1, "optim.warmup_steps": 1,
    }
    if lora:
        sets.update({"lora.enabled": "true", "lora.rank": RANK, "lora.alpha": ALPHA})
    if recompute:
        sets["train.activation_checkpointing"] = "true"
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    from llmctl import cli

    sys.argv = ["llmctl", "train", *args, "--quiet", "--json"]
    try:
        cli.main()
    except SystemExit as exc:
        if exc.code:
            raise
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r.get("step", 0) > 1 and "tokens_per_s" in r]
    ckpt = max((out / "checkpoints").iterdir())
    return {
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in timed])),
        "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.iterdir()),
        "adapter_bytes": (out / "adapter" / "adapter_model.safetensors").stat().st_size if lora else None,
        "precision": json.loads((out / "run.json").read_text())["summary"]["precision"],
    }


def case_trl(base: Path, data: Path, out: Path, steps: int, bf16: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from llmctl.core.model import quiet_transformers

    quiet_transformers()
    torch.manual_seed(0)
    ids = np.fromfile(data / "train.bin", dtype=np.uint16).astype(np.int64)
    rows = [{"input_ids": ids[i : i + CONTEXT].tolist()} for i in range(0, CONTEXT * BATCH * (steps + 1), CONTEXT)]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = ["c_attn", "c_proj", "c_fc"] if model.config.model_type == "gpt2" else [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets, bias="none",
                             fan_in_fan_out=model.config.model_type == "gpt2", task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.eos_token
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH, max_length=CONTEXT,
                     learning_rate=1e-3, warmup_steps=1, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, bf16=bf16, dataloader_num_workers=0, packing=False, seed=0,
                     optim="adamw_torch_fused", disable_tqdm=True)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter())

    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Clock()])
    trainer.train()
    return {"tokens_per_s": BATCH * CONTEXT * (len(times) - 1) / (times[-1] - times[0]), "precision":
            "bf16" if bf16 else "fp32"}


def run_case(args) -> None:
    base, data, out = Path(args.base), Path(args.data), Path(args.out)
    if args.case == "trl":
        result = case_trl(base, data, out, args.steps, args.bf16)
    else:
        result = case_llmctl(base, data, out, args.steps, lora=args.case.startswith("lora"),
                             recompute=args.case == "lora-ckpt")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# The whole benchmark


def spawn(case: str, base: Path, data: Path, out: Path, steps: int, bf16: bool = False) -> dict | str:
    cmd = [sys.executable, __file__, "--case", case, "--base", str(base), "--data", str(data), "--out", str(out),
           "--steps", str(steps)] + (["--bf16"] if bf16 else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return f"failed (exit {proc.returncode}): {tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per case (the first is not timed)")
    parser.add_argument("--skip-trl", action="store_true", help="leave out the trl + peft baseline")
    parser.add_argument("--case", choices=["full", "lora", "lora-ckpt", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        run_case(args)
        return
    import importlib.util

    have_trl = importlib.util.find_spec("trl") is not None and not args.skip_trl
    if not have_trl and not args.skip_trl:
        print("trl is not installed (pip install -e '.[bench]'): the trl + peft column is left out", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        root = Path(tmp)
        for shape in args.shapes:
            base, data = root / f"{shape}-base", root / f"{shape}-data"
            make_base(shape, base)
            make_data(shape, base, data, CONTEXT * BATCH * (args.steps + 4) * 2)
            model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
            results = {}
            for case in ("full", "lora", "lora-ckpt"):
                results[case] = spawn(case, base, data, root / f"{shape}-{case}", args.steps)
            if have_trl:
                lora = results["lora"]
                bf16 = isinstance(lora, dict) and lora["precision"] == "bf16"
                results["trl"] = spawn("trl", base, data, root / f"{shape}-trl", args.steps, bf16=bf16)
            report(shape, model_bytes, results)


def report(shape: str, model_bytes: int, results: dict) -> None:
    print(f"\n{shape}: {model_bytes / 1e6:.0f} MB of weights, context {CONTEXT}, batch {BATCH}, LoRA r={RANK}")
    print(f"  {'case':<10}{'precision':>10}{'tokens/s':>11}{'peak RSS MB':>13}{'checkpoint MB':>15}")
    for case, r in results.items():
        if isinstance(r, str):
            print(f"  {case:<10}{r}")
            continue
        ckpt = f"{r['checkpoint_bytes'] / 1e6:.1f}" if r.get("checkpoint_bytes") else "-"
        print(f"  {case:<10}{r['precision']:>10}{r['tokens_per_s']:>11.0f}{r['peak_rss_mb']:>13.0f}{ckpt:>15}")
    full, lora, trl = results.get("full"), results.get("lora"), results.get("trl")
    if not isinstance(lora, dict):
        return
    checks = []
    if isinstance(full, dict):
        checks.append(("peak RSS, LoRA / full", lora["peak_rss_mb"] / full["peak_rss_mb"], "<=", 0.60))
        checks.append(("tokens/s, LoRA / full", lora["tokens_per_s"] / full["tokens_per_s"], ">=", 1.2))
    if isinstance(trl, dict):
        checks.append(("tokens/s, LoRA / trl + peft", lora["tokens_per_s"] / trl["tokens_per_s"], ">=", 1.3))
    recompute = results.get("lora-ckpt")
    if isinstance(recompute, dict) and isinstance(full, dict):
        checks.append(("with activation checkpointing:", None, "", None))
        checks.append(("  peak RSS, LoRA / full", recompute["peak_rss_mb"] / full["peak_rss_mb"], "<=", 0.60))
        checks.append(("  tokens/s, LoRA / full", recompute["tokens_per_s"] / full["tokens_per_s"], ">=", 1.2))
        if isinstance(trl, dict):
            checks.append(("  tokens/s, LoRA / trl + peft", recompute["tokens_per_s"] / trl["tokens_per_s"], ">=",
                           1.3))
    checks.append(("checkpoint / model", lora["checkpoint_bytes"] / model_bytes, "<=", 0.05))
    checks.append(("adapter file / model", lora["adapter_bytes"] / model_bytes, "", None))
    for name, value, op, target in checks:
        if value is None:
            print(f"  {name}")
            continue
        met = "" if target is None else ("  ok" if (value <= target if op == "<=" else value >= target) else "  MISSED")
        goal = f"(target {op} {target})" if target is not None else ""
        print(f"  {name:<30}{value:>8.3f}  {goal}{met}")


if __name__ == "__main__":
    main()
