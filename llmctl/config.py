"""One experiment = one YAML file. This module knows YAML and the schema; nothing else does.

Each YAML section maps to one dataclass below, and each field carries its default and a docstring. `load_config`
reads a file, applies `--set section.key=value` overrides, checks every value against its field's type and the
section's own rules, and raises one `ConfigError` listing every problem found, each with its dotted path.
Unknown keys get a did-you-mean suggestion.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from llmctl.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------------
# Ranges shared by several sections (and by generate's per-line JSONL settings)

MAX_SEED = 2**64 - 1
"""torch.manual_seed accepts seeds up to this."""
MAX_TEMPERATURE = 100.0
"""Far past the point where sampling is uniform; a larger value is a typo, not a setting."""
MAX_REPETITION_PENALTY = 100.0

ACTIVATIONS = (
    "gelu", "gelu_10", "gelu_accurate", "gelu_fast", "gelu_new", "gelu_python", "gelu_python_tanh",
    "gelu_pytorch_tanh", "hardswish", "laplace", "leaky_relu", "linear", "mish", "prelu", "quick_gelu", "relu",
    "relu2", "relu6", "sigmoid", "silu", "swish", "tanh",
)
"""transformers' ACT2FN names (5.x), so that checking a config needs no import of transformers; a name outside
this list is looked up in ACT2FN itself before it is refused."""


ATTENTION_KERNELS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
"""The attention kernels transformers' attn_implementation takes (the last three need a GPU and their package)."""


def seed_problems(key: str, seed: int | None) -> list[str]:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        return [f"{key}: {seed} is outside the seeds torch accepts (0 to 2**64 - 1)"]
    return []


def _known_activation(name: str) -> bool:
    if name in ACTIVATIONS:
        return True
    from transformers.activations import ACT2FN

    return name in ACT2FN


# ---------------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    """Run directory: `train` writes the model, checkpoints and metrics here; `generate` and `eval` load the model
    from here when no other model is named."""
    seed: int = 1337
    """Seed for every random choice (initialisation, batch order, sampling): same seed, same result."""
    device: str = "auto"
    """`auto` (cuda, then mps, then cpu), `cpu`, `cuda`, `cuda:N` or `mps`."""
    threads: int = 0
    """CPU threads torch may use; 0 keeps torch's own choice (one per physical core)."""
    trust_remote_code: bool = False
    """Allow a hub model to run Python code it ships. Off by default: such code runs with your permissions."""

    def check(self) -> list[str]:
        problems = []
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            problems.append(f"device: must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}")
        if self.threads < 0:
            problems.append("threads: must be 0 (torch's default) or a positive count")
        problems += seed_problems("seed", self.seed)
        return problems


@dataclass
class DataConfig:
    inputs: list[str] = field(default_factory=list)
    """Raw text to prepare: files, directories (searched with `glob`), `-` for stdin, or `stdlib:pydoc-topics`
    (the documentation topics every Python carries: about 460 KB of English, always offline)."""
    dir: str = "data/prepared"
    """Prepared data directory: `preprocess` writes train.bin, val.bin, meta.json and the tokenizer here and
    `train` reads them from here."""
    glob: list[str] = field(default_factory=lambda: ["*.txt", "*.jsonl", "*.txt.gz", "*.jsonl.gz"])
    """File name patterns taken from directories named in `inputs` (searched recursively)."""
    format: Literal["auto", "txt", "jsonl", "parquet", "csv", "tsv"] = "auto"
    """Input format; `auto` goes by the name: `.jsonl`/`.ndjson` are JSONL, `.parquet`/`.pq` Parquet, `.csv` and
    `.tsv` CSV/TSV with a header line (`.gz` allowed), a `save_to_disk` directory and `hf:NAME[:CONFIG][@SPLIT]`
    Hugging Face datasets; all else is text. Parquet and datasets need `pip install 'llmctl[data]'`."""
    text_field: str = "text"
    """The field (column) holding the text in JSONL, Parquet, CSV/TSV and dataset inputs."""
    label_field: str = "label"
    """The field (column) holding the label in labeled inputs (classification)."""
    documents: Literal["file", "paragraph", "line"] = "paragraph"
    """How a text input splits into documents: the whole file, blank-line-separated paragraphs, or single lines.
    A JSONL input always has one document per line."""
    encoding_errors: Literal["replace", "skip"] = "replace"
    """Invalid UTF-8: `replace` the bad bytes with U+FFFD, or `skip` the whole document. Either way it is counted."""
    val_fraction: float = 0.1
    """Share of the tokens (or documents) held out for validation."""
    split: Literal["tail", "documents"] = "tail"
    """Validation split: the `tail` of the token stream (as nanoGPT does: with one input and `documents: file`, val
    is exactly the last val_fraction of the text) or whole `documents` drawn by run.seed."""
    text_format: Literal["lines", "blocks", "jsonl"] = "lines"
    """`preprocess --to-text` output: one document per line (its line breaks become spaces), documents separated by
    a blank line (line breaks kept), or one JSON object per document with the text in `text_field`."""
    chunk_bytes: int = 4_000_000
    """Input is cleaned and encoded in chunks of about this many bytes, cut at document boundaries; memory use is a
    small multiple of it per worker. A document larger than a chunk is processed in pieces."""
    workers: int = 0
    """Processes that clean and encode; 0 means one per CPU core."""

    def check(self) -> list[str]:
        problems = []
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append("val_fraction: must be at least 0 and below 1")
        if self.chunk_bytes < 4096:
            problems.append("chunk_bytes: must be at least 4096")
        if self.workers < 0:
            problems.append("workers: must be 0 (one per core) or more")
        if not self.glob:
            problems.append("glob: needs at least one pattern")
        return problems


