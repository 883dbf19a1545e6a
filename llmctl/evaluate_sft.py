"""`llmctl eval` after instruction tuning, in the two forms users check:

- `sft`: loss and perplexity on the answer tokens of a prompt/completion or messages file, tokenized and masked
  exactly as `train.task: sft` does (llmctl.core.sft), one example per row;
- `generation`: greedy answers to the file's prompts (a conversation's turns before its last answer), compared with
  the references by exact match and by a normalized match (case, punctuation, articles and spacing ignored, as
  SQuAD's and lm-evaluation-harness's `exact_match` with its ignore options), as lm-eval's `generate_until` +
  `exact_match` do. `--predictions-out` writes one line per example.
"""

from __future__ import annotations

import logging
import re
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.core import chat
from llmctl.core.metrics import check_gates, lm_metrics
from llmctl.errors import ConfigError, DataError
from llmctl.evaluate import SCHEMA, _settings  # this is the eval command's own module; evaluate imports it lazily

if TYPE_CHECKING:
    import torch

    from llmctl.config import Config

log = logging.getLogger(__name__)

SFT_METRICS = ("loss", "perplexity", "tokens", "examples")
GENERATION_METRICS = ("exact_match", "normalized_match", "examples")


def eval_answers(cfg: Config, name: str, device: torch.device, dtype: torch.dtype, quiet: bool) -> dict[str, Any]:
    """Answer-only loss and perplexity of model `name` on the examples of eval.input."""
    import torch

    from llmctl.core.fastgpt import SFTObjective
    from llmctl.core.model import max_positions
    from llmctl.core.sft import Encoder, collate, examples_iter, read_examples

    ec = cfg.eval
    check_gates(ec.fail_under, ec.fail_over, SFT_METRICS)
    source = _input(cfg)
    model, tokenizer, template = _load(cfg, name, device, dtype)
    context = ec.context or max_positions(model) or 4096
    if template is None and _has_messages(source, cfg):
        raise ConfigError(chat.missing_template_message(name))
    encoder = Encoder(tokenizer, template, cfg.sft, context + 1)
    examples = read_examples([source], encoder, cfg.data.format)
    objective = SFTObjective(model).eval()
    pairs = list(examples_iter(examples))
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))  # similar lengths together: less padding
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(order), ec.batch_size):
            batch = collate([[pairs[i]] for i in order[start : start + ec.batch_size]], device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss_sum, n, _ = objective(**batch, reduction="sum").tolist()
            total += loss_sum
            count += int(n)
    metrics = lm_metrics(total, count, None)
    return {
        "schema": SCHEMA,
        "task": "sft",
        "method": "answer_tokens",
        "model": name,
        "input": source,
        "metrics": {"loss": metrics["loss"], "perplexity": metrics["perplexity"], "tokens": count,
                    "examples": len(examples)},
        "examples": encoder.stats.as_dict(),
        "settings": _settings(device, dtype, context=context, batch_size=ec.batch_size,
                              chat_template=template.origin if template else None,
                              train_on_prompt=cfg.sft.train_on_prompt),
    }


def eval_generation(cfg: Config, name: str, device: torch.device, dtype: torch.dtype, quiet: bool) -> dict[str, Any]:
    """Greedy answers of model `name` to the prompts of eval.input, scored against the references."""
    from llmctl.core.decode import Decoder, Finished, Request, SamplingParams

    ec = cfg.eval
    check_gates(ec.fail_under, ec.fail_over, GENERATION_METRICS)
    source = _input(cfg)
    model, tokenizer, template = _load(cfg, name, device, dtype)
    from llmctl.core.sft import records_of

    items = []
    for where, obj in records_of(source, cfg.sft, cfg.data.format):
        items.append((where, *_prompt_and_reference(obj, where, cfg)))
    if not items:
        raise DataError(f"{source}: no examples (the file is empty)")
    if template is None and any(not isinstance(prompt, str) for _, prompt, _ in items):
        raise ConfigError(chat.missing_template_message(name))
    prompter = None
    if template is not None:
        prompter = chat.Prompter.of(tokenizer, name, cfg.sft.system, cfg.sft.chat_template, key="eval.task")
    decoder = Decoder(model, tokenizer, stop_ids=prompter.stop_ids if prompter else ())
    params = SamplingParams(max_new_tokens=ec.max_new_tokens, temperature=0.0,
                            stop=tuple(prompter.stop_strings) if prompter else ())
    context = decoder.context_length
    if context is not None and ec.max_new_tokens >= context:
        raise ConfigError(f"eval.max_new_tokens: {ec.max_new_tokens} leaves no room for a prompt in the model's "
                          f"{context}-token context; use at most {context - 1}")
    predictions: list[str] = [""] * len(items)
    for start in range(0, len(items), ec.batch_size):
        chunk = items[start : start + ec.batch_size]
        prompts = [prompt for _, prompt, _ in chunk]
        encoded = prompter.encode(prompts) if prompter else tokenizer(prompts)["input_ids"]
        requests = []
        start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        for ids in encoded:
            ids = list(ids) or [start_id]
            if context is not None:
                ids = ids[-(context - ec.max_new_tokens):]
            requests.append(Request(ids, params, 0))
        for event in decoder.generate(requests):
            if isinstance(event, Finished):
                predictions[start + event.index] = event.result.text
    exact = [p.strip() == ref.strip() for p, (_, _, ref) in zip(predictions, items)]
    normal = [normalize(p) == normalize(ref) for p, (_, _, ref) in zip(predictions, items)]
    if ec.predictions_out:
        import json

        from llmctl.core.files import atomic_write_text

        rows = [{"id": where, "prompt": prompt, "reference": ref, "prediction": pred, "exact_match": e,
                 "normalized_match": n}
                for (where, prompt, ref), pred, e, n in zip(items, predictions, exact, normal)]
        atomic_write_text(Path(ec.predictions_out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {
        "schema": SCHEMA,
        "task": "generation",
        "method": "greedy",
        "model": name,
        "input": source,
        "metrics": {"exact_match": sum(exact) / len(items), "normalized_match": sum(normal) / len(items),
                    "examples": len(items)},
        "settings": _settings(device, dtype, max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size,
                              chat_template=template.origin if template else None),
    }


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalization: lowercase, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def _prompt_and_reference(obj: Any, where: str, cfg: Config) -> tuple[str | list[dict[str, str]], str]:
    """What the model is asked (a prompt, or a conversation before its last answer) and the answer it should give."""
    s = cfg.sft
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, not {type(obj).__name__}")
    if s.messages_field in obj:
        messages = chat.check_messages(obj[s.messages_field], where)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the conversation must end with the assistant's answer (the reference)")
        return messages[:-1], messages[-1]["content"]
    prompt, completion = obj.get(s.prompt_field), obj.get(s.completion_field)
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt, completion
    raise DataError(f"{where}: neither string \"{s.prompt_field}\" and \"{s.completion_field}\" fields nor "
                    f"\"{s.messages_field}\" (set sft.prompt_field, sft.completion_field or sft.messages_field)")


def _input(cfg: Config) -> str:
    source = cfg.eval.input or cfg.sft.validation
    if not source:
        raise ConfigError(f"eval.input: --task {cfg.eval.task} needs a JSONL file of prompt/completion or messages "
                          "examples (or set sft.validation)")
    return source


def _load(cfg: Config, name: str, device, dtype):
    """The model in eval mode, its tokenizer, and the chat template to use (the model's own, else the one
    sft.chat_template names, else None)."""
    from llmctl.core.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(name, trust_remote_code=cfg.run.trust_remote_code)
    template = chat.model_template(tokenizer, cfg.sft.chat_template)
    model = load_model(name, dtype=dtype, trust_remote_code=cfg.run.trust_remote_code).to(device).eval()
    return model, tokenizer, template


def _has_messages(source: str, cfg: Config) -> bool:
    from llmctl.core.sft import uses_messages

    return uses_messages([source], cfg.sft, cfg.data.format)

