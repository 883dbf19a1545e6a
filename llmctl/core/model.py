"""Building a GPT-2 from a config, and loading any causal LM (or classifier) from a directory or hub id.

Importing this module silences transformers' own progress bars and info logs: llmctl owns stderr.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from llmctl.core.hub import locate
from llmctl.errors import ModelError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmctl.config import ModelConfig

log = logging.getLogger(__name__)


def quiet_transformers() -> None:
    """Turn off transformers' and huggingface_hub's progress bars and info/warning chatter on stderr."""
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()


quiet_transformers()


def build_model(
    cfg: ModelConfig,
    vocab_size: int,
    eos_token_id: int,
    pad_token_id: int | None = None,
    labels: list[str] | None = None,
) -> PreTrainedModel:
    """A freshly initialised GPT-2 of the shape in `cfg`, sized for the tokenizer: a `GPT2LMHeadModel`, or with
    `labels` a `GPT2ForSequenceClassification` over those classes (which needs `pad_token_id`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        activation_function=cfg.activation,
        # GPT2Config defaults these to 50256, which is out of range for our vocabularies.
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if labels is not None:
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    cls = AutoModelForSequenceClassification if labels is not None else AutoModelForCausalLM
    try:
        return cls.from_config(config, attn_implementation=cfg.attn_implementation)
    except (ValueError, ImportError) as exc:
        raise ModelError(f"cannot build the model: {exc}") from None


def model_name(named: str | None, out_dir: str, key: str) -> str:
    """The model a command works on: the one named (`--model`, or config key `key`), else the run directory the
    config's training writes (`run.out_dir`)."""
    if named:
        return named
    if not Path(out_dir).exists():
        raise ModelError(
            f"no model given and run.out_dir {out_dir} does not exist; pass --model DIR_OR_ID (or set {key}), "
            "or train one first (llmctl train -c CONFIG)"
        )
    return str(out_dir)


def load_model(
    name: str | Path,
    *,
    task: str = "causal_lm",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    **kwargs,
) -> PreTrainedModel:
    """Load a causal LM (`task="causal_lm"`) or sequence classifier (`task="classification"`) by directory or id."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from llmctl.core import weights

    source = locate(str(name), "model")
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    weights.check_model_dir(weights.model_dir(source.ref, source.local), str(name), cls, kwargs, trust_remote_code)
    try:
        model, info = cls.from_pretrained(
            source.ref,
            local_files_only=source.local_files_only,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            output_loading_info=True,
            **kwargs,
        )
    except (ValueError, OSError, RuntimeError, KeyError, SafetensorError) as exc:
        message = first_line(exc)
        if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
            message = "it ships its own code; set run.trust_remote_code: true if you trust it"
        raise ModelError(f"cannot load model {name}: {message}") from None
    weights.check_loaded(model, info, str(name), task)
    return model


def load_tokenizer(name: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in a run/model/data directory, or a hub model's tokenizer."""
    from transformers import AutoTokenizer

    source = locate(str(name), "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(
            source.ref, local_files_only=source.local_files_only, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the tokenizer of {name}: {first_line(exc)}") from None


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model can take, from whichever key its config uses; None when it names none."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length", "max_sequence_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
