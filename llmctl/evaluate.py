"""`llmctl eval`: is this model good enough? Numbers a script or a CI job can act on.

Four ways to evaluate, one result shape (documented in docs/eval.md):
  - lm: loss, perplexity and bits per byte of a causal LM on held-out text (a file, stdin, or a prepared split),
    scored with a sliding window (llmctl.core.scoring.token_nll);
  - classification: a model with a classification head (a `train.task: classification` run) on a labeled file;
  - zero_shot: any causal LM on a labeled file, picking the label whose verbalizer is most likely after a prompt;
  - sft, generation: a fine-tuned causal LM on instruction examples: its answer-only loss, or its greedy answers
    scored against the references (llmctl.evaluate_sft);
  - files: predictions made elsewhere against references, no model at all.
Gates (`eval.fail_under` / `eval.fail_over`) are checked by name before any scoring and reported in the result;
the CLI turns failed gates into exit code 3.
"""

from __future__ import annotations

import difflib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmctl.core.metrics import (
    CLASSIFICATION_METRICS,
    LM_METRICS,
    PER_CLASS,
    check_gates,
    classification_metrics,
    evaluate_gates,
    gate_names,
    gate_values,
    lm_metrics,
)
from llmctl.errors import ConfigError, DataError, ModelError, first_line

if TYPE_CHECKING:
    import torch

    from llmctl.config import Config

log = logging.getLogger(__name__)

SCHEMA = 1
"""Version of the result document; it changes only when a key changes meaning or disappears."""
MAX_DEFAULT_CONTEXT = 4096


