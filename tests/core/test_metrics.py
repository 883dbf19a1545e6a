import math
import warnings

import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from llmctl.core.metrics import (
    check_gates,
    classification_metrics,
    evaluate_gates,
    gate_names,
    gate_values,
    lm_metrics,
)
from llmctl.errors import ConfigError

# "neu" is in the gold labels but never predicted: its precision is 0/0.
GOLD = ["pos", "pos", "neg", "neg", "neg", "neu", "neu", "pos"]
PRED = ["pos", "pos", "neg", "neg", "pos", "pos", "neg", "pos"]


def _strict(fn, *args, **kwargs):
    """Run fn with every warning turned into an error: metrics must not spam UndefinedMetricWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def test_hand_computed_values_with_a_class_never_predicted():
    out = _strict(classification_metrics, GOLD, PRED)
    assert out["labels"] == ["neg", "neu", "pos"]
    m, per = out["metrics"], out["per_class"]
    assert m["accuracy"] == pytest.approx(5 / 8)
    # pos: predicted 5 times, 3 right; 3 gold, all found.
    assert per["pos"] == pytest.approx({"precision": 3 / 5, "recall": 1.0, "f1": 0.75, "support": 3})
    # neg: predicted 3 times, 2 right; 3 gold, 2 found.
    assert per["neg"]["precision"] == pytest.approx(2 / 3)
    assert per["neg"]["recall"] == pytest.approx(2 / 3)
    # neu is never predicted: precision, recall and f1 count as 0.
    assert per["neu"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["precision_macro"] == pytest.approx((3 / 5 + 2 / 3 + 0.0) / 3)
    assert m["precision_micro"] == pytest.approx(5 / 8)  # single-label: micro P = R = F1 = accuracy
    assert m["f1_micro"] == pytest.approx(5 / 8)
    assert m["examples"] == 8
    # rows: gold, columns: predicted
    assert out["confusion_matrix"] == [[2, 0, 1], [1, 0, 1], [0, 0, 3]]


def test_agrees_with_scikit_learn_every_average():
    labels = ["pos", "neg", "neu"]  # a chosen order, not sorted
    out = _strict(classification_metrics, GOLD, PRED, labels)
    assert out["labels"] == labels
    assert out["metrics"]["accuracy"] == pytest.approx(accuracy_score(GOLD, PRED))
    for average in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(GOLD, PRED, labels=labels, average=average, zero_division=0)
        assert out["metrics"][f"precision_{average}"] == pytest.approx(p)
        assert out["metrics"][f"recall_{average}"] == pytest.approx(r)
        assert out["metrics"][f"f1_{average}"] == pytest.approx(f)
    p, r, f, s = precision_recall_fscore_support(GOLD, PRED, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        assert out["per_class"][label] == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
        )
    assert out["confusion_matrix"] == confusion_matrix(GOLD, PRED, labels=labels).tolist()


def test_predicted_label_absent_from_gold_and_unused_labels():
    gold = ["a", "a", "b"]
    pred = ["a", "c", "b"]  # c never occurs in gold: its recall is 0/0
    out = _strict(classification_metrics, gold, pred, ["a", "b", "c", "unused"])
    assert out["labels"] == ["a", "b", "c"]  # a label seen nowhere does not drag the macro average down
    assert out["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    p, r, f, _ = precision_recall_fscore_support(gold, pred, average="macro", zero_division=0)
    assert out["metrics"]["f1_macro"] == pytest.approx(f)


def test_perfect_and_mismatched_inputs():
    out = classification_metrics(["x", "y"], ["x", "y"])
    assert out["metrics"]["accuracy"] == 1.0 and out["metrics"]["f1_macro"] == 1.0
    with pytest.raises(ValueError):
        classification_metrics(["x"], ["x", "y"])
    with pytest.raises(ValueError):
        classification_metrics([], [])


def test_lm_metrics_definitions():
    m = lm_metrics(total_nll=1000.0, n_tokens=400, n_bytes=1600)
    assert m["loss"] == pytest.approx(2.5)
    assert m["perplexity"] == pytest.approx(math.exp(2.5))
    assert m["bits_per_byte"] == pytest.approx(1000.0 / math.log(2) / 1600)
    assert (m["tokens"], m["bytes"]) == (400, 1600)
    assert lm_metrics(10.0, 5, None)["bits_per_byte"] is None
    assert math.isfinite(lm_metrics(1e6, 1, 1)["perplexity"])  # a diverged model still gives strict JSON


def test_gates_pass_fail_and_boundaries():
    values = {"accuracy": 0.8, "perplexity": 40.0, "bits_per_byte": None}
    out = evaluate_gates(values, {"accuracy": 0.8}, {"perplexity": 40})
    assert out["passed"] and out["failed"] == [] and len(out["checked"]) == 2  # equal to the threshold passes
    out = evaluate_gates(values, {"accuracy": 0.81}, {"perplexity": 39.5, "bits_per_byte": 2})
    assert not out["passed"]
    failed = {g["metric"]: g for g in out["failed"]}
    assert set(failed) == {"accuracy", "perplexity", "bits_per_byte"}  # a metric without a value fails
    assert failed["accuracy"] == {
        "metric": "accuracy", "op": "fail_under", "threshold": 0.81, "value": 0.8, "passed": False,
        "message": "accuracy 0.8 is below 0.81",
    }
    assert failed["perplexity"]["op"] == "fail_over"
    assert "above" in failed["perplexity"]["message"]


def test_gate_names_and_values_include_per_class_entries():
    names = gate_names("classification", ["neg", "pos"])
    assert {"accuracy", "f1_macro", "f1:pos", "recall:neg", "support:pos"} <= set(names)
    assert gate_names("lm") == ["loss", "perplexity", "bits_per_byte", "tokens", "bytes"]
    result = classification_metrics(["neg", "pos"], ["neg", "neg"])
    values = gate_values(result)
    assert values["recall:pos"] == 0.0 and values["accuracy"] == 0.5


def test_unknown_gate_metric_is_a_config_error_naming_the_metrics():
    with pytest.raises(ConfigError) as err:
        check_gates({"acuracy": 0.5}, {"perplexity": 3}, gate_names("lm"))
    message = str(err.value)
    assert "eval.fail_under.acuracy" in message and "eval.fail_over.perplexity" not in message
    assert "available: loss, perplexity, bits_per_byte" in message
    with pytest.raises(ConfigError, match="did you mean accuracy"):
        check_gates({"acuracy": 0.5}, {}, gate_names("classification", ["a"]))
    check_gates({"f1:a": 0.5}, {"loss": 3}, gate_names("classification", ["a"]) + ["loss"])
