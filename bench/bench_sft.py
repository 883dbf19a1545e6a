"""SFT speed and quality against trl's SFTTrainer, in one run, on this machine.

    pip install -c constraints.txt -e '.[bench]'      # trl (and peft): the baseline, never a dependency of llmctl
    python bench/bench_sft.py                         # ~3-5 minutes on 2 cores; --steps/--batch/--context to change

Same model (random weights, saved to a directory both load), data, batch, learning rate, schedule and steps:
prompt/completion examples whose lengths vary 10x (20 to 200 tokens), answer-only loss, the byte tokenizer (so both
tokenize identically). Cases: a 4-layer, 256-wide Llama and the 6-layer, 384-wide GPT-2. Prints, per case:
  - tokens/s of real (non-pad) prompt+answer tokens: llmctl (its defaults: packing, bf16 autocast where the CPU has
    AMX and the model is 256+ wide) against trl (its defaults, fp32, and with bf16=True), target >= 1.5x the better;
  - packing against llmctl's own padded path (sft.packing: false, batches in shuffled order as trl draws them),
    target >= 2x, and against padded length-grouped batches (sft.group_by_length, the unpacked default);
  - the answer-only validation loss after the same steps, both models scored by `llmctl eval --task sft` on the
    same held-out file: llmctl unpacked (the same examples per step as trl) within 3% of trl's.
No thresholds are asserted: the ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

WORDS = "the a river garden quiet lamp morning ship window letter market meadow candle bright narrow heavy".split()


def write_data(path: Path, n: int, seed: int) -> None:
    """Prompt/completion pairs of 20 to 200 bytes in all (the byte tokenizer: 20 to 200 tokens)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            total = rng.randint(20, 200)
            words = []
            while len(" ".join(words)) < total:
                words.append(rng.choice(WORDS))
            text = " ".join(words)[:total]
            cut = max(4, int(total * rng.uniform(0.3, 0.7)))
            f.write(json.dumps({"prompt": text[:cut], "completion": text[cut:]}) + "\n")


def make_model(kind: str, path: Path) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from llmctl.core.tokenizer import byte_tokenizer, to_transformers

    tok = to_transformers(byte_tokenizer(["<|endoftext|>"]), "<|endoftext|>")
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                             bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    else:
        config = GPT2Config(vocab_size=len(tok), n_embd=384, n_layer=6, n_head=6, n_positions=1024,
                            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, activation_function="gelu")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)


def run_llmctl(model: Path, data: Path, out: Path, args, packing: bool, grouped: bool = True) -> dict:
    from llmctl import train
    from llmctl.config import config_from_dict

    raw = {
        "run": {"out_dir": str(out), "seed": 0},
        "data": {"inputs": [str(data)], "val_fraction": 0.0},
        "model": {"pretrained": str(model)},
        "sft": {"chat_template": "none", "packing": packing, "group_by_length": grouped},
        "optim": {"lr": args.lr, "min_lr": 0.0, "weight_decay": 0.0, "beta2": 0.999, "warmup_steps": 0,
                  "schedule": "linear", "grad_clip": 1.0},
        "train": {"task": "sft", "max_steps": args.steps, "batch_size": args.batch, "context": args.context,
                  "eval_interval": 0, "checkpoint_interval": 0, "log_interval": args.steps},
    }
    summary = train.run(config_from_dict(raw), quiet=True, force=True)
    return {"tokens_per_s": summary["tokens"] / summary["train_time_s"], "precision": summary["precision"],
            "dir": out}


def run_trl(model: Path, data: Path, out: Path, args, bf16: bool) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model)
    dataset = load_dataset("json", data_files=str(data), split="train")
    config = SFTConfig(
        output_dir=str(out / "trl-out"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        completion_only_loss=True, max_length=args.context, use_cpu=True, bf16=bf16, report_to=[],
        save_strategy="no", logging_steps=args.steps, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model), args=config, train_dataset=dataset,
                         processing_class=tok)
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        counted["tokens"] += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trainer.save_model(str(out))
    tok.save_pretrained(out)
    return {"tokens_per_s": counted["tokens"] / seconds, "precision": "bf16" if bf16 else "fp32", "dir": out}


def answer_loss(model_dir: Path, val: Path) -> float:
    from llmctl import evaluate
    from llmctl.config import config_from_dict

    cfg = config_from_dict({"sft": {"chat_template": "none"},
                            "eval": {"model": str(model_dir), "task": "sft", "input": str(val), "batch_size": 16,
                                     "precision": "fp32"}})
    return evaluate.run(cfg)["metrics"]["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--cases", default="llama,gpt2")
    args = parser.parse_args()
    import logging

    logging.getLogger("llmctl").setLevel(logging.ERROR)
    print(f"# bench_sft: {args.steps} steps of batch {args.batch}, context {args.context}, lr {args.lr}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, val = tmp / "train.jsonl", tmp / "val.jsonl"
        write_data(data, 4000, 1)
        write_data(val, 200, 2)
        for kind in args.cases.split(","):
            model = tmp / f"{kind}-base"
            make_model(kind, model)
            runs = {
                "llmctl packed": run_llmctl(model, data, tmp / f"{kind}-packed", args, packing=True),
                "llmctl grouped": run_llmctl(model, data, tmp / f"{kind}-grouped", args, packing=False),
                "llmctl padded": run_llmctl(model, data, tmp / f"{kind}-padded", args, packing=False, grouped=False),
                "trl fp32": run_trl(model, data, tmp / f"{kind}-trl32", args, bf16=False),
                "trl bf16": run_trl(model, data, tmp / f"{kind}-trl16", args, bf16=True),
            }
            print(f"\n## {kind}: " + ("4 x 256 Llama" if kind == "llama" else "6 x 384 GPT-2"))
            print(f"{'run':<16}{'precision':>10}{'tokens/s':>12}{'val loss':>11}")
            for name, r in runs.items():
                r["val_loss"] = answer_loss(r["dir"], val)
                print(f"{name:<16}{r['precision']:>10}{r['tokens_per_s']:>12,.0f}{r['val_loss']:>11.4f}")
            best_trl = max(runs["trl fp32"]["tokens_per_s"], runs["trl bf16"]["tokens_per_s"])
            speed = runs["llmctl packed"]["tokens_per_s"] / best_trl
            packing = runs["llmctl packed"]["tokens_per_s"] / runs["llmctl padded"]["tokens_per_s"]
            trl_loss = runs["trl fp32"]["val_loss"]
            parity = runs["llmctl padded"]["val_loss"] / trl_loss - 1
            print(f"speed vs the faster trl run:     {speed:.2f}x (target >= 1.5x)")
            grouped = runs["llmctl packed"]["tokens_per_s"] / runs["llmctl grouped"]["tokens_per_s"]
            print(f"packing vs padded (real tok/s):  {packing:.2f}x (target >= 2x); vs length-grouped padding "
                  f"{grouped:.2f}x")
            print(f"val loss, llmctl padded vs trl:  {parity:+.1%} (target within 3%); packed: "
                  f"{runs['llmctl packed']['val_loss'] / trl_loss - 1:+.1%} (it saw more examples)")


if __name__ == "__main__":
    main()