def run(cfg: Config, *, quiet: bool = False) -> dict[str, Any]:
    """Evaluate as `cfg.eval` says and return the result document (JSON-able, keys in a fixed order)."""
    ec = cfg.eval
    started = time.perf_counter()
    if ec.predictions is not None:
        result = _eval_files(cfg)
    else:
        from llmctl.core.device import pick_device, pick_dtype, set_threads
        from llmctl.core.model import model_name

        name = model_name(cfg.eval.model, cfg.run.out_dir, "eval.model")
        task = _resolve_task(ec.task, _model_kind(name, cfg.run.trust_remote_code), name)
        set_threads(cfg.run.threads)
        device = pick_device(cfg.run.device)
        dtype = pick_dtype(ec.precision, device)
        from llmctl.evaluate_sft import eval_answers, eval_generation

        evaluate = {"lm": _eval_lm, "classification": _eval_head, "zero_shot": _eval_zero_shot, "sft": eval_answers,
                    "generation": eval_generation}[task]
        result = evaluate(cfg, name, device, dtype, quiet)
    result["gates"] = evaluate_gates(gate_values(result), ec.fail_under, ec.fail_over)
    result["seconds"] = round(time.perf_counter() - started, 3)
    if ec.output:
        from llmctl.core.files import atomic_write_text

        atomic_write_text(Path(ec.output), json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Which model, which task


def _model_kind(name: str, trust_remote_code: bool) -> str:
    """`classification` for a model saved with a sequence-classification head, else `causal_lm` (read from its
    config.json `architectures`, without loading any weights)."""
    from transformers import AutoConfig

    from llmctl.core.hub import locate
    from llmctl.core.lora import find_adapter

    adapter = find_adapter(name)
    if adapter is not None:
        return adapter.kind
    source = locate(name, "model")
    try:
        config = AutoConfig.from_pretrained(
            source.ref, local_files_only=source.local_files_only, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read the config of model {name}: {first_line(exc)}") from None
    architectures = getattr(config, "architectures", None) or []
    return "classification" if any(a.endswith("ForSequenceClassification") for a in architectures) else "causal_lm"


def _resolve_task(task: str, kind: str, name: str) -> str:
    if kind == "classification":
        if task in ("auto", "classification"):
            return "classification"
        raise ModelError(
            f"model {name} has a classification head, not a language-model head: it cannot be scored as {task}; "
            "use --task classification (or auto)"
        )
    if task in ("auto", "lm"):
        return "lm"
    if task in ("zero_shot", "sft", "generation"):
        return task
    raise ModelError(
        f"model {name} is a causal language model without a classification head; to classify with it zero-shot, "
        "use --task zero-shot (eval.task: zero_shot) and map each label to its text in eval.verbalizers"
    )


def _is_class_metric(metric: str) -> bool:
    name, colon, _ = metric.partition(":")
    return metric in CLASSIFICATION_METRICS or bool(colon) and name in PER_CLASS


def _load_model(name: str, task: str, cfg: Config, device: torch.device, dtype: torch.dtype):
    from llmctl.core.model import load_model

    model = load_model(name, task=task, dtype=dtype, trust_remote_code=cfg.run.trust_remote_code)
    return model.to(device).eval()


def _settings(device: torch.device, dtype: torch.dtype, **extra: Any) -> dict[str, Any]:
    return {**extra, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}


# ---------------------------------------------------------------------------------------------------------------
# Language modelling


@dataclass
class _Stream:
    """Held-out text as one token stream, ready to score."""

    ids: Any  # 1-D: list[int] or a NumPy array/memmap (a prepared split)
    n_bytes: int | None  # UTF-8 bytes of the text the ids stand for (separators excluded)
    bos: int | None  # the beginning-of-text id that add_bos puts in front
    source: str
    split: str | None = None  # the split, when the source is a prepared data directory


def _eval_lm(cfg: Config, name: str, device: torch.device, dtype: torch.dtype, quiet: bool) -> dict[str, Any]:
    from llmctl.core.console import make_progress
    from llmctl.core.model import max_positions
    from llmctl.core.scoring import sliding_windows, token_nll

    ec = cfg.eval
    class_gates = [m for m in (*ec.fail_under, *ec.fail_over) if m not in LM_METRICS and _is_class_metric(m)]
    if class_gates:
        raise ModelError(
            f"{class_gates[0]} is a classification metric, but model {name} is a causal language model without a "
            "classification head, scored as lm; to get class metrics from it, use --task zero-shot with a labeled "
            "--input"
        )
    check_gates(ec.fail_under, ec.fail_over, gate_names("lm"))
    model = _load_model(name, "causal_lm", cfg, device, dtype)
    positions = max_positions(model)
    context = ec.context or min(positions or MAX_DEFAULT_CONTEXT, MAX_DEFAULT_CONTEXT)
    if positions and context > positions:
        raise ConfigError(f"eval.context: {context} is longer than model {name} allows ({positions} positions)")
    stride = ec.stride or max(1, context // 2)
    if stride > context:
        raise ConfigError(f"eval.stride: {stride} is longer than the context ({context}); tokens would be skipped")

    stream = _lm_stream(cfg, name, model)
    ids = stream.ids
    if ec.add_bos and stream.bos is not None:
        # A shard stays in its own dtype (uint16 for most vocabularies): a quarter of an int64 copy.
        ids = np.concatenate([np.array([stream.bos], dtype=ids.dtype), ids]) if isinstance(ids, np.ndarray) else [
            stream.bos, *ids]
    if len(ids) < 2:
        raise DataError(f"{stream.source}: too short to score (one token, and the first token has no history)")
    windows = sliding_windows(len(ids), context, stride)
    where = f"{stream.source} ({stream.split} split)" if stream.split else stream.source
    log.info("scoring %s tokens of %s in %d windows of %d (stride %d) on %s",
             f"{len(ids) - 1:,}", where, len(windows), context, stride, device)
    with make_progress(quiet=quiet, transient=True) as progress:
        bar = progress.add_task("scoring", total=len(windows))
        total, count = token_nll(model, ids, context, stride, ec.batch_size, device,
                                 progress=lambda k: progress.advance(bar, k))
    return {
        "schema": SCHEMA,
        "task": "lm",
        "method": "sliding_window",
        "model": name,
        "input": stream.source,
        "metrics": lm_metrics(total, count, stream.n_bytes),
        "settings": _settings(device, dtype, context=context, stride=stride, batch_size=ec.batch_size,
                              add_bos=ec.add_bos and stream.bos is not None, max_tokens=ec.max_tokens,
                              split=stream.split, windows=len(windows)),
    }


def _lm_stream(cfg: Config, name: str, model) -> _Stream:
    """The text to score: a prepared split (eval.input naming a prepared directory, or data.dir when eval.input is
    unset) or a text/JSONL file or stdin."""
    from llmctl.core.records import record_format

    ec = cfg.eval
    if ec.input is None:
        data_dir = Path(cfg.data.dir)
        if not (data_dir / "meta.json").is_file():
            raise ConfigError(
                f"eval.input: nothing to evaluate; pass --input FILE (- for stdin) or a prepared data directory "
                f"(data.dir {data_dir} holds no prepared data)"
            )
        return _split_stream(cfg, data_dir, name, model)
    if ec.input != "-" and Path(ec.input).is_dir() and record_format(ec.input) != "dataset":
        if not (Path(ec.input) / "meta.json").is_file():
            raise DataError(f"{ec.input}: a directory, but not a prepared data directory (no meta.json)")
        return _split_stream(cfg, Path(ec.input), name, model)
    return _text_stream(cfg, ec.input, name)


def _split_stream(cfg: Config, data_dir: Path, name: str, model) -> _Stream:
    from llmctl.core.shards import open_split, read_meta

    split = cfg.eval.split
    meta = read_meta(data_dir)
    ids = open_split(data_dir, split, meta)
    truncated = bool(cfg.eval.max_tokens) and len(ids) > cfg.eval.max_tokens
    if truncated:
        ids = ids[: cfg.eval.max_tokens]
    vocab = model.get_input_embeddings().num_embeddings
    top = int(ids.max())  # one pass over the (memory-mapped) tokens that will be scored
    if top >= vocab:
        raise DataError(
            f"{data_dir}/{split}.bin holds token id {top} but model {name} knows {vocab} ids; "
            "the data was prepared with another tokenizer"
        )
    data_tokenizer = _same_tokenizer(data_dir, name)
    n_bytes = meta.bytes.get(split)
    if truncated:
        n_bytes = _decoded_bytes(data_tokenizer, ids) if data_tokenizer is not None else None
    return _Stream(ids, n_bytes, meta.eos_token_id, str(data_dir), split)


def _same_tokenizer(data_dir: Path, name: str):
    """The data's tokenizer (None if it cannot be loaded); a DataError when the model's differs from it, as scores
    of ids from another vocabulary mean nothing."""
    from llmctl.core.model import load_tokenizer

    try:
        data_tokenizer = load_tokenizer(data_dir)
    except ModelError:
        return None
    try:
        model_tokenizer = load_tokenizer(name)
    except ModelError:
        return data_tokenizer
    if model_tokenizer.get_vocab() != data_tokenizer.get_vocab():
        raise DataError(
            f"{data_dir} was tokenized with a different tokenizer than model {name}'s; prepare it again with "
            f"tokenizer.pretrained: {name}, or pass --input FILE"
        )
    return data_tokenizer


def _text_stream(cfg: Config, path: str, name: str) -> _Stream:
    """A text file (one document) or a record input (JSONL, Parquet, CSV, dataset: one document per record, in
    data.text_field), tokenized with the model's tokenizer. Documents are joined by the end-of-text token, as
    preprocess joins them in the shards."""
    from llmctl.core.inputs import MAX_TEXT_BYTES, display_name, input_format, iter_jsonl, read_text
    from llmctl.core.model import load_tokenizer
    from llmctl.core.records import iter_texts, record_format

    tokenizer = load_tokenizer(name, trust_remote_code=cfg.run.trust_remote_code)
    source = display_name(path)
    kind = record_format(path, cfg.data.format) if path != "-" else "txt"
    if kind not in ("txt", "jsonl"):
        documents = [text for _, text in iter_texts(path, cfg.data.text_field, cfg.data.format)]
    elif input_format(path, cfg.data.format) == "jsonl":
        field = cfg.data.text_field
        documents = []
        for number, obj in iter_jsonl(path, max_total=MAX_TEXT_BYTES):
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise DataError(f"{source}:{number}: expected a JSON object with a string {field!r} field")
            documents.append(obj[field])
    else:
        documents = [read_text(path, MAX_TEXT_BYTES, _BIG_TEXT_ADVICE)]
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise DataError(f"{source}: no text to score (the input is empty)")

    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None and len(documents) > 1:
        documents = ["\n".join(documents)]  # no separator token: join as lines, and count the newlines as text
    ids: list[int] = []
    for i, document in enumerate(documents):
        if i:
            ids.append(eos)
        ids.extend(_encode(tokenizer, document))
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    max_tokens = cfg.eval.max_tokens
    if max_tokens and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        n_bytes = _decoded_bytes(tokenizer, ids)
    return _Stream(ids, n_bytes, bos if bos is not None else eos, source)


_BIG_TEXT_ADVICE = (
    "to score more text, prepare it (llmctl preprocess FILE -o DIR --set tokenizer.pretrained=MODEL) and pass the "
    "directory as --input: its shards are read memory-mapped"
)


def _encode(tokenizer, text: str | list[str]) -> list[int] | list[list[int]]:
    """Token ids of a text (or of each of a list of texts), without special tokens: the caller places those."""
    # split_special_tokens: a literal "<|endoftext|>" in the text is text, as preprocess and generate read it.
    out = tokenizer(text, add_special_tokens=False, return_attention_mask=False, split_special_tokens=True)
    return out["input_ids"]


def _decoded_bytes(tokenizer, ids) -> int:
    """UTF-8 bytes of the text behind `ids`, separators excluded (for a truncated stream). A multi-byte character
    cut at the end may count a couple of bytes more than it had."""
    text = tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
    return len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# Classification: a model's head, or zero-shot verbalizers


def _labeled_examples(cfg: Config):
    from llmctl.core.inputs import read_labeled

    ec = cfg.eval
    if ec.input is None:
        raise ConfigError(
            "eval.input: classification needs a labeled file (JSONL with text and label, or TSV text<TAB>label); "
            "pass --input FILE"
        )
    examples = read_labeled(ec.input, cfg.data.text_field, cfg.data.label_field, ec.id_field or "id")
    return examples


def _require_known(items: Sequence, known: Sequence[str], source: str, what: str, noun: str = "label") -> None:
    """Every item's `.label` must be in `known`; the first that is not is a DataError naming its line:
    `{source}:{line}: {noun} 'x' {what}`, with a did-you-mean."""
    for item in items:
        if item.label not in known:
            close = difflib.get_close_matches(item.label, list(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DataError(f"{source}:{item.line}: {noun} {item.label!r} {what}{hint}")


def _eval_head(cfg: Config, name: str, device: torch.device, dtype: torch.dtype, quiet: bool) -> dict[str, Any]:
    from llmctl.core.inputs import display_name
    from llmctl.core.model import load_tokenizer, max_positions
    from llmctl.core.scoring import classifier_logprobs

    ec = cfg.eval
    model = _load_model(name, "classification", cfg, device, dtype)
    labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    check_gates(ec.fail_under, ec.fail_over, gate_names("classification", labels))
    examples = _labeled_examples(cfg)
    source = display_name(ec.input)
    _require_known(examples, labels, source, f"is not one of model {name}'s labels ({', '.join(labels)})")
    tokenizer = load_tokenizer(name, trust_remote_code=cfg.run.trust_remote_code)
    max_length = ec.context or max_positions(model) or MAX_DEFAULT_CONTEXT
    # Special tokens as the tokenizer adds them (none for GPT-2; [CLS]/[SEP] for BERT-style classifiers).
    inputs = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length,
                       return_attention_mask=False, split_special_tokens=True)["input_ids"]
    for ex, ids in zip(examples, inputs):
        if not ids:
            raise DataError(f"{source}:{ex.line}: empty text")
    pad_id = model.config.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model.config.pad_token_id = pad_id  # GPT-2 classifiers find each row's last real token by it
    log.info("classifying %d examples of %s with %s on %s", len(examples), source, name, device)
    scores = _with_progress(
        lambda progress: classifier_logprobs(model, inputs, ec.batch_size, device, pad_id or 0, progress),
        len(inputs), "classifying", quiet,
    )
    result = _classification_result(cfg, "head", name, source, examples, labels, scores)
    result["settings"] = _settings(device, dtype, batch_size=ec.batch_size, max_length=max_length)
    return result


def _eval_zero_shot(cfg: Config, name: str, device: torch.device, dtype: torch.dtype, quiet: bool) -> dict[str, Any]:
    from llmctl.core.inputs import display_name
    from llmctl.core.model import load_tokenizer, max_positions
    from llmctl.core.scoring import continuation_logprobs

    ec = cfg.eval
    examples = _labeled_examples(cfg)
    source = display_name(ec.input)
    labels = list(ec.labels) or list(ec.verbalizers) or sorted({ex.label for ex in examples})
    if ec.verbalizers:
        _require_known(examples, list(ec.verbalizers), source,
                       f"has no verbalizer in eval.verbalizers (it maps {', '.join(ec.verbalizers)})")
    _require_known(examples, labels, source, f"is not in eval.labels ({', '.join(labels)})")
    if len(labels) < 2:
        raise DataError(
            f"{source}: every example has the label {labels[0]!r}; zero-shot scoring needs at least two labels "
            "(list them in eval.labels or eval.verbalizers)"
        )
    check_gates(ec.fail_under, ec.fail_over, gate_names("classification", labels))
    verbalizers = {label: ec.verbalizers.get(label, f" {label}") for label in labels}

    model = _load_model(name, "causal_lm", cfg, device, dtype)
    tokenizer = load_tokenizer(name, trust_remote_code=cfg.run.trust_remote_code)
    continuations = [_encode(tokenizer, verbalizers[label]) for label in labels]
    for label, ids in zip(labels, continuations):
        if not ids:
            raise ConfigError(f"eval.verbalizers.{label}: encodes to no tokens")
    context = ec.context or max_positions(model) or MAX_DEFAULT_CONTEXT
    budget = context - max(len(c) for c in continuations)
    if budget < 1:
        raise ConfigError(f"eval.verbalizers: the longest verbalizer does not fit in the context ({context} tokens)")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = [bos] if ec.add_bos and bos is not None else []
    prompts, truncated = [], 0
    encoded = _encode(tokenizer, [ec.prompt_template.replace("{text}", ex.text) for ex in examples])
    for ex, ids in zip(examples, encoded):
        ids = prefix + ids
        if not ids:
            raise DataError(f"{source}:{ex.line}: the prompt is empty (empty text and a template of only {{text}})")
        if len(ids) > budget:
            ids, truncated = ids[-budget:], truncated + 1  # keep the end: the template's cue is there
        prompts.append(ids)
    if truncated:
        log.warning("%d prompt(s) longer than the context lost their beginning", truncated)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (bos or 0)
    log.info("zero-shot classifying %d examples of %s into %d labels with %s on %s",
             len(examples), source, len(labels), name, device)
    scores = _with_progress(
        lambda progress: continuation_logprobs(model, prompts, continuations, ec.batch_size, device, pad_id, progress),
        len(prompts) * len(labels), "scoring", quiet,
    )
    if ec.length_norm:
        import torch

        scores = scores / torch.tensor([len(c) for c in continuations], dtype=scores.dtype)
    result = _classification_result(cfg, "zero_shot", name, source, examples, labels, scores)
    result["settings"] = _settings(
        device, dtype, batch_size=ec.batch_size, prompt_template=ec.prompt_template, verbalizers=verbalizers,
        length_norm=ec.length_norm, add_bos=bool(prefix), context=context, truncated=truncated,
    )
    return result


def _with_progress(work, total: int, description: str, quiet: bool):
    from llmctl.core.console import make_progress

    with make_progress(quiet=quiet, transient=True) as progress:
        bar = progress.add_task(description, total=total)
        return work(lambda k: progress.advance(bar, k))


def _classification_result(cfg, method, name, source, examples, labels, scores) -> dict[str, Any]:
    """Metrics of argmax predictions, and the per-example lines of --predictions-out."""
    best = scores.argmax(dim=-1).tolist()
    gold = [ex.label for ex in examples]
    predicted = [labels[i] for i in best]
    if cfg.eval.predictions_out:
        rows = [
            {"id": ex.id, "gold": ex.label, "predicted": p, "scores": dict(zip(labels, map(float, row)))}
            for ex, p, row in zip(examples, predicted, scores.tolist())
        ]
        _write_jsonl(cfg.eval.predictions_out, rows)
    return _class_result(method, name, source, gold, predicted, labels)


def _class_result(method, name, source, gold, predicted, labels, **extra) -> dict[str, Any]:
    computed = classification_metrics(gold, predicted, labels)
    return {
        "schema": SCHEMA,
        "task": "classification",
        "method": method,
        "model": name,
        "input": source,
        **extra,
        "labels": computed["labels"],
        "metrics": computed["metrics"],
        "per_class": computed["per_class"],
        "confusion_matrix": computed["confusion_matrix"],
    }


def _write_jsonl(path: str, rows: list[dict]) -> None:
    from llmctl.core.files import atomic_write_text

    atomic_write_text(Path(path), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ---------------------------------------------------------------------------------------------------------------
# Files: predictions made elsewhere against references

PREDICTION_FIELDS = ("predicted", "prediction")
REFERENCE_FIELDS = ("gold", "reference")


@dataclass(frozen=True)
class _Entry:
    line: int
    id: str | None
    label: str


def _eval_files(cfg: Config) -> dict[str, Any]:
    from llmctl.core.inputs import display_name

    ec = cfg.eval
    if ec.predictions == "-" and ec.references == "-":
        raise ConfigError("eval.predictions: predictions and references cannot both come from stdin")
    label_field = cfg.data.label_field
    pred_name, ref_name = display_name(ec.predictions), display_name(ec.references)
    refs = _read_label_file(ec.references, REFERENCE_FIELDS + (label_field,), ec.id_field)
    preds = _read_label_file(ec.predictions, PREDICTION_FIELDS + (label_field,), ec.id_field)
    refs, preds = _match(refs, preds, ref_name, pred_name, ec.id_field)

    if ec.labels:
        labels, where = list(ec.labels), f"eval.labels ({', '.join(ec.labels)})"
        _require_known(refs, labels, ref_name, f"is not in {where}")
    else:
        labels = sorted({entry.label for entry in refs})
        where = f"the references ({ref_name} has: {', '.join(labels)})"
    _require_known(preds, labels, pred_name, f"does not occur in {where}", noun="predicted label")
    check_gates(ec.fail_under, ec.fail_over, gate_names("classification", labels))
    gold, predicted = [e.label for e in refs], [e.label for e in preds]
    if ec.predictions_out:
        _write_jsonl(ec.predictions_out, [
            {"id": r.id if r.id is not None else str(i), "gold": r.label, "predicted": p.label, "scores": None}
            for i, (r, p) in enumerate(zip(refs, preds))
        ])
    result = _class_result("files", None, ref_name, gold, predicted, labels, predictions=pred_name)
    result["settings"] = {"matched_by": f"id ({ec.id_field})" if ec.id_field else "position"}
    return result


def _read_label_file(path: str, fields: Sequence[str], id_field: str | None) -> list[_Entry]:
    """Labels, one per line, or JSONL objects (when the first non-blank line starts with `{`) holding the label in
    the first of `fields` present. Blank lines at the end are ignored; elsewhere they are errors, as they would shift
    every match by position."""
    from llmctl.core.inputs import MAX_LINES_BYTES, display_name, iter_lines, parse_json_object

    name = display_name(path)
    lines = list(iter_lines(path, max_total=MAX_LINES_BYTES))
    while lines and not lines[-1][1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{name}: empty (no labels)")
    jsonl = next(line for _, line in lines if line.strip()).lstrip().startswith("{")
    if id_field and not jsonl:
        raise DataError(f"{name}:1: matching by id ({id_field!r}) needs JSONL lines, but this file holds plain labels")
    entries = []
    for number, line in lines:
        if not line.strip():
            raise DataError(f"{name}:{number}: blank line (expected a label; lines are matched by position)")
        if not jsonl:
            entries.append(_Entry(number, None, line.strip()))
            continue
        obj = parse_json_object(line, f"{name}:{number}")
        key = next((f for f in fields if f in obj), None)
        if key is None:
            raise DataError(f"{name}:{number}: no label field (looked for {', '.join(map(repr, fields))})")
        value = obj[key]
        if isinstance(value, (dict, list)) or value is None:
            raise DataError(f"{name}:{number}: {key!r} must be a string or number")
        ident = None
        if id_field:
            if id_field not in obj:
                raise DataError(f"{name}:{number}: no {id_field!r} field to match by")
            ident = str(obj[id_field])
        entries.append(_Entry(number, ident, str(value)))
    return entries


def _match(refs: list[_Entry], preds: list[_Entry], ref_name: str, pred_name: str, id_field: str | None):
    """Pair references with predictions by position, or by id; every reference needs exactly one prediction."""
    if not id_field:
        if len(refs) != len(preds):
            longer, name, n = (refs, ref_name, len(preds)) if len(refs) > len(preds) else (preds, pred_name, len(refs))
            raise DataError(
                f"{name}:{longer[n].line}: no matching line in the other file ({pred_name} has {len(preds)} labels, "
                f"{ref_name} has {len(refs)}; lines are matched by position, or by id with --id-field)"
            )
        return refs, preds
    for entries, name in ((refs, ref_name), (preds, pred_name)):
        seen: dict[str, int] = {}
        for entry in entries:
            if entry.id in seen:
                first = seen[entry.id]
                raise DataError(f"{name}:{entry.line}: duplicate {id_field} {entry.id!r} (first at line {first})")
            seen[entry.id] = entry.line
    by_id = {entry.id: entry for entry in preds}
    ref_ids = {entry.id for entry in refs}
    for entry in preds:
        if entry.id not in ref_ids:
            raise DataError(f"{pred_name}:{entry.line}: {id_field} {entry.id!r} is not in {ref_name}")
    for entry in refs:
        if entry.id not in by_id:
            raise DataError(f"{ref_name}:{entry.line}: {id_field} {entry.id!r} has no prediction in {pred_name}")
    return refs, [by_id[entry.id] for entry in refs]


# ---------------------------------------------------------------------------------------------------------------
# Summary for people (the CLI prints it on stderr)


def summary(result: dict[str, Any]):
    """A rich renderable of the result: metrics, per-class scores, confusion matrix and gates."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    heading = f"llmctl eval: {result['task']} ({result['method']})"
    if result.get("model"):
        heading += f", model {result['model']}"
    heading += f", input {result['input']}"
    metrics = Table("metric", "value")
    metrics.columns[1].justify = "right"
    for key, value in result["metrics"].items():
        metrics.add_row(key, _show(value))
    parts: list[Any] = [Text(heading, style="bold"), metrics]
    if result.get("per_class"):
        per_class = Table("label", "precision", "recall", "f1", "support")
        for column in per_class.columns[1:]:
            column.justify = "right"
        for label, entry in result["per_class"].items():
            per_class.add_row(label, *(_show(entry[k]) for k in ("precision", "recall", "f1", "support")))
        matrix = Table("gold \\ predicted", *result["labels"])
        for column in matrix.columns[1:]:
            column.justify = "right"
        for label, row in zip(result["labels"], result["confusion_matrix"]):
            matrix.add_row(label, *map(str, row))
        parts += [per_class, Text("confusion matrix"), matrix]
    gates = result.get("gates", {}).get("checked", [])
    if gates:
        table = Table("gate", "result")
        for gate in gates:
            table.add_row(f"--{gate['op'].replace('_', '-')}: {gate['message']}",
                          "[green]pass[/]" if gate["passed"] else "[bold red]FAIL[/]")
        parts.append(table)
    return Group(*parts)


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