@dataclass
class CleanConfig:
    normalize: bool = True
    """Unicode NFKC normalisation (full-width letters, ligatures and the like become their plain forms)."""
    cleanup: bool = True
    """Drop control characters and byte-order marks, strip trailing spaces, squeeze runs of blank lines into one.
    (CRLF and CR always become LF when text is read.)"""
    lowercase: bool = False
    """Lowercase everything."""
    min_chars: int = 1
    """Drop documents shorter than this many characters after cleanup (empty documents always go)."""
    max_chars: int = 0
    """Drop documents longer than this many characters; 0 keeps every length."""
    dedup: bool = False
    """Drop exact duplicate documents (after the stages above)."""
    sentences: bool = False
    """Split documents into sentences with NLTK Punkt, one sentence per line (your punkt_tab data if installed, else
    Punkt trained on the start of the input itself)."""
    punkt_sample_bytes: int = 1_000_000
    """Without punkt data: train Punkt on this many bytes from the start of the input (filter output waits for them)."""
    words: bool = False
    """Split each line into words with NLTK's word tokenizer (needs no downloaded data), joined by single spaces."""
    stopwords: bool = False
    """Remove English stop words (NLTK's list if installed, scikit-learn's otherwise). Implies `words`."""
    stem: Literal["none", "porter", "snowball"] = "none"
    """Stem each word. Implies `words`. Stop words and stemming ruin text for language modelling: keep them off
    except for classic NLP pipelines."""

    def check(self) -> list[str]:
        problems = []
        if self.min_chars < 0:
            problems.append("min_chars: must be 0 or more")
        if self.max_chars < 0:
            problems.append("max_chars: must be 0 (no limit) or more")
        if self.max_chars and self.max_chars < self.min_chars:
            problems.append("max_chars: must not be below min_chars")
        if self.punkt_sample_bytes <= 0:
            problems.append("punkt_sample_bytes: must be positive")
        return problems


@dataclass
class TokenizerConfig:
    pretrained: str | None = None
    """Reuse the tokenizer of this model (local directory or hub id) instead of training one."""
    vocab_size: int = 8192
    """Size of the byte-level BPE vocabulary to train, special tokens included; 256 means plain bytes (ids are the
    UTF-8 byte values, the end-of-text token is 256: the character-level baseline, no training)."""
    min_frequency: int = 2
    """A pair must occur at least this often to become a merge."""
    sample_bytes: int = 20_000_000
    """Train the tokenizer on about this many bytes of input, taken in chunks spread evenly over the whole corpus;
    the whole corpus is still encoded. Bounds training time and memory on large corpora."""
    eos_token: str = "<|endoftext|>"
    """End-of-text token placed between documents."""

    def check(self) -> list[str]:
        problems = []
        if self.vocab_size < 256:
            problems.append(
                f"vocab_size: {self.vocab_size} is too small for the 256 byte ids and the end-of-text token; use 256 "
                "(plain bytes) or at least 257 (byte-level BPE)"
            )
        if not self.eos_token:
            problems.append("eos_token: must not be empty")
        if self.min_frequency < 1:
            problems.append("min_frequency: must be at least 1")
        if self.sample_bytes <= 0:
            problems.append("sample_bytes: must be positive")
        return problems


