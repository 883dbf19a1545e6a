"""LoRA adapters through Hugging Face peft: put them on a model for training, checkpoint and export them, and load
an adapter directory anywhere a model is accepted.

Training (every task calls the same three things, whatever builds its model):
    apply_lora(model, cfg, task)     after the model is built or loaded, before wrapping and the optimizer
    trainable_state / load_trainable checkpoints hold what trains (adapters, modules_to_save), not the frozen base
    save_adapter(model, dir, ...)    export: `adapter/` in peft's format, and the merged model unless save: adapter

The base model a run adapts is identified by its path or hub id and the SHA-256 of its weight files (of its initial
weights when trained from scratch); a checkpoint records it, and resuming on another base is refused.

Loading: `find_adapter(name)` recognises an adapter directory (`adapter_config.json`), or a run directory saved
with `lora.save: adapter` (its `adapter/`); `load_with_adapter` loads the base it names and merges the adapter in.
peft is imported only when LoRA is in use: it costs about 2 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmctl.errors import CheckpointError, ConfigError, ModelError, first_line

if TYPE_CHECKING:
    from llmctl.config import Config

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# `auto` targets: the attention and MLP projections, by the module names each family uses.
_AUTO_TARGETS = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
_HEADS = ("score", "classifier")  # classification heads trained in full under `modules_to_save: auto`
_ADAPTABLE = ("Linear", "Conv1D", "Embedding", "Conv1d", "Conv2d")  # layer types peft's LoRA wraps


# ---------------------------------------------------------------------------------------------------------------
# Training


def apply_lora(model: torch.nn.Module, cfg: Config, task: str, new_tokens: list[int] | None = None) -> torch.nn.Module:
    """`model` wrapped by peft with LoRA adapters as `cfg.lora` says (unchanged when LoRA is off): only the adapters
    and `modules_to_save` require gradients. Call it right after building or loading the model, before DDP/FSDP
    and the optimizer. `task` is `train.task` (`classification` makes the head trainable under `auto`);
    `new_tokens` are ids whose embedding rows were just added (a chat template's markers): they train too."""
    lc = cfg.lora
    if not lc.enabled:
        return model
    _check_settings(cfg, task)
    if new_tokens and lc.save == "adapter":
        raise ConfigError("lora.save: adapter cannot hold the embedding rows grown for the new tokens (they start "
                          "from random values no base has); use lora.save: merged")
    if not cfg.model.pretrained:
        log.warning("lora.enabled on a model trained from scratch: its random base weights stay frozen, so only the "
                    "adapters learn; set model.pretrained to fine-tune a trained model")
    targets = resolve_targets(model, lc.target_modules)
    save = resolve_modules_to_save(model, lc.modules_to_save, task)
    _check_rank(model, targets, lc.rank)
    identity = base_identity(cfg.model.pretrained, model)

    from peft import LoraConfig, get_peft_model

    conv1d = any(type(m).__name__ == "Conv1D" for _, m in _matching(model, targets))
    config = LoraConfig(
        r=lc.rank,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=list(targets),
        modules_to_save=list(save) or None,
        fan_in_fan_out=conv1d,  # transformers' Conv1D (GPT-2) stores weights as (in, out)
        bias="none",
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
        trainable_token_indices={_embedding_name(model): list(new_tokens)} if new_tokens else None,
    )
    if lc.quantize == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on fan_in_fan_out and the like: handled above
            peft_model = get_peft_model(model, config)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ModelError(
            f"peft cannot put LoRA on {type(model).__name__} ({model.config.model_type}): {first_line(exc)}"
        ) from None
    peft_model.llmctl_base = identity
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d on %s%s: %.3fM of %.2fM parameters train", lc.rank, ", ".join(targets),
             f" (in full: {', '.join(save)})" if save else "", trainable / 1e6, total / 1e6)
    return peft_model


def _check_settings(cfg: Config, task: str) -> None:
    """Combinations LoRA cannot serve, refused before anything is written."""
    lc = cfg.lora
    problems = []
    if cfg.train.fsdp:
        problems.append("train.fsdp: sharding is not supported with lora.enabled (the frozen base and the small "
                        "adapters would need separate FSDP units); train LoRA with DDP (train.fsdp: false)")
    if lc.save == "adapter" and not cfg.model.pretrained:
        problems.append("lora.save: adapter needs model.pretrained: a base trained from scratch is saved nowhere for "
                        "the adapter to load onto; use lora.save: merged")
    if lc.save == "adapter" and task == "classification":
        problems.append("lora.save: adapter does not keep a classification head's labels; use lora.save: merged")
    if lc.quantize == "4bit" and not cfg.model.pretrained:
        problems.append("lora.quantize: 4bit quantizes pretrained weights; set model.pretrained")
    if problems:
        raise ConfigError(problems)


