"""The model being trained: built or loaded, checked against the data, wrapped for DDP/FSDP/compile."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llmctl.config import Config
from llmctl.core.device import (
    Dist,
)
from llmctl.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def causal_lm(cfg: Config, tokenizer, meta):
    from llmctl.core.model import build_model, load_model

    if cfg.model.pretrained:
        model = load_model(cfg.model.pretrained, dtype=torch.float32, trust_remote_code=cfg.run.trust_remote_code)
        check_tokenizer(cfg.model.pretrained, tokenizer, model, meta.vocab_size, cfg)
    else:
        model = build_model(cfg.model, meta.vocab_size, meta.eos_token_id, pad_token_id=meta.eos_token_id)
    return model


def check_tokenizer(name: str, tokenizer, model, data_vocab: int, cfg: Config) -> None:
    """The data must be tokenized the way the pretrained model reads: same ids for the same strings."""
    rows = model.get_input_embeddings().num_embeddings
    if data_vocab > rows:
        raise ModelError(
            f"vocabulary mismatch: {cfg.data.dir} uses {data_vocab} token ids but model {name} has {rows}; prepare "
            f"the data with tokenizer.pretrained: {name}"
        )
    from llmctl.core.hub import TOKENIZER_FILES

    path = Path(name)
    if path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES):
        from llmctl.core.model import load_tokenizer

        if load_tokenizer(name).get_vocab() != tokenizer.get_vocab():
            raise ModelError(
                f"vocabulary mismatch: the tokenizer in {cfg.data.dir} differs from the tokenizer of model {name}; "
                f"prepare the data with tokenizer.pretrained: {name}"
            )


def fine_tune_tokenizer(cfg: Config):
    """The tokenizer of tokenizer.pretrained or model.pretrained, else the byte tokenizer (training from scratch),
    with a pad token; and the name it came from."""
    from llmctl.core.model import load_tokenizer

    source = cfg.tokenizer.pretrained or cfg.model.pretrained
    if source:
        tokenizer = load_tokenizer(source, trust_remote_code=cfg.run.trust_remote_code)
    else:
        from llmctl.core.tokenizer import byte_tokenizer, to_transformers

        tokenizer = to_transformers(byte_tokenizer([cfg.tokenizer.eos_token]), cfg.tokenizer.eos_token)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"the tokenizer of {source} has neither a pad nor an end-of-text token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, source or "the byte tokenizer"


def sft_model(cfg: Config, tokenizer, own_size: int):
    """The causal LM to fine-tune on instructions: model.pretrained (its embeddings grown when the chat template
    added marker tokens to the tokenizer's `own_size` ids), or a GPT-2 of the configured shape sized for the
    tokenizer."""
    from llmctl.core.model import build_model, load_model

    if not cfg.model.pretrained:
        return build_model(cfg.model, len(tokenizer), tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    name = cfg.model.pretrained
    model = load_model(name, dtype=torch.float32, trust_remote_code=cfg.run.trust_remote_code)
    rows = model.get_input_embeddings().num_embeddings
    if own_size > rows:
        raise ModelError(
            f"vocabulary mismatch: the tokenizer of {cfg.tokenizer.pretrained or name} has {own_size} ids but model "
            f"{name} has {rows} embedding rows; use the model's own tokenizer (unset tokenizer.pretrained)"
        )
    if len(tokenizer) > rows:
        log.info("growing the embeddings of %s from %d to %d rows for the chat template's markers", name, rows,
                 len(tokenizer))
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return model


def classifier(cfg: Config, labels: list[str]):
    from llmctl.core.model import build_model, load_model

    tokenizer, source = fine_tune_tokenizer(cfg)
    if cfg.model.pretrained:
        model = load_model(
            cfg.model.pretrained,
            task="classification",
            dtype=torch.float32,
            trust_remote_code=cfg.run.trust_remote_code,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise ModelError(
                f"vocabulary mismatch: the tokenizer of {source} has {len(tokenizer)} ids but model "
                f"{cfg.model.pretrained} has {model.get_input_embeddings().num_embeddings}"
            )
    else:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        model = build_model(cfg.model, len(tokenizer), eos, pad_token_id=tokenizer.pad_token_id, labels=labels)
    return model, tokenizer


def wrap(objective: torch.nn.Module, cfg: Config, dist: Dist, device: torch.device) -> torch.nn.Module:
    """DDP or FSDP under torchrun, then torch.compile if asked."""
    if dist.enabled and cfg.train.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in blocks(objective.model):
            fully_shard(block)
        fully_shard(objective)
    elif dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        objective = torch.compile(objective)
    return objective


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (FSDP's units): the largest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ConfigError("train.fsdp: cannot find the transformer blocks of this model to shard")
    return list(max(lists, key=len))


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    module = getattr(module, "_orig_mod", module)  # torch.compile
    return getattr(module, "module", module)  # DDP


# ---------------------------------------------------------------------------------------------------------------
# Run directory: identity, refusal, resume