@dataclass
class ModelConfig:
    pretrained: str | None = None
    """Fine-tune this causal LM (local directory or hub id); unset trains a GPT-2 from scratch with the shape below."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 128
    """Width of the residual stream."""
    n_positions: int = 256
    """Longest sequence the model can see (its position table)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and MLP; 0 for small data and short runs, where it only slows learning."""
    activation: str = "gelu"
    """MLP activation (a transformers ACT2FN name). `gelu` (exact, erf form) because torch's CPU kernel for it runs
    forward and backward about twice as fast as the tanh approximation; `gelu_pytorch_tanh` (= GPT-2's `gelu_new`,
    as one fused kernel) reproduces the original GPT-2."""
    attn_implementation: str = "sdpa"
    """Attention kernel: `sdpa` (torch's fused scaled_dot_product_attention) or `eager`."""
    lean: bool = True
    """Train GPT-2 models with llmctl's lean forward pass (the same weights and function as transformers' GPT-2,
    without its per-layer bookkeeping: 1.2-1.5x faster steps on small models). Off uses transformers' forward."""

    def check(self) -> list[str]:
        problems = []
        for name in ("n_layer", "n_head", "n_embd", "n_positions"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}: must be positive")
        if self.n_head > 0 and self.n_embd % self.n_head:
            problems.append(f"n_embd: {self.n_embd} is not a multiple of n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout: must be at least 0 and below 1")
        if not _known_activation(self.activation):
            close = difflib.get_close_matches(self.activation, ACTIVATIONS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"expected one of {', '.join(ACTIVATIONS)}"
            problems.append(f"activation: unknown activation {self.activation!r}; {hint}")
        if self.attn_implementation not in ATTENTION_KERNELS:
            problems.append(f"attn_implementation: must be one of {', '.join(ATTENTION_KERNELS)}, not "
                            f"{self.attn_implementation!r}")
        return problems


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"
    """`adamw`, or `muon` (torch.optim.Muon on the 2-D hidden weights, AdamW on embeddings, norms and biases)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW's; Muon's is `muon_lr`)."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine schedule."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices and embeddings only (tensors of 2 or more dimensions)."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.99
    """AdamW's second-moment decay; 0.99 rather than 0.999 because small-batch runs are noisy."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    muon_lr: float = 0.02
    """Muon's learning rate for the hidden matrices (only with name: muon)."""
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """After warmup: stay `constant`, decay `linear`ly to 0 (as get_linear_schedule_with_warmup), or follow a
    `cosine` down to min_lr."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to the peak learning rate."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""

    def check(self) -> list[str]:
        problems = []
        if not 0 < self.lr <= 1:
            problems.append("lr: must be above 0 and at most 1")
        if 0 < self.lr and (self.min_lr < 0 or self.min_lr > self.lr):
            problems.append("min_lr: must be between 0 and lr")
        if self.weight_decay < 0:
            problems.append("weight_decay: must be 0 or more")
        # Decoupled decay multiplies the weights by (1 - lr x weight_decay) each step: at 1 or more they flip sign
        # or vanish, and the loss becomes NaN a few steps later.
        rates = [("lr", self.lr)] + ([("muon_lr", self.muon_lr)] if self.name == "muon" else [])
        for key, rate in rates:
            if self.weight_decay > 0 and rate * self.weight_decay >= 1:
                problems.append(
                    f"weight_decay: {self.weight_decay:g} x {key} {rate:g} = {rate * self.weight_decay:g}; each step "
                    f"scales the weights by 1 - {key} x weight_decay, so the product must stay well below 1 "
                    f"(typical weight_decay: 0 to 0.1)"
                )
        if not 0 < self.eps <= 1:
            problems.append("eps: must be above 0 and at most 1 (typical: 1e-8)")
        if not 0 < self.muon_lr <= 1:
            problems.append("muon_lr: must be above 0 and at most 1 (typical: 0.02)")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name}: must be at least 0 and below 1")
        if self.warmup_steps < 0:
            problems.append("warmup_steps: must be 0 or more")
        if self.grad_clip < 0:
            problems.append("grad_clip: must be 0 (off) or more")
        return problems


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (through Hugging Face peft) instead of every weight: the base weights stay frozen and only
    the adapters (and `modules_to_save`) get gradients and optimizer state. Works with every `train.task`."""
    rank: int = 16
    """Rank r of each adapter (the inner width of its two small matrices); at most the smaller side of each layer."""
    alpha: float = 32.0
    """LoRA's scale numerator: an adapter's update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input; 0 saves a copy of every adapted layer's input per step."""
    target_modules: list[str] = field(default_factory=lambda: ["auto"])
    """Layers that get adapters, by module name (the last part, as `c_attn`, or a longer dotted suffix). `auto`: the
    attention and MLP projections of GPT-2 (c_attn, c_proj, c_fc) and Llama-family models (q/k/v/o_proj,
    gate/up/down_proj), else peft's own default for the model type."""
    modules_to_save: list[str] = field(default_factory=lambda: ["auto"])
    """Modules trained in full beside the adapters, by name. `auto`: the classification head (`score`,
    `classifier`) with `train.task: classification`, nothing otherwise; `[]` trains none."""
    save: Literal["merged", "adapter"] = "merged"
    """`merged`: the run directory holds the model with the adapters merged in (plain transformers loads it) and
    `adapter/` in peft's format; `adapter`: only `adapter/` and the tokenizer (for large models: generate and eval
    load the base and merge in memory)."""
    quantize: Literal["none", "4bit"] = "none"
    """`4bit` loads the base weights in 4-bit NF4 (QLoRA): needs a CUDA GPU, bitsandbytes (`pip install
    'llmctl[qlora]'`), a pretrained model and `save: adapter`."""

    def check(self) -> list[str]:
        problems = []
        if self.rank <= 0:
            problems.append(f"rank: must be positive, not {self.rank}")
        if self.alpha <= 0:
            problems.append("alpha: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout: must be at least 0 and below 1")
        if not self.target_modules:
            problems.append("target_modules: needs at least one module name (or auto)")
        if "auto" in self.target_modules and len(self.target_modules) > 1:
            problems.append("target_modules: auto stands alone; list module names or write auto")
        if "auto" in self.modules_to_save and len(self.modules_to_save) > 1:
            problems.append("modules_to_save: auto stands alone; list module names or write auto")
        if self.quantize == "4bit" and self.save == "merged":
            problems.append("quantize: 4bit base weights cannot be merged exactly; set lora.save: adapter")
        return problems


@dataclass
class TrainConfig:
    task: Literal["causal_lm", "classification", "sft"] = "causal_lm"
    """`causal_lm` trains next-token prediction on the prepared shards; `classification` fine-tunes a
    sequence-classification head on labeled data (`data.inputs`: JSONL or TSV with text and label); `sft`
    fine-tunes on instruction examples (`data.inputs`: JSONL of prompt/completion or chat messages; see `sft:`)."""
    max_steps: int = 2000
    """Optimizer steps to run; 0 means no step limit (then max_tokens or max_time must be set)."""
    max_tokens: int = 0
    """Stop after this many training tokens; 0 means no limit."""
    max_time: float = 0.0
    """Stop after this many seconds of training; 0 means no limit."""
    batch_size: int = 12
    """Sequences per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    context: int | None = None
    """Tokens per training sequence; unset uses the model's n_positions."""
    eval_interval: int = 250
    """Measure validation loss (and save a checkpoint) every this many steps; 0 only at the end."""
    eval_batches: int = 20
    """Batches per validation measurement; 0 means the whole validation split."""
    log_interval: int = 10
    """Write a metrics line every this many steps."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision (autocast; fp16 adds loss scaling). `auto` is bf16 on GPUs that support it and on CPUs with
    AMX for models 256 or more wide (2x faster there, same loss), fp32 elsewhere (bf16 crawls on CPUs without AMX)."""
    compile: bool = False
    """Compile the model with torch.compile; off because on small models its start-up time outweighs its gain."""
    activation_checkpointing: bool = False
    """Keep only each transformer block's input in the forward pass and recompute the rest in the backward pass:
    activations take a block's worth instead of every block's, for about a third more compute per step. Pays where
    activations dominate memory: LoRA fine-tuning, long contexts."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep (the best one is kept as well)."""
    resume: Literal[False, True, "auto"] = False
    """Continue from the last checkpoint: `true` requires one, `auto` resumes when there is one (for cron)."""
    epochs: float = 0.0
    """Stop after this many passes over the training data (tokens for causal_lm, examples for classification);
    0 means no limit. With several limits set, the first one reached stops the run."""
    checkpoint_interval: int | None = None
    """Save a checkpoint every this many steps; unset follows eval_interval; 0 saves only at the end. Checkpoints
    are what `--resume` continues from."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "png"])
    """Where training metrics go, several at once: `jsonl` (metrics.jsonl, always written), `png` (loss.png at the
    end), `tensorboard` (RUN/tensorboard), `wandb` (offline unless WANDB_MODE is set; RUN/wandb) and `mlflow` (a
    file store in RUN/mlruns unless MLFLOW_TRACKING_URI is set). The last three are extras:
    `pip install 'llmctl[tensorboard]'` and so on."""
    fsdp: bool = False
    """Under torchrun, shard parameters, gradients and optimizer state over the processes (FSDP2, one unit per
    transformer block) instead of replicating them (DDP): for models that do not fit one device."""

    def check(self) -> list[str]:
        problems = []
        for name in ("max_steps", "max_tokens", "eval_interval", "eval_batches", "log_interval", "keep_checkpoints"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be 0 or more")
        for name in ("max_time", "epochs"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be 0 or more")
        if self.checkpoint_interval is not None and self.checkpoint_interval < 0:
            problems.append("checkpoint_interval: must be 0 or more")
        if not (self.max_steps or self.max_tokens or self.max_time or self.epochs):
            problems.append("max_steps: one of max_steps, max_tokens, max_time or epochs must be set")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}: must be positive")
        if self.context is not None and self.context <= 0:
            problems.append("context: must be positive")
        known = ("jsonl", "png", "tensorboard", "wandb", "mlflow")
        for name in self.loggers:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]}?" if close else f"expected {', '.join(known)}"
                problems.append(f"loggers: unknown logger {name!r}; {hint}")
        return problems


@dataclass
class SftConfig:
    prompt_field: str = "prompt"
    """The field holding the prompt in prompt/completion examples."""
    completion_field: str = "completion"
    """The field holding the answer in prompt/completion examples."""
    messages_field: str = "messages"
    """The field holding a conversation (a list of {role, content}, roles system, user and assistant)."""
    chat_template: str = "auto"
    """`auto`: the tokenizer's own chat template, if it has one; a built-in one by name (`chatml`, `llama3`,
    `zephyr`; their markers are added to the tokenizer as special tokens when it lacks them); a `.jinja` file; or a
    Jinja string. `none` (or `auto` without one) joins prompt + completion + end-of-text instead, which only
    prompt/completion data can use. The template used is saved with the run's tokenizer."""
    system: str | None = None
    """A system message put before every conversation that has none."""
    train_on_prompt: bool = False
    """Take the loss on every token; off (the default) takes it on answer tokens only (each assistant turn or
    completion and the end-of-turn token that closes it)."""
    packing: bool = True
    """Pack short examples into context-length rows, positions restarting and attention kept within each example
    (exact: the same loss per example as unpacked); off pads one example per row, in length-grouped batches."""
    group_by_length: bool = True
    """Without packing: batch examples of similar length together (sorted within windows of 64 batches, the batches
    then shuffled), so that little is padded; off draws each batch in plain shuffled order."""
    truncation: Literal["cut", "drop", "fail"] = "cut"
    """An example longer than the context: `cut` it to the context (dropped, and counted, when no answer token is
    left), `drop` it (counted), or `fail` naming its file:line."""
    validation: str | None = None
    """A separate JSONL file of validation examples; unset holds out data.val_fraction of the examples."""

    def check(self) -> list[str]:
        problems = []
        for name in ("prompt_field", "completion_field", "messages_field"):
            if not getattr(self, name):
                problems.append(f"{name}: must not be empty")
        if self.prompt_field == self.completion_field:
            problems.append("completion_field: must differ from prompt_field")
        if not self.chat_template:
            problems.append("chat_template: must not be empty (auto, none, a built-in name, a file or Jinja)")
        return problems


@dataclass
class GenerateConfig:
    model: str | None = None
    """Model to sample from (run directory, model directory or hub id); unset uses run.out_dir."""
    prompts: list[str] = field(default_factory=list)
    """Prompts to complete; when empty, prompts are read from `input`."""
    input: str = "-"
    """Where prompts come from when `prompts` is empty: a file, or `-` for stdin."""
    input_format: Literal["lines", "text", "jsonl"] = "lines"
    """The input holds one prompt per line (empty lines are skipped), one prompt in all (`text`), or JSONL
    objects with a `prompt` field and optional per-line `id`, `max_new_tokens`, `temperature`, `top_k`, `top_p`,
    `repetition_penalty`, `stop` and `seed`."""
    output_format: Literal["text", "jsonl"] = "text"
    """Plain completions, one after another, each ended by a newline; or one JSON object per completion (id,
    index, prompt, completion, prompt_tokens, tokens, finish_reason, seed, time_s)."""
    echo: bool = False
    """Text output: print the prompt before its completion."""
    max_new_tokens: int = 128
    """Tokens to generate per completion at most."""
    do_sample: bool = True
    """Sample; false decodes greedily (as does temperature 0)."""
    temperature: float = 0.8
    """Softmax temperature; below 1 is more conservative, 0 is greedy."""
    top_k: int = 50
    """Sample from the k most likely tokens only; 0 turns it off."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens whose probability reaches p; 1 turns it off."""
    repetition_penalty: float = 1.0
    """Penalise tokens already present in the prompt or completion (CTRL-style, as transformers does); 1 is off."""
    stop: list[str] = field(default_factory=list)
    """Cut a completion at the first occurrence of any of these strings (finish_reason `stop`)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-text token (fixed-length samples, benchmarks)."""
    num_return_sequences: int = 1
    """Completions per prompt."""
    batch_size: int = 8
    """Prompts decoded together."""
    continuous: bool = True
    """Continuous batching: when a completion ends, the next prompt takes its row at once instead of waiting for
    the whole batch (on the lean GPT-2 and Llama paths; the generic path decodes batch after batch). Output is the
    same bytes either way; false decodes static batches (for comparison)."""
    seed: int | None = None
    """Sampling seed; unset uses run.seed. Each prompt's randomness derives from it and the prompt's position
    (or its JSONL `id`), so outputs do not depend on batching."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Weights and compute dtype; `auto` is bf16 on GPUs that support it and fp32 elsewhere."""
    batch_invariant: bool = True
    """GPT-2 and Llama on CPU: each prompt's output is the same, bit for bit, however prompts are batched (matrix
    products take rows in counts the machine's BLAS sums alike, measured at load: see docs/generate.md; on CPUs that
    sum rows in tiles, batch sizes 1-3 and 4+ form two such groups). False lets every product take its rows as they
    come: faster where the BLAS needs padding or pieces (up to 1.7x at batch 8 on an AMD EPYC), but a sampled token
    can then differ now and then between batch sizes, and continuous batching from static batches."""
    speculate: bool = True
    """Decoding a lone prompt (batch 1, or the last prompt of a batch) guesses each next token from the text so far
    (the token that followed the latest earlier occurrence of the last 1-3 tokens) and checks the guess in the same
    step, on the lean GPT-2 path with batch_invariant. Output is exactly the same, greedy or sampled; repetitive text
    comes out up to twice as fast, a wrong guess costs about 5%, and guessing pauses while guesses keep failing."""
    on_error: Literal["fail", "skip"] = "fail"
    """A malformed input line stops the run (`fail`) or is skipped and counted (`skip`)."""
    chat: bool = False
    """Render each prompt as a user turn through the model's chat template (with the generation prompt) and stop at
    the template's end-of-turn marker as well as at end-of-text; JSONL input may hold `messages` instead of
    `prompt`. The model must have a chat template (an sft run saves the one it trained with)."""
    system: str | None = None
    """With chat: a system message put before each conversation that has none."""

    def check(self) -> list[str]:
        problems = []
        if self.max_new_tokens <= 0:
            problems.append("max_new_tokens: must be positive")
        if self.temperature < 0:
            problems.append("temperature: must be 0 or more")
        if self.top_k < 0:
            problems.append("top_k: must be 0 (off) or more")
        if not 0.0 < self.top_p <= 1.0:
            problems.append("top_p: must be above 0 and at most 1")
        if self.temperature > MAX_TEMPERATURE:
            problems.append(f"temperature: must be at most {MAX_TEMPERATURE:g}")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            problems.append(f"repetition_penalty: must be above 0 and at most {MAX_REPETITION_PENALTY:g} (1 is off)")
        for name in ("num_return_sequences", "batch_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}: must be positive")
        problems += seed_problems("seed", self.seed)
        if any(not s for s in self.stop):
            problems.append("stop: stop strings must not be empty")
        return problems


@dataclass
class EvalConfig:
    model: str | None = None
    """Model to evaluate (run directory, model directory or hub id); unset uses run.out_dir."""
    task: Literal["auto", "lm", "classification", "zero_shot", "sft", "generation"] = "auto"
    """`lm` (loss, perplexity, bits per byte of held-out text), `classification` (a model with a classification
    head, such as a `train.task: classification` run, on a labeled file), `zero_shot` (any causal LM classifies a
    labeled file by the likelihood of each label's verbalizer), `sft` (loss and perplexity on the answer tokens of
    a prompt/completion or messages file, as train.task sft takes them), `generation` (greedy answers to the prompts
    of such a file, scored against its answers by exact and normalized match), or `auto`: classification for a model
    with a classification head, lm for a causal LM. Prediction files (`predictions`) are always classification."""
    input: str | None = None
    """Held-out text (a file, `-` for stdin, or a prepared data directory, whose validation split is scored) or, for
    classification, a labeled file (JSONL with data.text_field/data.label_field, or TSV text<TAB>label). Unset, lm
    scores the validation split in data.dir."""
    split: Literal["val", "train"] = "val"
    """Which split of a prepared data directory to score."""
    context: int | None = None
    """Window length in tokens; unset uses the model's maximum (at most 4096)."""
    stride: int | None = None
    """Tokens the window advances by (at most context). Each token is scored once, with at least context - stride
    tokens of history; stride = context scores blocks that share one token (fastest). Unset uses half the context."""
    batch_size: int = 8
    """Windows, examples (classification) or prompt+verbalizer rows (zero-shot) per forward pass."""
    add_bos: bool = True
    """Put the tokenizer's beginning-of-text token (its end-of-text token when it has none, as GPT-2) before the
    text so that its first token is scored too. Off, or with neither token, the first token has no history and is
    not scored (nor counted)."""
    max_tokens: int = 0
    """Score only the first this-many tokens of the text or split (a quick check in CI); 0 scores everything."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision; `auto` is bf16 on GPUs that support it and fp32 elsewhere."""
    labels: list[str] = field(default_factory=list)
    """Zero-shot and prediction files: the labels, in order (metrics, matrix and scores follow it). Unset uses the
    keys of `verbalizers`, else the sorted labels of the data. A classification head's labels come from the model."""
    verbalizers: dict[str, str] = field(default_factory=dict)
    """Zero-shot: the text that stands for each label after the prompt (label -> text); unset uses a space and the
    label itself. When set, every gold label must have one."""
    prompt_template: str = "{text}\nSentiment:"
    """Zero-shot: the prompt each verbalizer follows; `{text}` is replaced by the example's text."""
    length_norm: bool = False
    """Zero-shot: compare verbalizers by their mean log-likelihood per token instead of the sum (fairer when they
    have different token lengths)."""
    predictions: str | None = None
    """Score predictions made elsewhere: a file of predicted labels, one per line, or JSONL with a `predicted`,
    `prediction` or data.label_field field."""
    references: str | None = None
    """The gold labels for `predictions`: one per line, or JSONL with a `gold`, `reference` or data.label_field
    field."""
    id_field: str | None = None
    """Prediction files: match JSONL lines by this field instead of by position. Labeled input: the field that
    names each example in `predictions_out` (default `id`, else the example's position)."""
    predictions_out: str | None = None
    """Classification: write one JSONL line per example here: id, gold, predicted and per-label scores. Generation:
    id, prompt, reference, prediction, exact_match, normalized_match."""
    max_new_tokens: int = 128
    """Generation: tokens to generate per answer at most (an answer also ends at end-of-text or end-of-turn)."""
    output: str | None = None
    """Also write the JSON result to this file."""
    fail_under: dict[str, float] = field(default_factory=dict)
    """Gates: fail (exit 3) when a metric is below its value, for example `accuracy: 0.8`."""
    fail_over: dict[str, float] = field(default_factory=dict)
    """Gates: fail (exit 3) when a metric is above its value, for example `perplexity: 40`."""

    def check(self) -> list[str]:
        problems = []
        if self.batch_size <= 0:
            problems.append("batch_size: must be positive")
        if self.context is not None and self.context < 2:
            problems.append("context: must be at least 2 tokens")
        if self.stride is not None and self.stride <= 0:
            problems.append("stride: must be positive")
        if self.context is not None and self.stride is not None and self.stride > self.context:
            problems.append(f"stride: {self.stride} is longer than the context ({self.context})")
        if self.max_tokens < 0:
            problems.append("max_tokens: must be 0 (everything) or more")
        if self.max_new_tokens <= 0:
            problems.append("max_new_tokens: must be positive")
        if (self.predictions is None) != (self.references is None):
            missing = "references" if self.references is None else "predictions"
            problems.append(f"{missing}: predictions and references go together (--predictions with --references)")
        if self.predictions is not None and self.model is not None:
            problems.append("model: prediction files are scored without a model; drop --model (eval.model) or "
                            "--predictions/--references")
        if self.predictions is not None and self.task in ("lm", "zero_shot"):
            problems.append(f"task: prediction files are scored as classification, not {self.task}")
        if "{text}" not in self.prompt_template:
            problems.append("prompt_template: must contain {text}, where each example's text goes")
        if len(set(self.labels)) != len(self.labels):
            problems.append("labels: each label must appear once")
        for label, text in self.verbalizers.items():
            if not text:
                problems.append(f"verbalizers.{label}: must not be empty")
        if self.labels and self.verbalizers:
            missing = [label for label in self.labels if label not in self.verbalizers]
            if missing:
                problems.append(f"verbalizers: no verbalizer for label(s) {', '.join(missing)} of eval.labels")
        for key in ("fail_under", "fail_over"):
            for metric, value in getattr(self, key).items():
                if not math.isfinite(value):
                    problems.append(f"{key}.{metric}: must be a finite number")
        return problems


@dataclass
class Config:
    """A whole experiment: one field per YAML section."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> None:
        """Write the resolved config (every default filled in) next to what it produced."""
        from llmctl.core.files import atomic_write_text

        atomic_write_text(Path(path), self.to_yaml())


SECTIONS: dict[str, type] = typing.get_type_hints(Config)
"""Section name -> section class, in YAML order."""

# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
) -> Config:
    """Read `path` (or start from the defaults), apply `section.key=value` overrides, then `values` (already
    typed, from dedicated command-line flags, keyed by dotted path), and check everything.

    Raises ConfigError with every problem at once.
    """
    source = str(path) if path is not None else None
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    problems: list[str] = []
    for override in overrides:
        problems += _apply_override(raw, override)
    for key, value in (values or {}).items():
        section_name, _, name = key.partition(".")
        target = raw.setdefault(section_name, {})
        if isinstance(target, dict):
            target[name] = value
    config, found = _build(raw)
    problems += found
    if problems:
        raise ConfigError(problems, source)
    return config


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and check a Config from a plain dict shaped like the YAML (handy in tests and library use)."""
    config, problems = _build(raw)
    if problems:
        raise ConfigError(problems)
    return config


def field_docs(section: type) -> dict[str, str]:
    """The docstring written under each field of a section class, keyed by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(section)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this is not a config (a device such as /dev/zero, a data file passed by mistake)."""


def _read_yaml(path: Path) -> dict[str, Any]:
    from llmctl.core.faults import reading

    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    with reading(path, ConfigError, "cannot read config file"), open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB (stopped after reading "
                          f"{MAX_CONFIG_BYTES >> 20} MiB); is it really a YAML config?")
    with reading(path, ConfigError, "cannot read config file"):
        text = data.decode("utf-8")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run:, data:, train:, ...)")
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping (a second `train:` section) is an error instead
    of silently replacing the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _apply_override(raw: dict[str, Any], override: str) -> list[str]:
    """Apply one `section.key=value` to the raw dict. The value is read as YAML, or as the plain string when the
    field holds strings, so `--set run.out_dir=007` stays the string '007'."""
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or len(parts) < 2 or not all(parts):
        return [f"--set {override}: expected section.key=value"]
    section_name, name, rest = parts[0], parts[1], parts[2:]
    section = SECTIONS.get(section_name)
    hint = None
    if section is not None:
        hints = typing.get_type_hints(section)
        hint = hints.get(name)
        if hint is not None and rest:
            origin = typing.get_origin(_strip_optional(hint))
            if origin is not dict or len(rest) != 1:
                return [f"{key}: {section_name}.{name} has no sub-keys"]
            hint = typing.get_args(_strip_optional(hint))[1]
    value = _parse_override_value(text, hint)
    target = raw.setdefault(section_name, {})
    if not isinstance(target, dict):
        return [f"{section_name}: must be a mapping of keys to values"]
    if rest:
        sub = target.get(name)
        if not isinstance(sub, dict):
            sub = target[name] = {}
        sub[rest[0]] = value
    else:
        target[name] = value
    return []