def quantization_kwargs(cfg: Config) -> dict[str, Any]:
    """Extra `from_pretrained` arguments for the base (4-bit NF4 weights under `lora.quantize: 4bit`), else {}."""
    if not (cfg.lora.enabled and cfg.lora.quantize == "4bit"):
        return {}
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes (pip install 'llmctl[qlora]')")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if missing:
        raise ConfigError(f"lora.quantize: 4bit (QLoRA) needs {' and '.join(missing)}; this machine lacks it")
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                               bnb_4bit_use_double_quant=True)
    return {"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}}


def resolve_targets(model: torch.nn.Module, asked: list[str]) -> list[str]:
    """The module names that get adapters: `asked`, or for `auto` the projections of the model's family. Each
    name must match a module (its last dotted parts), else the error lists the names the model has."""
    model_type = getattr(model.config, "model_type", "?")
    if asked == ["auto"]:
        names = _leaf_names(model)
        for family in _AUTO_TARGETS.values():
            found = [t for t in family if t in names]
            if found:
                return found
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

        if model_type in PEFT_DEFAULTS:
            return list(PEFT_DEFAULTS[model_type])
        raise ModelError(
            f"lora.target_modules: auto knows GPT-2 and Llama-family projections and peft has no default for model "
            f"type {model_type!r}; name the layers to adapt, some of: {', '.join(_adaptable_names(model))}"
        )
    unmatched = [t for t in asked if not any(True for _ in _matching(model, [t]))]
    if unmatched:
        raise ModelError(
            f"lora.target_modules: {', '.join(unmatched)} match no module of this {type(model).__name__}; its "
            f"layers are: {', '.join(_adaptable_names(model))}"
        )
    return list(asked)


def resolve_modules_to_save(model: torch.nn.Module, asked: list[str], task: str) -> list[str]:
    """Modules trained in full: `asked`, or under `auto` the classification head for classification, else none."""
    if asked == ["auto"]:
        if task != "classification":
            return []
        heads = [h for h in _HEADS if isinstance(getattr(model, h, None), torch.nn.Module)]
        if not heads:
            raise ModelError(
                f"lora.modules_to_save: cannot find the classification head of {type(model).__name__} (looked for "
                f"{', '.join(_HEADS)}); name it in lora.modules_to_save"
            )
        return heads[:1]
    names = {name for name, _ in model.named_modules()}
    unmatched = [m for m in asked if not any(n == m or n.endswith("." + m) for n in names)]
    if unmatched:
        raise ModelError(
            f"lora.modules_to_save: {', '.join(unmatched)} match no module of this {type(model).__name__}; its "
            f"modules are: {', '.join(sorted(_leaf_names(model) | {n for n, _ in model.named_children()}))}"
        )
    return list(asked)


def _embedding_name(model: torch.nn.Module) -> str:
    embedding = model.get_input_embeddings()
    return next(name for name, m in model.named_modules() if m is embedding)


def _check_rank(model: torch.nn.Module, targets: list[str], rank: int) -> None:
    for name, module in _matching(model, targets):
        shape = _layer_shape(module)
        if shape is not None and rank > min(shape):
            raise ConfigError(
                f"lora.rank: {rank} is larger than layer {name} ({shape[0]} x {shape[1]}) can use; set lora.rank to "
                f"at most {min(shape)}"
            )


def _layer_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
        return int(weight.shape[0]), int(weight.shape[1:].numel())
    return None


def _matching(model: torch.nn.Module, targets: list[str]):
    """(name, module) of every module whose name is a target or ends with `.target` (peft's own rule)."""
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            yield name, module


def _leaf_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and not any(m.children())}


def _adaptable_names(model: torch.nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m).__name__ in _ADAPTABLE}
    return sorted(names)


