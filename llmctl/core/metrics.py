"""Metrics and gates: language-modelling numbers from a summed NLL, classification metrics from scikit-learn, and
the `--fail-under` / `--fail-over` checks CI acts on.

Everything here works on plain Python values, so that `eval`, `train` and tests share one definition of each number.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from llmctl.errors import ConfigError

LN2 = math.log(2)
MAX_FLOAT = 1.7976931348623157e308  # perplexity of a diverged model: finite, so that the JSON stays strict

AVERAGES = ("macro", "micro", "weighted")
PER_CLASS = ("precision", "recall", "f1", "support")
LM_METRICS = ("loss", "perplexity", "bits_per_byte", "tokens", "bytes")
CLASSIFICATION_METRICS = ("accuracy",) + tuple(
    f"{name}_{average}" for average in AVERAGES for name in ("precision", "recall", "f1")
) + ("examples",)


# ---------------------------------------------------------------------------------------------------------------
# Language modelling


def lm_metrics(total_nll: float, n_tokens: int, n_bytes: int | None) -> dict[str, Any]:
    """Mean loss (nats per scored token), perplexity (e^loss) and bits per byte (total NLL / ln 2 / UTF-8 bytes).

    Bits per byte does not depend on the tokenizer, so it compares models with different vocabularies; it is None
    when the byte count is unknown.
    """
    if n_tokens <= 0:
        raise ValueError("no scored tokens")
    loss = total_nll / n_tokens
    perplexity = math.exp(loss) if loss < 709 else MAX_FLOAT  # math.exp overflows above ~709.78
    bits_per_byte = total_nll / LN2 / n_bytes if n_bytes else None
    return {"loss": loss, "perplexity": perplexity, "bits_per_byte": bits_per_byte, "tokens": n_tokens,
            "bytes": n_bytes}


# ---------------------------------------------------------------------------------------------------------------
# Classification


def classification_metrics(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str] | None = None) -> dict:
    """Accuracy; precision, recall and F1 averaged three ways and per class; the confusion matrix.

    `labels` fixes the order of the per-class entries and of the matrix; unset, it is the sorted union of gold and
    predicted labels (scikit-learn's own default). A label in `labels` that occurs in neither list is dropped, so it
    cannot drag the macro average down. Undefined ratios (a class never predicted has no precision; a class absent
    from the gold labels has no recall) count as 0, as scikit-learn's `zero_division=0` has it, without a warning.

    Returns {"labels": [...], "metrics": {accuracy, precision_macro, ..., examples}, "per_class": {label: {precision,
    recall, f1, support}}, "confusion_matrix": rows = gold label, columns = predicted label, both in `labels` order}.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    if not gold:
        raise ValueError("no examples")
    seen = set(gold) | set(predicted)
    labels = [label for label in labels if label in seen] if labels is not None else sorted(seen)
    missing = seen - set(labels)
    if missing:
        raise ValueError(f"labels {sorted(missing)} occur in the data but not in `labels`")

    metrics: dict[str, Any] = {"accuracy": float(accuracy_score(gold, predicted))}
    for average in AVERAGES:
        p, r, f, _ = precision_recall_fscore_support(
            gold, predicted, labels=labels, average=average, zero_division=0
        )
        metrics[f"precision_{average}"] = float(p)
        metrics[f"recall_{average}"] = float(r)
        metrics[f"f1_{average}"] = float(f)
    metrics["examples"] = len(gold)

    p, r, f, s = precision_recall_fscore_support(gold, predicted, labels=labels, average=None, zero_division=0)
    per_class = {
        label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, label in enumerate(labels)
    }
    matrix = confusion_matrix(gold, predicted, labels=labels)
    return {
        "labels": list(labels),
        "metrics": metrics,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Gates


def gate_names(task: str, labels: Sequence[str] = ()) -> list[str]:
    """Every metric name a gate may use for this task: the entries of `metrics`, and for classification
    `precision:LABEL`, `recall:LABEL`, `f1:LABEL` and `support:LABEL` for each label."""
    if task == "lm":
        return list(LM_METRICS)
    return list(CLASSIFICATION_METRICS) + [f"{name}:{label}" for label in labels for name in PER_CLASS]


def gate_values(result: Mapping[str, Any]) -> dict[str, float | None]:
    """The flat metric-name -> value map gates read from an eval result."""
    values = dict(result.get("metrics", {}))
    for label, entry in result.get("per_class", {}).items():
        for name in PER_CLASS:
            values[f"{name}:{label}"] = entry[name]
    return values


def check_gates(fail_under: Mapping[str, float], fail_over: Mapping[str, float], available: Sequence[str]) -> None:
    """Raise one ConfigError naming every gate whose metric does not exist (with a did-you-mean and the list of
    metrics available), so that a typo fails before a long evaluation rather than after it."""
    problems = []
    for key, gates in (("fail_under", fail_under), ("fail_over", fail_over)):
        for metric in gates:
            if metric in available:
                continue
            close = difflib.get_close_matches(metric, available, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"eval.{key}.{metric}: no such metric; {hint}available: {', '.join(available)}")
    if problems:
        raise ConfigError(problems)


def evaluate_gates(
    values: Mapping[str, float | None], fail_under: Mapping[str, float], fail_over: Mapping[str, float]
) -> dict[str, Any]:
    """Check each gate against `values`. A metric without a value (bits_per_byte with no byte count) fails its gate:
    a CI job must not pass because a number could not be computed.

    Returns {"passed": bool, "checked": [gate, ...], "failed": [gate, ...]}, each gate being
    {"metric", "op" ("fail_under" | "fail_over"), "threshold", "value", "passed", "message"}.
    """
    checked = []
    for op, gates in (("fail_under", fail_under), ("fail_over", fail_over)):
        for metric, threshold in gates.items():
            value = values.get(metric)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                passed, message = False, f"{metric} has no value, so its gate fails"
            elif op == "fail_under":
                passed = value >= threshold
                message = f"{metric} {_fmt(value)} is {'at or above' if passed else 'below'} {_fmt(threshold)}"
            else:
                passed = value <= threshold
                message = f"{metric} {_fmt(value)} is {'at or below' if passed else 'above'} {_fmt(threshold)}"
            checked.append(
                {"metric": metric, "op": op, "threshold": threshold, "value": value, "passed": passed,
                 "message": message}
            )
    failed = [gate for gate in checked if not gate["passed"]]
    return {"passed": not failed, "checked": checked, "failed": failed}


def _fmt(value: float) -> str:
    return f"{value:.6g}"