def _parse_override_value(text: str, hint: Any) -> Any:
    if hint is not None and _accepts_plain_string(hint):
        if text.strip() in ("null", "~") and _is_optional(hint):
            return None
        return text
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _build(raw: dict[str, Any]) -> tuple[Config, list[str]]:
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            problems.append(_unknown(str(name), list(SECTIONS), prefix=""))
            continue
        if values is None:
            values = {}
        if not isinstance(values, dict):
            problems.append(f"{name}: must be a mapping of keys to values, not {_describe(values)}")
            continue
        section, found = _build_section(name, SECTIONS[name], values)
        problems += found
        if section is not None:
            sections[name] = section
    config = Config(**sections)
    return config, problems


def _build_section(name: str, cls: type, values: dict[str, Any]) -> tuple[Any, list[str]]:
    problems = []
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            problems.append(_unknown(str(key), list(hints), prefix=f"{name}."))
            continue
        converted, error = _convert(value, hints[key])
        if error and isinstance(value, dict) and typing.get_origin(_strip_optional(hints[key])) is dict:
            problems.append(f"{name}.{key}.{error}")  # the error starts with the sub-key: eval.fail_under.accuracy
        elif error:
            problems.append(f"{name}.{key}: {error}")
        else:
            kwargs[key] = converted
    section = cls(**kwargs)
    if not problems:
        problems += [f"{name}.{problem}" for problem in section.check()]
    return section, problems