def is_lora(model: torch.nn.Module) -> bool:
    """True for a model `apply_lora` wrapped."""
    return getattr(model, "llmctl_base", None) is not None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint holds: the tensors that train (adapters, modules_to_save), by parameter name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy a checkpoint's trainable tensors into `model`; every name and shape must match."""
    params = dict(model.named_parameters())
    wanted = {name for name, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(wanted - tensors.keys()), sorted(tensors.keys() - wanted)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {source} does not fit these adapters (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            f"were lora.rank, lora.target_modules or lora.modules_to_save changed?"
        )
    with torch.no_grad():
        for name in wanted:
            if params[name].shape != tensors[name].shape:
                raise CheckpointError(f"checkpoint {source}: {name} has shape {tuple(tensors[name].shape)}, the "
                                      f"model {tuple(params[name].shape)}; was lora.rank changed?")
            params[name].copy_(tensors[name])


def checkpoint_meta(model: torch.nn.Module) -> dict[str, Any]:
    """What a checkpoint's meta.json records about the LoRA base ({} without LoRA)."""
    return {"lora_base": model.llmctl_base} if is_lora(model) else {}


def check_base(meta: dict[str, Any], model: torch.nn.Module, source: Path) -> None:
    """Refuse to resume adapters on a base other than the one they were trained on."""
    if not is_lora(model):
        return
    old, new = meta.get("lora_base"), model.llmctl_base
    if old is None:
        raise CheckpointError(f"checkpoint {source} holds no LoRA adapters (it was written without lora.enabled); "
                              f"set run.out_dir to start a new run")
    if old.get("sha256") != new["sha256"]:
        raise CheckpointError(
            f"cannot resume from {source}: its adapters were trained on base {_describe(old)}, this run's base is "
            f"{_describe(new)}; set model.pretrained back or run.out_dir to start a new run"
        )


def _describe(identity: dict[str, Any]) -> str:
    return f"{identity.get('base') or 'a model trained from scratch'} (sha256 {str(identity.get('sha256'))[:12]})"


def base_identity(pretrained: str | None, model: torch.nn.Module) -> dict[str, Any]:
    """{"base": absolute path or hub id (None from scratch), "sha256": of its weight files, or of the initial
    weights of a model built from scratch}."""
    if not pretrained:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return {"base": None, "sha256": digest.hexdigest()}
    path = Path(pretrained).expanduser()
    if path.is_dir():
        base, folder = str(path.resolve()), path
    else:  # a hub id: from_pretrained has just put its files in the cache
        from huggingface_hub import snapshot_download

        base = pretrained
        folder = Path(snapshot_download(pretrained, local_files_only=True))
    from llmctl.core.files import sha256_file

    digest = hashlib.sha256()
    for file in sorted(f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file()):
        digest.update(f"{file.name}:{sha256_file(file)}\n".encode())
    return {"base": base, "sha256": digest.hexdigest()}


def save_adapter(model: torch.nn.Module, directory: Path, tokenizer, merge: bool) -> torch.nn.Module | None:
    """Write `directory` in peft's format (adapter_config.json naming the base, adapter_model.safetensors) with the
    tokenizer beside it; return the merged model to save (`merge`), else None. Merging happens in place: call it
    last, when training is over."""
    base = model.llmctl_base["base"]
    model.peft_config["default"].base_model_name_or_path = base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note that grown embeddings are saved with the adapter
        model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if not merge:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.merge_and_unload()


# ---------------------------------------------------------------------------------------------------------------
# Loading an adapter where a model is named


@dataclass(frozen=True)
class Adapter:
    """An adapter directory, the base model it names (resolved), and the kind of model it makes."""

    dir: Path
    base: str
    kind: str  # "causal_lm" or "classification"


def find_adapter(name: str | Path) -> Adapter | None:
    """The adapter at `name` (a directory holding adapter_config.json, or a run directory saved with `lora.save:
    adapter`), checked: config readable, weights present, base found. None when `name` is not an adapter."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    if not (path / ADAPTER_CONFIG).is_file():
        if (path / "config.json").is_file() or not (path / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
            return None
        path = path / ADAPTER_DIR
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"cannot read adapter config {path / ADAPTER_CONFIG}: {first_line(exc)}") from None
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{path / ADAPTER_CONFIG} is not a LoRA adapter config (peft_type "
                         f"{config.get('peft_type')!r}); llmctl loads LoRA adapters")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ModelError(f"adapter {path} has no weights ({ADAPTER_WEIGHTS} is missing)")
    named = config.get("base_model_name_or_path")
    if not named:
        raise ModelError(f"adapter {path} does not name its base model (base_model_name_or_path in {ADAPTER_CONFIG}); "
                         f"load the base with --model and merge the adapter with peft")
    base = str(path / named) if not Path(named).is_absolute() and (path / named).is_dir() else str(named)
    from llmctl.core.hub import locate

    try:
        locate(base, "model")
    except ModelError as exc:
        raise ModelError(f"the base model of adapter {path} cannot be found: {exc}") from None
    kind = "classification" if config.get("task_type") == "SEQ_CLS" else "causal_lm"
    return Adapter(path, base, kind)


def load_with_adapter(adapter: Adapter, *, task: str, dtype: torch.dtype | None, trust_remote_code: bool,
                      **kwargs) -> torch.nn.Module:
    """The base model with the adapter merged into its weights (as fast as the plain model at inference)."""
    from llmctl.core.model import load_model

    base = load_model(adapter.base, task=task, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(base, str(adapter.dir), is_trainable=False)
            return model.merge_and_unload()
    except (SafetensorError, ValueError, TypeError, KeyError, RuntimeError, OSError) as exc:
        raise ModelError(f"cannot load adapter {adapter.dir} onto base {adapter.base}: {first_line(exc)}") from None


def tokenizer_source(name: str | Path) -> str | Path:
    """Where the tokenizer of `name` lives: `name`, or the base of an adapter that carries no tokenizer."""
    from llmctl.core.hub import TOKENIZER_FILES

    path = Path(name).expanduser()
    if not path.is_dir() or any((path / f).is_file() for f in TOKENIZER_FILES):
        return name
    adapter = find_adapter(path)
    if adapter is None:
        return name
    if any((adapter.dir / f).is_file() for f in TOKENIZER_FILES):
        return adapter.dir
    return adapter.base
