"""`llmctl eval --predictions P --references R`: metrics for predictions made elsewhere."""

import json

import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from llmctl import evaluate
from llmctl.config import load_config
from llmctl.errors import ConfigError, DataError

REFS = ["cat", "dog", "dog", "bird", "cat", "bird", "dog"]
PREDS = ["cat", "dog", "cat", "cat", "cat", "dog", "dog"]  # "bird" is never predicted


def _files(tmp_path, preds, refs, *sets, **values):
    p, r = tmp_path / "preds.txt", tmp_path / "refs.txt"
    p.write_text(preds if isinstance(preds, str) else "".join(f"{x}\n" for x in preds))
    r.write_text(refs if isinstance(refs, str) else "".join(f"{x}\n" for x in refs))
    values = {"eval.predictions": str(p), "eval.references": str(r), **{f"eval.{k}": v for k, v in values.items()}}
    return evaluate.run(load_config(None, list(sets), values), quiet=True)


def test_plain_lines_by_position_agree_with_sklearn(tmp_path):
    result = _files(tmp_path, PREDS, REFS)
    assert (result["task"], result["method"], result["model"]) == ("classification", "files", None)
    assert result["labels"] == ["bird", "cat", "dog"]
    m = result["metrics"]
    assert m["accuracy"] == pytest.approx(accuracy_score(REFS, PREDS))
    for average in ("macro", "micro", "weighted"):
        assert m[f"f1_{average}"] == pytest.approx(f1_score(REFS, PREDS, average=average, zero_division=0))
    p, r, f, s = precision_recall_fscore_support(REFS, PREDS, labels=["bird", "cat", "dog"], zero_division=0)
    assert result["per_class"]["bird"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert result["per_class"]["cat"]["precision"] == pytest.approx(p[1])
    assert result["confusion_matrix"] == [[0, 1, 1], [0, 2, 0], [0, 1, 2]]
    assert result["settings"] == {"matched_by": "position"}
    assert result["input"].endswith("refs.txt") and result["predictions"].endswith("preds.txt")


def test_jsonl_matched_by_id_in_any_order(tmp_path):
    refs = "".join(json.dumps({"id": i, "label": y}) + "\n" for i, y in enumerate(REFS))
    # our own --predictions-out format works as input: "predicted" beats "label"
    preds = "".join(json.dumps({"id": i, "predicted": y, "label": "ignored"}) + "\n"
                    for i, y in reversed(list(enumerate(PREDS))))
    result = _files(tmp_path, preds, refs, id_field="id")
    assert result["metrics"]["accuracy"] == pytest.approx(accuracy_score(REFS, PREDS))
    assert result["settings"] == {"matched_by": "id (id)"}


def test_declared_labels_allow_a_predicted_label_the_references_lack(tmp_path):
    result = _files(tmp_path, ["cat", "fish"], ["cat", "dog"], "eval.labels=[dog, cat, fish]")
    assert result["labels"] == ["dog", "cat", "fish"]
    assert result["metrics"]["accuracy"] == 0.5


@pytest.mark.parametrize(
    "preds, refs, values, message",
    [
        (["cat", "dgo"], ["cat", "dog"], {}, r"preds\.txt:2: predicted label 'dgo' does not occur in the references "
                                             r"\(.*refs\.txt has: cat, dog\); did you mean 'dog'\?"),
        (["cat"], ["cat", "dog"], {}, r"refs\.txt:2: no matching line in the other file \(.*preds\.txt has 1 labels"),
        (["cat", "dog", "cat"], ["cat", "dog"], {}, r"preds\.txt:3: no matching line"),
        ("", ["cat"], {}, r"preds\.txt: empty \(no labels\)"),
        (["cat"], "\n\n", {}, r"refs\.txt: empty \(no labels\)"),
        (["cat", "", "dog"], ["cat", "dog", "dog"], {}, r"preds\.txt:2: blank line"),
        ('{"label": "cat"}\n{"label": "dog"\n', ["cat", "dog"], {}, r"preds\.txt:2: invalid JSON"),
        ('{"label": "cat"}\n{"guess": "dog"}\n', ["cat", "dog"], {}, r"preds\.txt:2: no label field \(looked for"),
        (["cat"], ["cat"], {"id_field": "id"}, r"refs\.txt:1: matching by id \('id'\) needs JSONL"),
        ('{"id": 1, "label": "cat"}\n{"id": 1, "label": "cat"}\n', '{"id": 1, "label": "cat"}\n', {"id_field": "id"},
         r"preds\.txt:2: duplicate id '1' \(first at line 1\)"),
        ('{"id": 2, "label": "cat"}\n', '{"id": 1, "label": "cat"}\n', {"id_field": "id"},
         r"preds\.txt:1: id '2' is not in .*refs\.txt"),
        (["cat"], ["cow"], {"labels": ["cat", "dog"]}, r"refs\.txt:1: label 'cow' is not in eval\.labels"),
    ],
)
def test_bad_files_give_one_line_errors_naming_file_and_line(tmp_path, preds, refs, values, message):
    with pytest.raises(DataError, match=message) as err:
        _files(tmp_path, preds, refs, **values)
    assert "\n" not in str(err.value)


def test_predictions_need_references_and_gates_need_known_labels(tmp_path):
    with pytest.raises(ConfigError, match="references: predictions and references go together"):
        load_config(None, ["eval.predictions=p.txt"])
    with pytest.raises(ConfigError, match=r"eval.fail_under.f1:fish: no such metric.*f1:cat"):
        _files(tmp_path, ["cat"], ["cat"], "eval.fail_under.f1:fish=0.5")


def test_cli_files_mode_gates_and_predictions_out(llmctl, tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"{x}\n" for x in PREDS))
    (tmp_path / "r.txt").write_text("".join(f"{x}\n" for x in REFS))
    res = llmctl("eval", "--predictions", "p.txt", "--references", "r.txt", "--fail-under", "accuracy=0.5",
                 "--fail-under", "f1:bird=0.1", "--predictions-out", "out.jsonl", "--json", cwd=tmp_path)
    assert res.code == 3, res.stderr
    result = json.loads(res.stdout)
    assert result["metrics"]["accuracy"] == pytest.approx(4 / 7)
    assert [g["metric"] for g in result["gates"]["failed"]] == ["f1:bird"]
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert lines[3] == {"id": "3", "gold": "bird", "predicted": "cat", "scores": None}

    res = llmctl("eval", "--predictions", "p.txt", "--references", "missing.txt", cwd=tmp_path)
    assert res.code == 1 and res.stdout == ""
    assert res.stderr.strip() == "Error: missing.txt: no such file"