def _unknown(key: str, known: list[str], prefix: str) -> str:
    what = "unknown key" if prefix else "unknown section"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"{prefix}{key}: {what}; did you mean {prefix}{close[0]}?"
    return f"{prefix}{key}: {what}; expected one of: {', '.join(known)}"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _is_optional(hint: Any) -> bool:
    return _is_union(hint) and type(None) in typing.get_args(hint)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _strip_optional(hint: Any) -> Any:
    if _is_union(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _accepts_plain_string(hint: Any) -> bool:
    hint = _strip_optional(hint)
    return hint is str


def _convert(value: Any, hint: Any) -> tuple[Any, str | None]:
    """Check `value` against the type `hint`, converting where it is safe (int -> float, '1e-3' -> 0.001).
    Returns (converted, None) or (None, error message)."""
    if _is_union(hint):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None, None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            converted, error = _convert(value, arg)
            if error is None:
                return converted, None
            errors.append(error)
        return None, errors[0] if len(errors) == 1 else f"expected {_type_name(hint)}, got {_describe(value)}"
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return value, None
        shown = ", ".join(_yaml_scalar(c) for c in choices)
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        suggestion = f"; did you mean {close[0]}?" if close and isinstance(value, str) else ""
        return None, f"must be one of {shown}, not {_yaml_scalar(value)}{suggestion}"
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        items = value if isinstance(value, list) else [value]
        if value is None:
            return None, f"expected a list, got {_describe(value)}"
        out = []
        for i, item in enumerate(items):
            converted, error = _convert(item, item_hint)
            if error:
                return None, f"item {i}: {error}"
            out.append(converted)
        return out, None
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            return None, f"expected a mapping, got {_describe(value)}"
        out = {}
        for k, v in value.items():
            converted, error = _convert(v, value_hint)
            if error:
                return None, f"{k}: {error}"
            out[str(k)] = converted
        return out, None
    if hint is bool:
        if isinstance(value, bool):
            return value, None
        return None, f"expected true or false, got {_describe(value)}"
    if hint is int:
        if isinstance(value, bool):
            return None, f"expected an integer, got {_describe(value)}"
        if isinstance(value, int):
            return value, None
        number = _as_number(value)
        if number is not None and math.isfinite(number) and number == int(number):
            return int(number), None
        return None, f"expected an integer, got {_describe(value)}"
    if hint is float:
        if isinstance(value, bool):
            return None, f"expected a number, got {_describe(value)}"
        number = _as_number(value)
        if number is not None and not math.isfinite(number):
            return None, f"must be a finite number, not {value}"
        if number is not None:
            return float(number), None
        return None, f"expected a number, got {_describe(value)}"
    if hint is str:
        if isinstance(value, str):
            return value, None
        return None, f"expected a string, got {_describe(value)}"
    raise TypeError(f"config field type {hint!r} is not supported")  # a bug in a section class, not user input


def _as_number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    return None


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _type_name(hint: Any) -> str:
    if _is_union(hint):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
